//! Publish and send: the [`SendBuilder`] returned by `bus.publish(..)`, `bus.send(..)` and the
//! consume context's methods, the [`OutgoingMessage`] it builds, and the end of the send
//! pipeline that serializes and hands the message to the transport.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use tower::util::BoxCloneSyncService;
use tower_service::Service;
use uuid::Uuid;

use crate::address::Address;
use crate::bus::BusInner;
use crate::context::ReceiveContext;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::host::HostInfo;
use crate::message::{Message, new_id};
use crate::observer::Observers;
use crate::serializer::{Serializer, Serializers};
use crate::trace::TraceContext;
use crate::transport::{DeliveryOptions, Transport};

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

/// The last service of the send pipeline: serialize, then publish or send on the transport.
#[derive(Clone)]
pub(crate) struct TransportSender {
    shared: Arc<SenderShared>,
}

struct SenderShared {
    transport: Arc<dyn Transport>,
    serializers: Serializers,
    observers: Observers,
}

impl TransportSender {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        serializers: Serializers,
        observers: Observers,
    ) -> Self {
        Self {
            shared: Arc::new(SenderShared {
                transport,
                serializers,
                observers,
            }),
        }
    }
}

impl Service<OutgoingMessage> for TransportSender {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<'static, Result<()>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, outgoing: OutgoingMessage) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let serializer = outgoing
                .serializer
                .as_ref()
                .unwrap_or_else(|| shared.serializers.default_serializer());
            let mut message = serializer.serialize(&outgoing.envelope, &outgoing.message)?;
            message.time_to_live = outgoing.time_to_live;
            message.partition_key = outgoing.partition_key.clone();
            let result = match &outgoing.target {
                SendTarget::Publish => {
                    shared
                        .transport
                        .publish(&outgoing.envelope.message_type, message, &outgoing.delivery)
                        .await
                }
                SendTarget::Send(address) => {
                    shared
                        .transport
                        .send(address, message, &outgoing.delivery)
                        .await
                }
            };
            shared.observers.on_send(&outgoing, result.as_ref().err());
            result
        })
    }
}

#[derive(Default)]
struct SendOptions {
    headers: Headers,
    message_id: Option<Uuid>,
    correlation_id: Option<Uuid>,
    conversation_id: Option<Uuid>,
    request_id: Option<Uuid>,
    initiator_id: Option<Uuid>,
    response_address: Option<String>,
    fault_address: Option<String>,
    delay: Option<Duration>,
    time_to_live: Option<Duration>,
    partition_key: Option<String>,
    serializer: Option<Arc<dyn Serializer>>,
}

/// A publish or send being prepared; `.await` it to deliver.
///
/// Set ids, headers, a delay or a time to live before awaiting:
///
/// ```no_run
/// # use busway_core::*;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced;
/// # impl Message for OrderPlaced { fn message_type() -> &'static Urn { static U: Urn = Urn::from_static("urn:message:X:OrderPlaced"); &U } }
/// # async fn f(bus: Bus) -> Result<()> {
/// bus.publish(OrderPlaced)
///     .header("Tenant", "acme")
///     .correlation_id(uuid::Uuid::now_v7())
///     .await?;
/// bus.send("queue:billing", OrderPlaced)
///     .delay(std::time::Duration::from_secs(30)) // scheduled send
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a publish or send does nothing until it is awaited"]
pub struct SendBuilder<'a, M> {
    bus: &'a Arc<BusInner>,
    parent: Option<&'a ReceiveContext>,
    message: M,
    target: Result<SendTarget>,
    options: SendOptions,
    capturable: bool,
}

impl<M> fmt::Debug for SendBuilder<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendBuilder")
            .field("target", &self.target.as_ref().ok())
            .finish_non_exhaustive()
    }
}

impl<'a, M: Message> SendBuilder<'a, M> {
    pub(crate) fn publish(
        bus: &'a Arc<BusInner>,
        parent: Option<&'a ReceiveContext>,
        message: M,
    ) -> Self {
        Self {
            bus,
            parent,
            message,
            target: Ok(SendTarget::Publish),
            options: SendOptions::default(),
            capturable: true,
        }
    }

    pub(crate) fn send(
        bus: &'a Arc<BusInner>,
        parent: Option<&'a ReceiveContext>,
        address: Result<Address>,
        message: M,
    ) -> Self {
        Self {
            bus,
            parent,
            message,
            target: address.map(SendTarget::Send),
            options: SendOptions::default(),
            capturable: true,
        }
    }

    /// Never captured by an [`OutgoingCapture`] (requests must go out while their caller
    /// waits for the response).
    pub(crate) fn uncaptured(mut self) -> Self {
        self.capturable = false;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.options.headers.insert(name, value);
        self
    }

    /// Adds every header of `headers`.
    pub fn headers(mut self, headers: &Headers) -> Self {
        self.options.headers.extend_from(headers);
        self
    }

    /// Sets the message id (default: a new time-ordered UUID).
    pub fn message_id(mut self, id: Uuid) -> Self {
        self.options.message_id = Some(id);
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.options.correlation_id = Some(id);
        self
    }

    /// Sets the conversation id (default: the consumed message's, else a new one).
    pub fn conversation_id(mut self, id: Uuid) -> Self {
        self.options.conversation_id = Some(id);
        self
    }

    /// Sets the request id.
    pub fn request_id(mut self, id: Uuid) -> Self {
        self.options.request_id = Some(id);
        self
    }

