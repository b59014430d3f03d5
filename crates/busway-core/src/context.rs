//! Receive and consume contexts: what a layer and a consumer see of a delivery.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::address::IntoAddress;
use crate::bus::Bus;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::{Headers, names};
use crate::host::HostInfo;
use crate::message::Message;
use crate::send::{Parent, SendBuilder};
use crate::sender::SendContext;
use crate::serializer::{MessageJson, ReceivedMessage};
use crate::topology::Extensions;
use crate::trace::TraceContext;
use crate::transport::{Settlement, TransportMessage};
use crate::urn::Urn;

/// Identity of a receive endpoint, shared by its deliveries.
#[derive(Debug)]
pub(crate) struct EndpointInfo {
    pub(crate) name: String,
    pub(crate) address: String,
}

/// How a delivery was settled by someone other than the receive loop's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettledBy {
    /// Delayed redelivery sent it back to the endpoint ([`ReceiveContext::redeliver`]).
    Redelivered,
}

/// Where a delivery's settlement is: still open, settled by a layer (which said how), or
/// taken by the receive loop.
enum SettlementState {
    Open(Box<dyn Settlement>),
    Settled(SettledBy),
    Taken,
}

/// One delivery on its way through an endpoint's consume pipeline.
///
/// This is the request type of every consume-side `tower::Service`. It is cheap to clone
/// (an `Arc`), so retry layers can call the inner service again with the same context.
#[derive(Clone)]
pub struct ReceiveContext {
    inner: Arc<ReceiveInner>,
}

struct ReceiveInner {
    bus: Bus,
    endpoint: Arc<EndpointInfo>,
    transport_message: TransportMessage,
    received: ReceivedMessage,
    redelivered: bool,
    delivery_count: Option<u32>,
    redelivery_count: u32,
    retry_attempt: AtomicU32,
    cancel: CancellationToken,
    settlement: Mutex<SettlementState>,
    trace: TraceContext,
    parent_trace: Option<TraceContext>,
    /// Consumers (by index) that succeeded for this delivery: a bit each for the first 64,
    /// a set for the rest (rare: an endpoint with more than 64 consumers of one type).
    completed: AtomicU64,
    completed_more: Mutex<HashSet<usize>>,
    fault_source: Mutex<Option<(String, Urn)>>,
    payloads: Mutex<Extensions>,
}

impl ReceiveContext {
    #[allow(clippy::too_many_arguments)] // internal constructor, called from one place
    pub(crate) fn new(
        bus: Bus,
        endpoint: Arc<EndpointInfo>,
        transport_message: TransportMessage,
        received: ReceivedMessage,
        redelivered: bool,
        delivery_count: Option<u32>,
        settlement: Box<dyn Settlement>,
        cancel: CancellationToken,
    ) -> Self {
        let redelivery_count = received
            .envelope
            .headers
            .get_i64(names::REDELIVERY_COUNT)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let parent_trace = TraceContext::from_headers(&received.envelope.headers);
        let trace = parent_trace
            .map(|p| p.child())
            .unwrap_or_else(TraceContext::new_root);
        Self {
            inner: Arc::new(ReceiveInner {
                bus,
                endpoint,
                transport_message,
                received,
                redelivered,
                delivery_count,
                redelivery_count,
                retry_attempt: AtomicU32::new(0),
                cancel,
                settlement: Mutex::new(SettlementState::Open(settlement)),
                trace,
                parent_trace,
                completed: AtomicU64::new(0),
                completed_more: Mutex::new(HashSet::new()),
                fault_source: Mutex::new(None),
                payloads: Mutex::new(Extensions::default()),
            }),
        }
    }

    pub(crate) fn send_context(&self) -> &SendContext {
        self.inner.bus.send_context()
    }

    pub(crate) fn bus_ref(&self) -> &Bus {
        &self.inner.bus
    }

