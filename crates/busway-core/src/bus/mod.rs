//! The bus: a handle to publish, send and request from anywhere, built once by
//! [`builder::BusBuilder`] and started ([`Bus::start`]) to run its receive endpoints.
//!
//! This module owns only what the handle needs: the send-side context, the deployed topology,
//! the requests waiting for a response, and the lifecycle of the endpoints. How endpoints are
//! planned and run lives in [`crate::endpoint`]; the builder wires the two together.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::address::IntoAddress;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::outgoing::OutgoingMessage;
use crate::send::SendBuilder;
use crate::sender::SendContext;
use crate::serializer::ReceivedMessage;
use crate::topology::{EndpointTopology, Topology};
use crate::transport::Transport;

pub mod builder;
pub mod running;
mod schedule;

/// How long `RunningBus::shutdown` waits for in-flight messages by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// MassTransit's default request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The bus: publish, send and request from anywhere; start it to consume.
///
/// Cheap to clone; every clone is the same bus.
#[derive(Clone)]
pub struct Bus {
    shared: Arc<BusShared>,
}

/// What every clone of a bus shares.
pub(crate) struct BusShared {
    pub(crate) send: SendContext,
    pub(crate) topology: Topology,
    pub(crate) requests: Requests,
    pub(crate) request_timeout: Duration,
    pub(crate) response: ResponseEndpoint,
    /// Starts the receive endpoints; taken by the first `start`.
    pub(crate) starter: Mutex<Option<Starter>>,
    /// Tokens of scheduled sends cancelled with [`Bus::cancel_scheduled_send`].
    pub(crate) cancelled_schedules: CancelledSchedules,
}

/// The scheduling tokens a bus's endpoints drop on arrival.
#[derive(Default)]
pub(crate) struct CancelledSchedules {
    any: std::sync::atomic::AtomicBool,
    tokens: Mutex<std::collections::HashSet<Uuid>>,
    /// The tokens in the order they were cancelled, to forget the oldest past the bound.
    order: Mutex<std::collections::VecDeque<Uuid>>,
}

/// The most cancellations remembered: a token whose message never comes back to this bus
/// (it went to another service) is forgotten once this many newer ones are kept.
const MAX_CANCELLED: usize = 65_536;

impl CancelledSchedules {
    fn cancel(&self, token: Uuid) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.insert(token) {
            order.push_back(token);
        }
        while order.len() > MAX_CANCELLED {
            if let Some(old) = order.pop_front() {
                tokens.remove(&old);
            }
        }
        self.any.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a message with these headers was cancelled (and forgets the token: a
    /// scheduled message arrives once).
    pub(crate) fn take(&self, headers: &crate::headers::Headers) -> bool {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let Some(token) = headers
            .get_str(crate::headers::names::SCHEDULING_TOKEN_ID)
            .and_then(|t| Uuid::parse_str(&t).ok())
        else {
            return false;
        };
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token)
    }
}

/// Starts a bus's receive endpoints (made by the builder from the endpoint plans).
pub(crate) type Starter = Box<dyn FnOnce(Bus) -> BoxFuture<'static, Result<Started>> + Send>;

/// Starts the response endpoint: given the bus and the token that stops it, returns the
/// endpoint's task.
pub(crate) type ResponseStarter =
    Box<dyn Fn(Bus, CancellationToken) -> BoxFuture<'static, Result<JoinHandle<()>>> + Send + Sync>;

/// Running receive endpoints.
pub(crate) struct Started {
    /// Stops intake (graceful shutdown).
    pub(crate) stop: CancellationToken,
    /// Cancels in-flight deliveries (the shutdown deadline passed).
    pub(crate) hard: CancellationToken,
    /// Each endpoint's name and task.
    pub(crate) endpoints: Vec<(String, JoinHandle<()>)>,
}