    /// Sets the initiator id.
    pub fn initiator_id(mut self, id: Uuid) -> Self {
        self.options.initiator_id = Some(id);
        self
    }

    /// Sets where responses should go.
    pub fn response_address(mut self, address: impl Into<String>) -> Self {
        self.options.response_address = Some(address.into());
        self
    }

    /// Sets where faults should go.
    pub fn fault_address(mut self, address: impl Into<String>) -> Self {
        self.options.fault_address = Some(address.into());
        self
    }

    /// Delivers the message no earlier than `delay` from now (scheduled send, using the
    /// transport's delayed delivery).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = Some(delay);
        self
    }

    /// Delivers the message no earlier than `at`.
    pub fn deliver_at(self, at: DateTime<Utc>) -> Self {
        let delay = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        self.delay(delay)
    }

    /// Sets how long the broker keeps the message (also written as `expirationTime`).
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.options.time_to_live = Some(ttl);
        self
    }

    /// Sets the partition or ordering key (default: the message's own key).
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.options.partition_key = Some(key.into());
        self
    }

    /// Writes this message with `serializer` instead of the bus default.
    pub fn serializer(mut self, serializer: Arc<dyn Serializer>) -> Self {
        self.options.serializer = Some(serializer);
        self
    }

    /// Builds the message without delivering it: the envelope filled in (ids, addresses,
    /// headers, host) and its producer `traceparent` written. Deliver it later with
    /// [`crate::Bus::dispatch`] (the transactional outbox stores it in between).
    pub fn into_outgoing(self) -> Result<OutgoingMessage> {
        let mut outgoing = self.build()?;
        let (_, _) = TraceContext::stamp(&mut outgoing.envelope.headers, outgoing.trace_parent);
        Ok(outgoing)
    }

    fn build(self) -> Result<OutgoingMessage> {
        let SendBuilder {
            bus,
            parent,
            message,
            target,
            options,
            capturable: _,
        } = self;
        let target = target?;
        let body = serde_json::value::to_raw_value(&message).map_err(|e| {
            Error::with_source(
                ErrorKind::Serialize,
                format!("could not serialize {}", M::message_type()),
                e,
            )
        })?;
        let message_type = M::message_type().clone();
        let parent_env = parent.map(|p| p.envelope());

        let mut headers = Headers::new();
        if let Some(env) = parent_env {
            for (k, v) in env.headers.iter() {
                let lower = k.to_ascii_lowercase();
                if lower.starts_with("mt-") || lower == "traceparent" || lower == "tracestate" {
                    continue;
                }
                headers.insert(k, v.clone());
            }
        }
        headers.extend_from(&options.headers);

        let message_id = options.message_id.unwrap_or_else(new_id);
        let correlation_id = options
            .correlation_id
            .or_else(|| message.correlation_id())
            .or_else(|| parent_env.and_then(|e| e.correlation_id));
        let conversation_id = options
            .conversation_id
            .or_else(|| parent_env.and_then(|e| e.conversation_id))
            .or_else(|| Some(new_id()));
        let initiator_id = options.initiator_id.or_else(|| {
            parent_env.and_then(|e| e.correlation_id.or(e.request_id).or(e.message_id))
        });
        let source_address = Some(match parent {
            Some(p) => p.input_address().to_string(),
            None => bus.address.clone(),
        });
        let destination_address = match &target {
            SendTarget::Publish => Some(bus.transport.publish_address(&message_type)),
            SendTarget::Send(address) => Some(match address.scheme() {
                Some(_) => address.as_str().to_string(),
                None => bus.transport.endpoint_address(address.name()),
            }),
        };
        let now = Utc::now();
        let expiration_time = options
            .time_to_live
            .and_then(|ttl| chrono::Duration::from_std(ttl).ok())
            .map(|ttl| now + ttl);
        let partition_key = options.partition_key.or_else(|| message.message_key());
        let trace_parent = parent.map(|p| p.trace_context());

        let envelope = Envelope {
            message_id: Some(message_id),
            request_id: options.request_id,
            correlation_id,
            conversation_id,
            initiator_id,
            source_address,
            destination_address,
            response_address: options.response_address,
            fault_address: options.fault_address,
            message_type: vec![message_type],
            expiration_time,
            sent_time: Some(now),
            headers,
            host: Some(bus.host.clone()),
        };
        Ok(OutgoingMessage {
            envelope,
            message: body,
            target,
            delivery: DeliveryOptions {
                delay: options.delay,
            },
            time_to_live: options.time_to_live,
            partition_key,
            serializer: options.serializer,
            trace_parent,
        })
    }
}

impl<'a, M: Message> IntoFuture for SendBuilder<'a, M> {
    type Output = Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let bus = self.bus;
        let capture = if self.capturable {
            OutgoingCapture::current()
        } else {
            None
        };
        match capture {
            Some(capture) => {
                let outgoing = self.into_outgoing();
                Box::pin(async move {
                    capture.push(outgoing?);
                    Ok(())
                })
            }
            // The send pipeline's own future, boxed once: wrapping it in another async block
            // would hold the message twice and make every publish a large allocation.
            None => match self.build() {
                Ok(outgoing) => Box::pin(bus.dispatch(outgoing)),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
        }
    }
}

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

    fn push(&self, message: OutgoingMessage) {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message);
    }

    fn current() -> Option<OutgoingCapture> {
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
