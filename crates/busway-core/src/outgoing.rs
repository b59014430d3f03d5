//! Messages on their way out: the [`OutgoingMessage`] the send pipeline carries, where it
//! goes, and the [`OutgoingCapture`] that holds messages back instead of delivering them.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tower::util::BoxCloneSyncService;

use crate::address::Address;
use crate::envelope::Envelope;
use crate::error::Error;
use crate::host::HostInfo;
use crate::serializer::Serializer;
use crate::trace::TraceContext;
use crate::transport::message::DeliveryOptions;

/// Where an outgoing message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendTarget {
    /// To every endpoint subscribed to the message's types.
    Publish,
    /// To one address.
    Send(Address),
}

/// A message on its way out, after it was serialized to JSON and its envelope filled in, but
/// before the serializer and transport. This is the request type of the send pipeline, so
/// send layers can read and change headers, ids and addresses.
pub struct OutgoingMessage {
    /// The envelope: ids, addresses, times, headers, host.
    pub envelope: Envelope,
    /// The message body as JSON.
    pub message: Box<RawValue>,
    /// Publish or send.
    pub target: SendTarget,
    /// Delayed delivery and other per-call transport options.
    pub delivery: DeliveryOptions,
    /// How long the broker should keep the message.
    pub time_to_live: Option<Duration>,
    /// Partition or ordering key.
    pub partition_key: Option<String>,
    /// A serializer for this message only (else the bus default).
    pub serializer: Option<Arc<dyn Serializer>>,
    /// The trace context this message continues (else the task's current one).
    pub trace_parent: Option<TraceContext>,
}

impl fmt::Debug for OutgoingMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("envelope", &self.envelope)
            .field("message", &self.message)
            .field("target", &self.target)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

/// The type-erased send pipeline: a `tower::Service` from [`OutgoingMessage`] to `()`.
pub type SendService = BoxCloneSyncService<OutgoingMessage, (), Error>;

tokio::task_local! {
    static CAPTURE: OutgoingCapture;
}

/// Collects the messages published and sent in a scope instead of delivering them.
///
/// Inside [`OutgoingCapture::scope`], awaiting a `bus.publish(..)`, `bus.send(..)`,
/// `ctx.publish(..)` or `ctx.respond(..)` on the same task stores the built message here and
/// returns at once. Layers use it to hold messages until a consumer succeeded (the in-memory
/// outbox) or to write them into a database transaction (the transactional outbox). Requests
/// made with a request client are never captured (they wait for their response).
#[derive(Clone, Default)]
pub struct OutgoingCapture {
    messages: Arc<std::sync::Mutex<Vec<OutgoingMessage>>>,
}

impl OutgoingCapture {
    /// An empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `fut` with this capture active on the task.
    pub async fn scope<F: Future>(&self, fut: F) -> F::Output {
        CAPTURE.scope(self.clone(), fut).await
    }

    /// Takes the captured messages, in the order they were produced.
    pub fn take(&self) -> Vec<OutgoingMessage> {
        std::mem::take(&mut *self.messages.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Number of captured messages.
    pub fn len(&self) -> usize {
        self.messages.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True if nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn push(&self, message: OutgoingMessage) {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message);
    }

    pub(crate) fn current() -> Option<OutgoingCapture> {
        CAPTURE.try_with(|c| c.clone()).ok()
    }
}

impl fmt::Debug for OutgoingCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingCapture")
            .field("len", &self.len())
            .finish()
    }
}

/// The host info written into envelopes: the current process, once.
pub(crate) fn current_host() -> Arc<HostInfo> {
    static HOST: std::sync::OnceLock<Arc<HostInfo>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| Arc::new(HostInfo::current().clone()))
        .clone()
}
