//! Faults: the `Fault<T>` event published when a message cannot be consumed, and the
//! `MT-Fault-*` headers written on messages moved to an error queue.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::format_time;
pub use crate::exception::{ExceptionInfo, FAULT_TEXT_LIMIT, truncate};
use crate::headers::{Headers, names};
use crate::host::HostInfo;
use crate::message::{Message, private::urn_for_type};
use crate::urn::Urn;

/// The URN every fault also carries: `urn:message:MassTransit:Fault`.
pub const FAULT_URN: Urn = Urn::from_static("urn:message:MassTransit:Fault");

/// Published (or sent to the fault address) when a message of type `M` faulted: retries and
/// redeliveries were exhausted. Its URN is `urn:message:MassTransit:Fault[[<M's type>]]`, the
/// same as MassTransit's `Fault<T>`, so .NET services can consume busway's faults and the
/// other way round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault<M> {
    /// This fault's id.
    pub fault_id: Uuid,
    /// The message id of the faulted message.
    pub faulted_message_id: Option<Uuid>,
    /// When the fault happened.
    #[serde(with = "crate::envelope::time_format")]
    pub timestamp: DateTime<Utc>,
    /// The errors, outermost first.
    pub exceptions: Vec<ExceptionInfo>,
    /// Where the fault happened.
    pub host: Option<HostInfo>,
    /// The message types of the faulted message.
    pub fault_message_types: Vec<Urn>,
    /// The faulted message.
    pub message: M,
}

impl<M: Message> Message for Fault<M> {
    fn message_type() -> &'static Urn {
        urn_for_type::<Self>(|| M::message_type().fault())
    }

    fn correlation_id(&self) -> Option<Uuid> {
        self.message.correlation_id()
    }

    fn has_correlation_id() -> bool {
        M::has_correlation_id()
    }
}

/// What the error-queue headers say about a fault.
#[derive(Debug, Clone)]
pub struct FaultDetails {
    /// The error's type name.
    pub exception_type: String,
    /// The error message.
    pub message: String,
    /// The error chain.
    pub stack_trace: String,
    /// The endpoint address where it faulted.
    pub input_address: String,
    /// The consumer that faulted, if known.
    pub consumer_type: Option<String>,
    /// The message type the consumer consumed, if known.
    pub message_type: Option<String>,
    /// In-process retries before the fault.
    pub retry_count: u32,
    /// Delayed redeliveries before the fault.
    pub redelivery_count: u32,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
}

impl FaultDetails {
    /// The details of a message an endpoint at `input_address` could not read
    /// (`busway::DeserializeError`, no consumer, no retries).
    pub(crate) fn unreadable(err: &crate::error::Error, input_address: &str) -> Self {
        Self {
            exception_type: "busway::DeserializeError".to_string(),
            message: err.to_string(),
            stack_trace: crate::error::chain_text(err),
            input_address: input_address.to_string(),
            consumer_type: None,
            message_type: None,
            retry_count: 0,
            redelivery_count: 0,
            timestamp: chrono::Utc::now(),
        }
    }

    /// Writes `MT-Reason: fault` and the `MT-Fault-*` headers.
    pub fn write_headers(&self, headers: &mut Headers) {
        headers.insert(names::REASON, "fault");
        headers.insert(names::FAULT_EXCEPTION_TYPE, self.exception_type.as_str());
        headers.insert(names::FAULT_INPUT_ADDRESS, self.input_address.as_str());
        headers.insert(names::FAULT_MESSAGE, truncate(&self.message));
        headers.insert(names::FAULT_TIMESTAMP, format_time(&self.timestamp));
        headers.insert(names::FAULT_STACK_TRACE, truncate(&self.stack_trace));
        if let Some(c) = &self.consumer_type {
            headers.insert(names::FAULT_CONSUMER_TYPE, c.as_str());
        }
        if let Some(m) = &self.message_type {
            headers.insert(names::FAULT_MESSAGE_TYPE, m.as_str());
        }
        if self.retry_count > 0 {
            headers.insert(names::FAULT_RETRY_COUNT, self.retry_count);
        }
        if self.redelivery_count > 0 {
            headers.insert(names::FAULT_REDELIVERY_COUNT, self.redelivery_count);
        }
    }
}