    /// What a message produced while consuming this one continues from.
    pub(crate) fn parent(&self) -> Parent<'_> {
        Parent {
            envelope: self.envelope(),
            input_address: self.input_address(),
            trace: self.inner.trace,
        }
    }

    /// The bus this delivery arrived on.
    pub fn bus(&self) -> Bus {
        self.inner.bus.clone()
    }

    /// The envelope: ids, addresses, times, headers, host.
    pub fn envelope(&self) -> &Envelope {
        &self.inner.received.envelope
    }

    /// The message's type URNs, most specific first.
    pub fn message_types(&self) -> &[Urn] {
        &self.inner.received.envelope.message_type
    }

    /// True when the message carries no type and any consumer may take it (raw JSON option).
    pub fn any_message_type(&self) -> bool {
        self.inner.received.any_message_type
    }

    /// The message body as JSON (sharing the received body, not a copy of it).
    pub fn message_json(&self) -> &MessageJson {
        &self.inner.received.message
    }

    /// The message headers (envelope headers merged with transport headers).
    pub fn headers(&self) -> &Headers {
        &self.inner.received.envelope.headers
    }

    /// The message id.
    pub fn message_id(&self) -> Option<Uuid> {
        self.inner.received.envelope.message_id
    }

    /// The message as the transport delivered it.
    pub fn transport_message(&self) -> &TransportMessage {
        &self.inner.transport_message
    }

    /// The name of the receiving endpoint.
    pub fn endpoint_name(&self) -> &str {
        &self.inner.endpoint.name
    }

    /// The full address of the receiving endpoint.
    pub fn input_address(&self) -> &str {
        &self.inner.endpoint.address
    }

    /// The transport's `messaging.system` name.
    pub fn messaging_system(&self) -> &'static str {
        self.inner.bus.send_context().system
    }

    /// True when the broker says the message was delivered before.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// The broker's delivery count, if it keeps one.
    pub fn delivery_count(&self) -> Option<u32> {
        self.inner.delivery_count
    }

    /// How many times delayed redelivery has re-sent this message (`MT-Redelivery-Count`).
    pub fn redelivery_count(&self) -> u32 {
        self.inner.redelivery_count
    }

    /// The current in-process retry attempt: 0 on the first try, 1 on the first retry, ...
    pub fn retry_attempt(&self) -> u32 {
        self.inner.retry_attempt.load(Ordering::Acquire)
    }

    /// Records the retry attempt (done by retry layers).
    #[doc(hidden)] // set by busway's retry layers; not part of the API
    pub fn set_retry_attempt(&self, attempt: u32) {
        self.inner.retry_attempt.store(attempt, Ordering::Release);
    }

    /// Cancelled when the consume should stop: the endpoint timeout fired or the bus is
    /// shutting down past its deadline.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// The trace context of this consume (a child of the producer's `traceparent`).
    pub fn trace_context(&self) -> TraceContext {
        self.inner.trace
    }

    /// The producer's trace context, when the message carried one.
    pub fn parent_trace_context(&self) -> Option<TraceContext> {
        self.inner.parent_trace
    }

    /// True once the delivery has been settled by a layer (for example redelivered).
    pub fn is_settled(&self) -> bool {
        !matches!(&*self.settlement(), SettlementState::Open(_))
    }

    /// How a layer settled the delivery, if one did.
    pub fn settled_by(&self) -> Option<SettledBy> {
        match &*self.settlement() {
            SettlementState::Settled(by) => Some(*by),
            _ => None,
        }
    }

    fn settlement(&self) -> std::sync::MutexGuard<'_, SettlementState> {
        self.inner
            .settlement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the delivery's settlement for the receive loop, or says how a layer settled it
    /// (`None`: the loop took it already).
    pub(crate) fn take_settlement(
        &self,
    ) -> std::result::Result<Box<dyn Settlement>, Option<SettledBy>> {
        let mut state = self.settlement();
        match std::mem::replace(&mut *state, SettlementState::Taken) {
            SettlementState::Open(settlement) => Ok(settlement),
            SettlementState::Settled(by) => {
                *state = SettlementState::Settled(by);
                Err(Some(by))
            }
            SettlementState::Taken => Err(None),
        }
    }

    /// Settles the delivery by sending it back to this endpoint after `delay` with
    /// `MT-Redelivery-Count` incremented (delayed redelivery), and records that it did: the
    /// receive loop then leaves the delivery alone. The original is removed once the copy is
    /// accepted; if that fails the original goes back to the queue.
    pub async fn redeliver(&self, delay: Duration) -> Result<()> {
        let settlement = {
            let mut state = self.settlement();
            match std::mem::replace(
                &mut *state,
                SettlementState::Settled(SettledBy::Redelivered),
            ) {
                SettlementState::Open(settlement) => settlement,
                other => {
                    *state = other;
                    return Err(Error::new(
                        ErrorKind::Config,
                        "the delivery was already settled",
                    ));
                }
            }
        };
        let mut message = self.inner.transport_message.clone();
        message.headers.insert(
            names::REDELIVERY_COUNT,
            i64::from(self.inner.redelivery_count) + 1,
        );
        settlement.redeliver(message, delay).await
    }

    /// Attaches a value for layers further in and for the consumer (for example the database
    /// transaction of the transactional outbox). One value per type; a later one replaces it.
    pub fn set_payload<T: std::any::Any + Send + Sync>(&self, value: T) {
        self.inner
            .payloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(value);
    }

    /// A copy of the value of type `T` a layer attached, if any.
    pub fn payload<T: std::any::Any + Send + Sync + Clone>(&self) -> Option<T> {
        self.inner
            .payloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get::<T>()
            .cloned()
    }

    pub(crate) fn is_completed(&self, consumer_index: usize) -> bool {
        if consumer_index < 64 {
            return self.inner.completed.load(Ordering::Acquire) & (1 << consumer_index) != 0;
        }
        self.inner
            .completed_more
            .lock()
            .map(|c| c.contains(&consumer_index))
            .unwrap_or(false)
    }

    pub(crate) fn mark_completed(&self, consumer_index: usize) {
        if consumer_index < 64 {
            self.inner
                .completed
                .fetch_or(1 << consumer_index, Ordering::AcqRel);
        } else if let Ok(mut c) = self.inner.completed_more.lock() {
            c.insert(consumer_index);
        }
    }

    pub(crate) fn set_fault_source(&self, consumer_type: &str, message_type: &Urn) {
        if let Ok(mut f) = self.inner.fault_source.lock() {
            *f = Some((consumer_type.to_string(), message_type.clone()));
        }
    }

    pub(crate) fn fault_source(&self) -> Option<(String, Urn)> {
        self.inner.fault_source.lock().ok().and_then(|f| f.clone())
    }
}