/// The bus's response endpoint: an ordinary receive endpoint, started on first use.
pub(crate) struct ResponseEndpoint {
    pub(crate) topology: EndpointTopology,
    pub(crate) start: ResponseStarter,
    pub(crate) task: tokio::sync::OnceCell<Mutex<Option<JoinHandle<()>>>>,
    pub(crate) stop: CancellationToken,
}

/// Requests waiting for a response, by request id.
#[derive(Default)]
pub(crate) struct Requests {
    pending: Mutex<HashMap<Uuid, oneshot::Sender<ReceivedMessage>>>,
}

impl Requests {
    /// Waits for the response to request `id`.
    pub(crate) fn register(&self, id: Uuid) -> oneshot::Receiver<ReceivedMessage> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        rx
    }

    /// Stops waiting for request `id`; returns its waiter, if it was still waiting.
    pub(crate) fn remove(&self, id: &Uuid) -> Option<oneshot::Sender<ReceivedMessage>> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
    }

    /// Number of requests waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }
}

impl Bus {
    pub(crate) fn from_shared(shared: BusShared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    pub(crate) fn shared(&self) -> &BusShared {
        &self.shared
    }

    pub(crate) fn send_context(&self) -> &SendContext {
        &self.shared.send
    }

    /// Publishes `message` to every endpoint that consumes its type.
    pub fn publish<M: Message>(&self, message: M) -> SendBuilder<'_, M> {
        SendBuilder::publish(&self.shared.send, None, message)
    }

    /// Sends `message` to one address: `queue:name`, `exchange:name`, `topic:name` or a URI
    /// such as `loopback://localhost/name`.
    pub fn send<M: Message>(&self, address: impl IntoAddress, message: M) -> SendBuilder<'_, M> {
        SendBuilder::send(&self.shared.send, None, address.into_address(), message)
    }

    /// Delivers a message built earlier (with [`SendBuilder::into_outgoing`], or read back
    /// from an outbox) through the send pipeline and the transport.
    pub async fn dispatch(&self, outgoing: OutgoingMessage) -> Result<()> {
        self.shared.send.dispatch(outgoing).await
    }

    /// The deployed topology (print it with [`Bus::topology_text`] or
    /// [`Bus::topology_mermaid`], in the transport's own terms).
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// The deployed topology in the transport's own terms, as text (exchanges and queues on
    /// RabbitMQ, topics and consumer groups on Kafka).
    pub fn topology_text(&self) -> String {
        self.transport().describe(&self.shared.topology).to_text()
    }

    /// The deployed topology in the transport's own terms, as a Mermaid flowchart.
    pub fn topology_mermaid(&self) -> String {
        self.transport()
            .describe(&self.shared.topology)
            .to_mermaid()
    }

    /// The bus's own address (its response endpoint), used as the source of messages
    /// published outside a consumer.
    pub fn address(&self) -> &str {
        &self.shared.send.address
    }

    /// The name of the bus's response endpoint (`{machine}_{process}_bus_{id}`): responses
    /// come back there, and what it cannot read goes to `<name>_error`.
    pub fn response_endpoint_name(&self) -> &str {
        &self.shared.response.topology.name
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.shared.send.transport
    }

    /// Starts the response endpoint on first use.
    pub(crate) async fn ensure_response_endpoint(&self) -> Result<()> {
        let response = &self.shared.response;
        response
            .task
            .get_or_try_init(|| async {
                if response.stop.is_cancelled() {
                    return Err(Error::closed("the bus is shut down"));
                }
                let task = (response.start)(self.clone(), response.stop.clone()).await?;
                Ok(Mutex::new(Some(task)))
            })
            .await
            .map(|_| ())
    }

    /// Stops the response endpoint (if it ever started) and waits for it.
    pub(crate) async fn stop_response_endpoint(&self) {
        let response = &self.shared.response;
        response.stop.cancel();
        let task = response
            .task
            .get()
            .and_then(|t| t.lock().ok().and_then(|mut t| t.take()));
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.shared.send.transport)
            .field("address", &self.shared.send.address)
            .field("endpoints", &self.shared.topology.endpoints.len())
            .finish()
    }
}
