#![doc = include_str!("lib.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use busway_core::{
    Address, AddressKind, BoxError, Bus, BusBuilder, BusObserver, ConsumeContext, ConsumeError,
    ConsumeErrorKind, ConsumeService, Consumer, ConsumerConfigurator, ConsumerOf,
    ConsumerRegistration, DefaultEndpointNameFormatter, DomainEventHandler, DomainEvents,
    EndpointConfigurator, EndpointNameFormatter, Envelope, Error, ErrorKind, ExceptionInfo, Fault,
    Headers, HostInfo, InMemory, IntoAddress, KebabCaseEndpointNameFormatter, MassTransitJson,
    Mediator, Message, OutgoingCapture, OutgoingMessage, RawJson, ReceiveContext, RequestClient,
    RequestFault, Response, Result, Retry, RunningBus, SendBuilder, SendTarget, Serializer,
    SettledBy, SnakeCaseEndpointNameFormatter, Topology, TraceContext, Transport, TransportMessage,
    Urn, UrnArgument, async_trait, new_id,
};

#[doc(inline)]
pub use busway_core::{
    address, bus, consumer, context, dotnet, endpoint, envelope, error, fault, headers, host,
    inmemory, mediator, naming, observer, outgoing, pipeline, request, scheduling, send,
    serializer, testing, topology, trace, transport, urn,
};

/// `#[derive(Message)]`: see [`busway_macros::Message`].
///
/// Multi-word field names must say how they go on the wire, since MassTransit reads
/// camelCase and serde writes names as spelled. This is refused:
///
/// ```compile_fail
/// use busway::prelude::*;
/// use serde::{Deserialize, Serialize};
/// use uuid::Uuid;
///
/// #[derive(Serialize, Deserialize, Message)]
/// struct OrderPlaced {
///     order_id: Uuid, // would be written `order_id`; MassTransit reads `orderId`
/// }
/// ```
///
/// These are accepted:
///
/// ```
/// use busway::prelude::*;
/// use rust_decimal::Decimal;
/// use serde::{Deserialize, Serialize};
/// use uuid::Uuid;
///
/// #[derive(Serialize, Deserialize, Message)]
/// #[serde(rename_all = "camelCase")]
/// struct OrderPlaced {
///     order_id: Uuid,
/// }
///
/// #[derive(Serialize, Deserialize, Message)]
/// struct Renamed {
///     #[serde(rename = "orderId")]
///     order_id: Uuid,
///     total: Decimal,
/// }
///
/// #[derive(Serialize, Deserialize, Message)]
/// #[message(snake_case)] // snake_case on the wire, on purpose
/// struct Internal {
///     order_id: Uuid,
/// }
/// ```
#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use busway_macros::Message;

/// The Azure Service Bus transport: `busway::servicebus::ServiceBus`.
#[cfg(feature = "azure-servicebus")]
#[cfg_attr(docsrs, doc(cfg(feature = "azure-servicebus")))]
#[doc(inline)]
pub use busway_azure_servicebus as servicebus;

/// The Kafka transport: `busway::kafka::Kafka`.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
#[doc(inline)]
pub use busway_kafka as kafka;

/// The RabbitMQ transport: `busway::rabbitmq::RabbitMq`.
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
#[doc(inline)]
pub use busway_rabbitmq as rabbitmq;

/// The transactional outbox and inbox: `busway::outbox::{Outbox, PostgresStore, SqliteStore}`.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
#[doc(inline)]
pub use busway_outbox as outbox;

/// Saga state machines: `busway::saga::{StateMachine, InMemorySagaRepository}`, and the
/// database repositories with `postgres` and `sqlite`.
#[cfg(feature = "saga")]
#[cfg_attr(docsrs, doc(cfg(feature = "saga")))]
#[doc(inline)]
pub use busway_saga as saga;

/// Cancellation of consumers and requests (`tokio_util`'s token).
pub use busway_core::CancellationToken;

/// Re-exported crates that message contracts and transports use.
pub mod deps {
    pub use bytes;
    pub use chrono;
    pub use rust_decimal;
    pub use serde;
    pub use serde_json;
    pub use tower;
    pub use uuid;
}

/// busway's own names a typical service uses: `use busway::prelude::*;`.
///
/// Only busway's items: a contract's `Serialize`/`Deserialize` come from `serde` in your
/// `Cargo.toml` (the derives need the crate by that name), and `Uuid`, `Decimal` and
/// `DateTime<Utc>` from `uuid`, `rust_decimal` and `chrono`, or from [`crate::deps`] if you
/// would rather not list them.
pub mod prelude {
    #[cfg(feature = "macros")]
    pub use crate::Message;
    pub use crate::{
        Bus, ConsumeContext, ConsumeError, Consumer, DomainEventHandler, DomainEvents, InMemory,
        Mediator, Retry,
    };
}

#[doc(hidden)]
pub use busway_core::__private;

/// The README's code, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