impl fmt::Debug for ReceiveContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiveContext")
            .field("endpoint", &self.inner.endpoint.name)
            .field("message_id", &self.message_id())
            .field("message_types", &self.message_types())
            .field("redelivery_count", &self.inner.redelivery_count)
            .field("retry_attempt", &self.retry_attempt())
            .finish()
    }
}

/// What a consumer sees: the typed message, its envelope, and ways to publish, send and
/// respond that carry the conversation forward.
///
/// Messages produced through the context get the consumed message's conversation id, an
/// initiator id (the consumed correlation id, else its request id, else its message id), the
/// consumed correlation id unless one is set, the endpoint address as source, every
/// non-`MT-` header of the consumed message, and a `traceparent` child of the consume span.
pub struct ConsumeContext<M> {
    message: M,
    receive: ReceiveContext,
}

impl<M> ConsumeContext<M> {
    pub(crate) fn new(message: M, receive: ReceiveContext) -> Self {
        Self { message, receive }
    }

    /// The message.
    pub fn message(&self) -> &M {
        &self.message
    }

    /// Takes the message out of the context.
    pub fn into_message(self) -> M {
        self.message
    }

    /// The same delivery with `message` in place of this one: what it publishes, sends and
    /// responds carries the conversation on as this context would. For extensions that act
    /// for a consumed message with a value of their own (a saga's `finally` activities).
    pub fn with_message<N>(&self, message: N) -> ConsumeContext<N> {
        ConsumeContext {
            message,
            receive: self.receive.clone(),
        }
    }

    /// The delivery below the typed message.
    pub fn receive_context(&self) -> &ReceiveContext {
        &self.receive
    }

    fn envelope(&self) -> &Envelope {
        self.receive.envelope()
    }

    /// The message id.
    pub fn message_id(&self) -> Option<Uuid> {
        self.envelope().message_id
    }

    /// The correlation id.
    pub fn correlation_id(&self) -> Option<Uuid> {
        self.envelope().correlation_id
    }

    /// The conversation id.
    pub fn conversation_id(&self) -> Option<Uuid> {
        self.envelope().conversation_id
    }

