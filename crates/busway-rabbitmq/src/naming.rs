//! How busway names RabbitMQ entities: MassTransit's names, so a .NET service and a busway
//! service on one broker meet at the same exchanges and queues.
//!
//! An endpoint `orders` is an exchange and a queue named `orders`; its faults go to
//! `orders_error`, unhandled types to `orders_skipped` (exchange and queue each). A message
//! type's exchange is named by [`exchange_name`].

use std::time::Duration;

use busway_core::Urn;
use busway_core::urn::EntityNameStyle;

/// MassTransit's `RabbitMqMessageNameFormatter` separators: `Ns:Type`, generic arguments as
/// `MassTransit:Fault--Ns:Type--` (`src/Transports/MassTransit.RabbitMqTransport/
/// RabbitMqTransport/RabbitMqMessageNameFormatter.cs`).
pub const ENTITY_NAMES: EntityNameStyle = EntityNameStyle::new("::", "--", ":", "-");

/// Headers RabbitMQ (and its plugins) add to a delivery about that delivery: dead-letter
/// history, the delayed-message plugin's delay, federation's origin, quorum queues' count.
/// busway does not carry them into messages sent while consuming.
pub const DELIVERY_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-*",
    "x-last-death-*",
    "x-delay",
    "x-received-from",
    "x-delivery-count",
];

/// The direct exchange dead-lettered delayed messages return through.
pub const DELAYED_EXCHANGE: &str = "busway.delayed";

/// The exchange of a message type, as MassTransit names it.
///
/// ```
/// use busway_core::Urn;
/// use busway_rabbitmq::naming::exchange_name;
///
/// let placed = Urn::new("urn:message:Contracts:OrderPlaced");
/// assert_eq!(exchange_name(&placed), "Contracts:OrderPlaced");
/// assert_eq!(exchange_name(&placed.fault()), "MassTransit:Fault--Contracts:OrderPlaced--");
/// ```
pub fn exchange_name(message_type: &Urn) -> String {
    message_type.entity_name(&ENTITY_NAMES)
}

/// RabbitMQ's direct reply-to pseudo-queue. A MassTransit request client that uses it
/// (`SetRabbitMqReplyToRequestClientFactory`) sends `responseAddress =
/// rabbitmq://host/vhost/amq.rabbitmq.reply-to` and the AMQP `reply-to` token the broker
/// made; the response goes to the default exchange with that token as routing key
/// (MassTransit's `ReplyToSendEndpoint`, `RabbitMqExchangeNames.ReplyTo`).
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The wait queue (and its exchange) that holds messages delayed by `delay` until they
/// expire into [`DELAYED_EXCHANGE`].
///
/// Named `busway.wait.*`: the exchange is auto-delete, so it goes with its queue's binding
/// when the idle queue expires. (The `busway.delay.*` exchanges of earlier versions were
/// durable and stayed forever, one per distinct delay; declaring them with other flags
/// would fail, hence the new name.)
pub fn wait_queue_name(delay: Duration) -> String {
    format!("busway.wait.{}ms", delay.as_millis().max(1))
}
