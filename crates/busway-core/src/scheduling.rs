//! Scheduled sends as MassTransit knows them: a token (`MT-Scheduling-TokenId`) on the
//! message and a handle to cancel it, and MassTransit's scheduler contracts, so a busway
//! service can schedule through a .NET scheduler endpoint (Quartz, Hangfire).
//!
//! - [`crate::Bus::schedule_send`] uses the transport's delayed delivery (MassTransit's
//!   `DelayedMessageScheduler`); [`crate::Bus::cancel_scheduled_send`] drops the message when
//!   it reaches an endpoint of the same bus (a token check on arrival: brokers cannot take a
//!   delayed message back).
//! - [`crate::Bus::schedule_send_via`] sends a [`ScheduleMessage`] to a scheduler endpoint,
//!   which sends the payload at the time; [`crate::Bus::cancel_scheduled_send_via`] sends it a
//!   [`CancelScheduledMessage`].
//!
//! The contracts' shapes are MassTransit 8's (`MassTransit.Abstractions/Contracts/Scheduling`,
//! `ScheduleMessageCommand<T>`, `EndpointScheduleMessageProvider`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::message::Message;
use crate::urn::Urn;

/// A scheduled send: what to cancel it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledMessage {
    /// The scheduling token (`MT-Scheduling-TokenId`; the `correlationId` of a
    /// [`ScheduleMessage`]).
    pub token_id: Uuid,
    /// When the message is due.
    pub scheduled_time: DateTime<Utc>,
    /// Where it goes.
    pub destination: String,
}

/// MassTransit's `ScheduleMessage` command (`urn:message:MassTransit.Scheduling:ScheduleMessage`):
/// send `payload` (of the types `payload_type`) to `destination` at `scheduled_time`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleMessage {
    /// The scheduling token; MassTransit's schedulers key the job by it.
    pub correlation_id: Uuid,
    /// When to send, in UTC.
    pub scheduled_time: DateTime<Utc>,
    /// The payload's message type URNs, most specific first.
    pub payload_type: Vec<String>,
    /// The full address to send the payload to.
    pub destination: String,
    /// The message, as JSON.
    pub payload: Box<RawValue>,
}

impl Message for ScheduleMessage {
    fn message_type() -> &'static Urn {
        static URN: Urn = Urn::from_static("urn:message:MassTransit.Scheduling:ScheduleMessage");
        &URN
    }
}

/// MassTransit's `CancelScheduledMessage` command
/// (`urn:message:MassTransit.Scheduling:CancelScheduledMessage`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelScheduledMessage {
    /// The command's own id.
    pub correlation_id: Uuid,
    /// When it was sent.
    pub timestamp: DateTime<Utc>,
    /// The token of the scheduled send to cancel.
    pub token_id: Uuid,
}

impl Message for CancelScheduledMessage {
    fn message_type() -> &'static Urn {
        static URN: Urn =
            Urn::from_static("urn:message:MassTransit.Scheduling:CancelScheduledMessage");
        &URN
    }
}