    /// The initiator id (the message that caused this one).
    pub fn initiator_id(&self) -> Option<Uuid> {
        self.envelope().initiator_id
    }

    /// The request id, when the message is a request.
    pub fn request_id(&self) -> Option<Uuid> {
        self.envelope().request_id
    }

    /// Where the message came from.
    pub fn source_address(&self) -> Option<&str> {
        self.envelope().source_address.as_deref()
    }

    /// Where the message was sent.
    pub fn destination_address(&self) -> Option<&str> {
        self.envelope().destination_address.as_deref()
    }

    /// Where responses go.
    pub fn response_address(&self) -> Option<&str> {
        self.envelope().response_address.as_deref()
    }

    /// Where faults go.
    pub fn fault_address(&self) -> Option<&str> {
        self.envelope().fault_address.as_deref()
    }

    /// When the message was sent.
    pub fn sent_time(&self) -> Option<DateTime<Utc>> {
        self.envelope().sent_time
    }

    /// When the message expires.
    pub fn expiration_time(&self) -> Option<DateTime<Utc>> {
        self.envelope().expiration_time
    }

    /// The message's type URNs.
    pub fn message_types(&self) -> &[Urn] {
        self.receive.message_types()
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        self.receive.headers()
    }

    /// The producing host.
    pub fn host(&self) -> Option<&HostInfo> {
        self.envelope().host.as_deref()
    }

    /// The receiving endpoint's address.
    pub fn input_address(&self) -> &str {
        self.receive.input_address()
    }

    /// How many times delayed redelivery re-sent this message.
    pub fn redelivery_count(&self) -> u32 {
        self.receive.redelivery_count()
    }

    /// The in-process retry attempt (0 on the first try).
    pub fn retry_attempt(&self) -> u32 {
        self.receive.retry_attempt()
    }

    /// True when the broker says the message was delivered before.
    pub fn redelivered(&self) -> bool {
        self.receive.redelivered()
    }

    /// The broker's delivery count (1 on the first delivery), where the broker keeps one
    /// (Azure Service Bus); `None` elsewhere.
    pub fn delivery_count(&self) -> Option<u32> {
        self.receive.delivery_count()
    }

    /// Cancelled when the consumer should stop (timeout, shutdown deadline).
    pub fn cancellation(&self) -> &CancellationToken {
        self.receive.cancellation()
    }

    /// A copy of the value of type `T` a layer attached to this delivery (see
    /// [`ReceiveContext::set_payload`]).
    pub fn payload<T: std::any::Any + Send + Sync + Clone>(&self) -> Option<T> {
        self.receive.payload::<T>()
    }

    /// The bus, for anything the context does not offer directly.
    pub fn bus(&self) -> Bus {
        self.receive.bus()
    }

    /// Publishes `message` to every endpoint that consumes its type.
    pub fn publish<T: Message>(&self, message: T) -> SendBuilder<'_, T> {
        SendBuilder::publish(
            self.receive.send_context(),
            Some(self.receive.parent()),
            message,
        )
    }

    /// Sends `message` to one address.
    pub fn send<T: Message>(&self, address: impl IntoAddress, message: T) -> SendBuilder<'_, T> {
        SendBuilder::send(
            self.receive.send_context(),
            Some(self.receive.parent()),
            address.into_address(),
            message,
        )
    }

    /// Responds to a request: sends `message` to the response address with the request id, or
    /// publishes it when the request had no response address.
    pub fn respond<T: Message>(&self, message: T) -> SendBuilder<'_, T> {
        let builder = match self.response_address() {
            Some(address) => SendBuilder::send(
                self.receive.send_context(),
                Some(self.receive.parent()),
                address.into_address(),
                message,
            ),
            None => SendBuilder::publish(
                self.receive.send_context(),
                Some(self.receive.parent()),
                message,
            ),
        };
        let builder = builder.reply_to(self.receive.transport_message().reply_to.clone());
        match self.request_id() {
            Some(id) => builder.request_id(id),
            None => builder,
        }
    }
}

impl<M: fmt::Debug> fmt::Debug for ConsumeContext<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumeContext")
            .field("message", &self.message)
            .field("receive", &self.receive)
            .finish()
    }
}
