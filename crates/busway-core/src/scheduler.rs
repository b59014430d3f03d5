//! A message scheduler endpoint for MassTransit services: it consumes MassTransit's
//! `ScheduleMessage` and sends the payload to its destination at its time through the
//! transport's delayed delivery (durable on RabbitMQ, where the message waits in a TTL queue,
//! and on Service Bus, as a scheduled message), so a .NET service configured with
//! `UseMessageScheduler(new Uri("queue:quartz"))` can schedule through busway.
//!
//! Cancelling (`CancelScheduledMessage`) is not supported: the message already waits in the
//! broker, which cannot take it back. The endpoint has no consumer for it, so such a command
//! lands in the endpoint's `_skipped` queue, where it can be seen.

use chrono::Utc;

use crate::address::Address;
use crate::context::ConsumeContext;
use crate::error::ConsumeError;
use crate::headers::names;
use crate::outgoing::SendTarget;
use crate::scheduling::ScheduleMessage;
use crate::send::{MessageDefaults, SendOptions, build_outgoing};
use crate::urn::Urn;

/// Handles one `ScheduleMessage`: sends its payload, with its payload types and the
/// scheduling token in `MT-Scheduling-TokenId`, to its destination after the time left.
pub(crate) async fn schedule(ctx: ConsumeContext<ScheduleMessage>) -> Result<(), ConsumeError> {
    let command = ctx.message();
    let destination = Address::parse(&command.destination).map_err(ConsumeError::from)?;
    if command.payload_type.is_empty() {
        return Err(ConsumeError::msg(
            "the ScheduleMessage has no payloadType; the payload cannot be sent without a message type",
        ));
    }
    let delay = (command.scheduled_time - Utc::now())
        .to_std()
        .unwrap_or_default();
    let mut options = SendOptions {
        delay: (!delay.is_zero()).then_some(delay),
        ..SendOptions::default()
    };
    options.headers.insert(
        names::SCHEDULING_TOKEN_ID,
        command.correlation_id.to_string(),
    );
    let rc = ctx.receive_context();
    let send = rc.send_context();
    let outgoing = build_outgoing(
        send,
        Some(rc.parent()),
        SendTarget::Send(destination),
        options,
        command.payload_type.iter().map(Urn::new).collect(),
        command.payload.clone(),
        MessageDefaults::default(),
    );
    send.dispatch(outgoing).await.map_err(ConsumeError::from)
}
