//! The bus: built once from registrations, then used to publish, send and request, and
//! started to run its receive endpoints.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;

use crate::address::IntoAddress;
use crate::consumer::{Consumer, ConsumerOf, ConsumerRegistration};
use crate::context::{EndpointInfo, ReceiveContext};
use crate::endpoint::{
    EndpointConfigurator, EndpointDefaults, EndpointPlan, EndpointRuntime, run_endpoint,
};
use crate::error::{ConsumeError, Error, ErrorKind, Result};
use crate::host::HostInfo;
use crate::inmemory::InMemory;
use crate::message::Message;
use crate::naming::{EndpointNameFormatter, KebabCaseEndpointNameFormatter};
use crate::observer::{BusObserver, Observers};
use crate::pipeline::{ConsumeLayer, ConsumeService, Retry, SendLayer, SendTracingLayer};
use crate::request::{RequestClient, Requests, run_response_endpoint};
use crate::send::{OutgoingMessage, SendBuilder, SendService, TransportSender, current_host};
use crate::serializer::{Serializer, Serializers};
use crate::topology::{EndpointTopology, Extensions, Topology};
use crate::transport::Transport;

/// How long `RunningBus::shutdown` waits for in-flight messages by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// MassTransit's default request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The bus: publish, send and request from anywhere; start it to consume.
///
/// Cheap to clone; every clone is the same bus.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

pub(crate) struct BusInner {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) serializers: Serializers,
    pub(crate) send_pipeline: SendService,
    pub(crate) host: Arc<HostInfo>,
    pub(crate) address: String,
    pub(crate) observers: Observers,
    pub(crate) topology: Topology,
    plans: Mutex<Option<Vec<EndpointPlan>>>,
    pub(crate) requests: Arc<Requests>,
    pub(crate) response_topology: EndpointTopology,
    response: tokio::sync::OnceCell<ResponseEndpoint>,
    response_stop: CancellationToken,
    pub(crate) request_timeout: Duration,
}

struct ResponseEndpoint {
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl BusInner {
    /// The send pipeline's future for one message (not boxed again: `SendBuilder` boxes it
    /// once).
    pub(crate) fn dispatch(
        &self,
        outgoing: OutgoingMessage,
    ) -> tower::util::Oneshot<SendService, OutgoingMessage> {
        self.send_pipeline.clone().oneshot(outgoing)
    }

    /// Starts the response endpoint on first use.
    pub(crate) async fn ensure_response_endpoint(self: &Arc<Self>) -> Result<()> {
        let this = self.clone();
        self.response
            .get_or_try_init(|| async move {
                if this.response_stop.is_cancelled() {
                    return Err(Error::closed("the bus is shut down"));
                }
                let receiver = this.transport.receive(&this.response_topology).await?;
                let handle = tokio::spawn(run_response_endpoint(
                    this.clone(),
                    receiver,
                    this.response_stop.clone(),
                ));
                Ok(ResponseEndpoint {
                    handle: Mutex::new(Some(handle)),
                })
            })
            .await
            .map(|_| ())
    }

    async fn stop_response_endpoint(&self) {
        self.response_stop.cancel();
        let handle = self
            .response
            .get()
            .and_then(|r| r.handle.lock().ok().and_then(|mut h| h.take()));
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }
}

impl Bus {
    /// A builder with the in-memory transport and no consumers.
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

    pub(crate) fn from_inner(inner: Arc<BusInner>) -> Self {
        Self { inner }
    }

    /// Publishes `message` to every endpoint that consumes its type.
    pub fn publish<M: Message>(&self, message: M) -> SendBuilder<'_, M> {
        SendBuilder::publish(&self.inner, None, message)
    }

    /// Sends `message` to one address: `queue:name`, `exchange:name`, `topic:name` or a URI
    /// such as `loopback://localhost/name`.
    pub fn send<M: Message>(&self, address: impl IntoAddress, message: M) -> SendBuilder<'_, M> {
        SendBuilder::send(&self.inner, None, address.into_address(), message)
    }

    /// Delivers a message built earlier (with [`SendBuilder::into_outgoing`], or read back
    /// from an outbox) through the send pipeline and the transport.
    pub async fn dispatch(&self, outgoing: OutgoingMessage) -> Result<()> {
        self.inner.dispatch(outgoing).await
    }

    /// A request client that publishes requests of type `Req`.
    pub fn request_client<Req: Message>(&self) -> RequestClient<Req> {
        RequestClient::new(self.clone(), None, self.inner.request_timeout)
    }

    /// A request client that sends requests of type `Req` to `address`.
    pub fn request_client_to<Req: Message>(
        &self,
        address: impl IntoAddress,
    ) -> Result<RequestClient<Req>> {
        Ok(RequestClient::new(
            self.clone(),
            Some(address.into_address()?),
            self.inner.request_timeout,
        ))
    }

    pub(crate) fn inner(&self) -> &Arc<BusInner> {
        &self.inner
    }

    /// The deployed topology (print it with `to_text()` or `to_mermaid()`).
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The bus's own address (its response endpoint), used as the source of messages
    /// published outside a consumer.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The name of the bus's response endpoint (`{machine}_{process}_bus_{id}`): responses
    /// come back there, and what it cannot read goes to `<name>_error`.
    pub fn response_endpoint_name(&self) -> &str {
        &self.inner.response_topology.name
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// Starts every receive endpoint. Returns a handle to stop them.
    pub async fn start(&self) -> Result<RunningBus> {
        let plans = self
            .inner
            .plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::config("the bus was already started"))?;
        let stop = CancellationToken::new();
        let hard = CancellationToken::new();
        let mut endpoints = Vec::with_capacity(plans.len());
        for plan in plans {
            let receiver = match self.inner.transport.receive(&plan.topology).await {
                Ok(r) => r,
                Err(err) => {
                    stop.cancel();
                    for (_, h) in endpoints {
                        let _: std::result::Result<(), _> = h.await;
                    }
                    return Err(err);
                }
            };
            let runtime = Arc::new(EndpointRuntime {
                bus: self.inner.clone(),
                info: Arc::new(EndpointInfo {
                    name: plan.topology.name.clone(),
                    address: plan.topology.address.clone(),
                }),
                pipeline: plan.pipeline,
                publish_faults: plan.publish_faults,
                hand_backs: Default::default(),
                stopping: stop.clone(),
            });
            let handle = tokio::spawn(run_endpoint(
                runtime,
                receiver,
                plan.topology.concurrency,
                stop.clone(),
                hard.clone(),
            ));
            endpoints.push((plan.topology.name.clone(), handle));
        }
        tracing::info!(endpoints = endpoints.len(), "bus started");
        Ok(RunningBus {
            bus: self.clone(),
            stop,
            hard,
            endpoints,
            done: false,
        })
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.inner.transport)
            .field("address", &self.inner.address)
            .field("endpoints", &self.inner.topology.endpoints.len())
            .finish()
    }
}

/// A started bus. Stop it with [`RunningBus::shutdown`]: intake stops, in-flight messages
/// finish (up to a deadline, then they are cancelled and returned to their queues), and the
/// transport closes. Dropping it without shutdown stops intake only.
pub struct RunningBus {
    bus: Bus,
    stop: CancellationToken,
    hard: CancellationToken,
    endpoints: Vec<(String, JoinHandle<()>)>,
    done: bool,
}

impl RunningBus {
    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Graceful shutdown with the default deadline (30 s).
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown_within(DEFAULT_SHUTDOWN_TIMEOUT).await
    }

    /// Graceful shutdown: stop taking deliveries, let in-flight ones finish within
    /// `deadline`, then cancel what is left (those messages go back to their queues), and
    /// close the transport.
    pub async fn shutdown_within(mut self, deadline: Duration) -> Result<()> {
        self.done = true;
        self.stop.cancel();
        let endpoints = std::mem::take(&mut self.endpoints);
        let names: Vec<String> = endpoints.iter().map(|(n, _)| n.clone()).collect();
        let mut handles: Vec<JoinHandle<()>> = endpoints.into_iter().map(|(_, h)| h).collect();
        let drained =
            tokio::time::timeout(deadline, futures_util::future::join_all(handles.iter_mut()))
                .await;
        if drained.is_err() {
            tracing::warn!(?deadline, endpoints = ?names, "in-flight messages did not finish before the shutdown deadline; cancelling them");
            self.hard.cancel();
            let grace = Duration::from_secs(5);
            if tokio::time::timeout(grace, futures_util::future::join_all(handles.iter_mut()))
                .await
                .is_err()
            {
                for h in &handles {
                    h.abort();
                }
            }
        }
        self.bus.inner.stop_response_endpoint().await;
        self.bus.inner.transport.close().await?;
        tracing::info!("bus stopped");
        Ok(())
    }

    /// Runs until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<()> {
        wait_for_signal().await?;
        tracing::info!("signal received; shutting down");
        self.shutdown().await
    }
}

async fn wait_for_signal() -> Result<()> {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| {
                Error::with_source(ErrorKind::Config, "could not listen for SIGTERM", e)
            })?;
        tokio::select! {
            r = ctrl_c => r.map_err(|e| Error::with_source(ErrorKind::Config, "could not listen for Ctrl-C", e)),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c
            .await
            .map_err(|e| Error::with_source(ErrorKind::Config, "could not listen for Ctrl-C", e))
    }
}

impl Drop for RunningBus {
    fn drop(&mut self) {
        if !self.done {
            self.stop.cancel();
        }
    }
}

impl fmt::Debug for RunningBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningBus")
            .field(
                "endpoints",
                &self.endpoints.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

struct AutoConsumer {
    type_name: String,
    registrations: Vec<ConsumerRegistration>,
}

/// Builds a [`Bus`]: transport, consumers and endpoints, defaults, layers, serializers.
pub struct BusBuilder {
    transport: Option<Arc<dyn Transport>>,
    auto: Vec<AutoConsumer>,
    endpoints: Vec<EndpointConfigurator>,
    formatter: Arc<dyn EndpointNameFormatter>,
    serializers: Serializers,
    serializer_chosen: bool,
    defaults: EndpointDefaults,
    consume_layers: Vec<ConsumeLayer>,
    send_layers: Vec<SendLayer>,
    observers: Vec<Arc<dyn BusObserver>>,
    host: Option<HostInfo>,
    request_timeout: Duration,
}

impl Default for BusBuilder {
    fn default() -> Self {
        Self {
            transport: None,
            auto: Vec::new(),
            endpoints: Vec::new(),
            formatter: Arc::new(KebabCaseEndpointNameFormatter::new()),
            serializers: Serializers::default(),
            serializer_chosen: false,
            defaults: EndpointDefaults::default(),
            consume_layers: Vec::new(),
            send_layers: Vec::new(),
            observers: Vec::new(),
            host: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusBuilder")
            .field("transport", &self.transport)
            .field(
                "endpoints",
                &self.endpoints.iter().map(|e| e.name()).collect::<Vec<_>>(),
            )
            .field(
                "consumers",
                &self.auto.iter().map(|a| &a.type_name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl BusBuilder {
    /// The transport to run on (default: a new [`InMemory`]).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// The transport, already shared.
    pub fn transport_arc(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// True if a transport was set.
    pub fn has_transport(&self) -> bool {
        self.transport.is_some()
    }

    /// Adds a consumer on an endpoint named after it by the endpoint name formatter
    /// (`SendConfirmationEmail` → `send-confirmation-email`). The message type is inferred
    /// when `C` consumes one type; consumers of several types use
    /// [`BusBuilder::consumer_for`].
    pub fn consumer<M, C>(mut self, consumer: C) -> Self
    where
        M: Message,
        C: Consumer<M>,
    {
        self.auto.push(AutoConsumer {
            type_name: std::any::type_name::<C>().to_string(),
            registrations: vec![ConsumerRegistration::new::<M, C>(Arc::new(consumer))],
        });
        self
    }

    /// Adds a consumer of several message types on its own endpoint:
    /// `.consumer_for::<(OrderPlaced, OrderCancelled)>(c)`.
    pub fn consumer_for<Ms>(mut self, consumer: impl ConsumerOf<Ms>) -> Self {
        let type_name = type_name_of_val(&consumer);
        self.auto.push(AutoConsumer {
            type_name,
            registrations: Arc::new(consumer).registrations(),
        });
        self
    }

    /// Configures a receive endpoint by name.
    pub fn receive_endpoint(
        mut self,
        name: impl Into<String>,
        configure: impl FnOnce(EndpointConfigurator) -> EndpointConfigurator,
    ) -> Self {
        let e = configure(EndpointConfigurator::new(name));
        self.endpoints.push(e);
        self
    }

    /// How `.consumer(..)` names endpoints (default: kebab case).
    pub fn endpoint_name_formatter(mut self, formatter: impl EndpointNameFormatter) -> Self {
        self.formatter = Arc::new(formatter);
        self
    }

    /// Writes messages with `serializer` (default: MassTransit's JSON envelope). Both JSON
    /// serializers are always available for reading.
    pub fn serializer(mut self, serializer: impl Serializer) -> Self {
        self.serializers.set_default(Arc::new(serializer));
        self.serializer_chosen = true;
        self
    }

    /// Adds a serializer for reading its content type.
    pub fn deserializer(mut self, serializer: impl Serializer) -> Self {
        self.serializers.add_reader(Arc::new(serializer));
        self
    }

    /// Reads messages that have no content type as `content_type` instead of faulting them.
    pub fn default_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.serializers
            .set_missing_content_type(Some(content_type.into()));
        self
    }

    /// Default prefetch for every endpoint.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.defaults.prefetch = Some(prefetch.max(1));
        self
    }

    /// Default concurrency limit for every endpoint.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.defaults.concurrency = Some(limit.max(1));
        self
    }

    /// Default in-process retry for every endpoint without its own.
    pub fn retry(mut self, policy: Retry) -> Self {
        self.defaults.retry = Some(policy);
        self
    }

    /// Default delayed redelivery for every endpoint without its own.
    pub fn redelivery(mut self, policy: Retry) -> Self {
        self.defaults.redelivery = Some(policy);
        self
    }

    /// Default per-attempt timeout for every endpoint without its own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.defaults.timeout = Some(timeout);
        self
    }

    /// Whether `Fault<T>` is published when a message faults (default true).
    pub fn publish_faults(mut self, publish: bool) -> Self {
        self.defaults.publish_faults = publish;
        self
    }

    /// Default request timeout for request clients (30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Adds a `tower::Layer` around every endpoint's consume pipeline (outside the endpoint
    /// layers; first added is outermost).
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<ConsumeService> + Send + Sync + 'static,
        L::Service: Service<ReceiveContext, Response = (), Error = ConsumeError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<ReceiveContext>>::Future: Send + 'static,
    {
        self.consume_layers.push(ConsumeLayer::new(layer));
        self
    }

    /// Adds a `tower::Layer` to the publish/send pipeline (first added is outermost).
    pub fn send_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<SendService> + Send + Sync + 'static,
        L::Service:
            Service<OutgoingMessage, Response = (), Error = Error> + Clone + Send + Sync + 'static,
        <L::Service as Service<OutgoingMessage>>::Future: Send + 'static,
    {
        self.send_layers.push(SendLayer::new(layer));
        self
    }

    /// Adds an observer.
    pub fn observer(mut self, observer: impl BusObserver) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Adds a shared observer.
    pub fn observer_arc(mut self, observer: Arc<dyn BusObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Names the application in envelopes' `host` (MassTransit's assembly and version), for
    /// example `.application(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))`.
    pub fn application(mut self, name: impl Into<String>, version: impl Into<String>) -> Self {
        let mut host = self
            .host
            .take()
            .unwrap_or_else(|| HostInfo::current().clone());
        host.assembly = Some(name.into());
        host.assembly_version = Some(version.into());
        self.host = Some(host);
        self
    }

    /// Builds the bus: computes the topology and deploys it on the transport (connecting
    /// it). Publishing and sending work from here on; [`Bus::start`] starts consuming.
    pub async fn build(self) -> Result<Bus> {
        let transport: Arc<dyn Transport> =
            self.transport.unwrap_or_else(|| Arc::new(InMemory::new()));

        // Group auto-configured consumers by endpoint name, then merge with explicit endpoints.
        let mut order: Vec<String> = Vec::new();
        let mut by_name: HashMap<String, EndpointConfigurator> = HashMap::new();
        for e in self.endpoints {
            if e.name.trim().is_empty() {
                return Err(Error::config("an endpoint name is empty"));
            }
            match by_name.get_mut(&e.name) {
                Some(_) => {
                    return Err(Error::config(format!(
                        "the endpoint `{}` is configured twice",
                        e.name
                    )));
                }
                None => {
                    order.push(e.name.clone());
                    by_name.insert(e.name.clone(), e);
                }
            }
        }
        for auto in self.auto {
            let name = self.formatter.consumer(&auto.type_name);
            let entry = by_name.entry(name.clone()).or_insert_with(|| {
                order.push(name.clone());
                EndpointConfigurator::new(name.clone())
            });
            entry.registrations.extend(auto.registrations);
        }

        let mut serializers = self.serializers;
        if !self.serializer_chosen
            && let Some(preferred) = transport.default_serializer()
        {
            serializers.set_default(preferred);
        }
        let capabilities = transport.capabilities();
        let mut defaults = self.defaults.clone();
        if defaults.prefetch.is_none() && defaults.concurrency.is_none() {
            defaults.prefetch = transport.default_prefetch();
        }
        let mut plans = Vec::with_capacity(order.len());
        for name in order {
            let Some(config) = by_name.remove(&name) else {
                continue;
            };
            if config.registrations.is_empty() {
                return Err(Error::config(format!(
                    "the endpoint `{name}` has no consumers: give it a consumer or a handler \
                     (`e.consumer(..)`, `e.handler(..)`), or remove it"
                )));
            }
            if config.has_redelivery(&defaults) && !capabilities.delayed_delivery {
                return Err(Error::config(format!(
                    "endpoint `{name}` uses delayed redelivery, but the {} transport has no delayed delivery",
                    transport.system()
                )));
            }
            let address = transport.endpoint_address(&name);
            plans.push(config.into_plan(address, &defaults, &self.consume_layers));
        }
        let topology = Topology {
            endpoints: plans.iter().map(|p| p.topology.clone()).collect(),
        };

        let response_name = self.formatter.temporary("bus");
        let address = transport.temporary_endpoint_address(&response_name);
        let response_topology = EndpointTopology {
            name: response_name,
            address: address.clone(),
            message_types: Vec::new(),
            prefetch: crate::endpoint::default_prefetch(),
            concurrency: usize::from(crate::endpoint::default_prefetch()),
            temporary: true,
            bind_message_types: false,
            consumers: Vec::new(),
            extensions: Extensions::default(),
        };

        transport.deploy(&topology).await?;

        let observers = Observers::new(self.observers);
        let mut send: SendService = BoxCloneSyncService::new(TransportSender::new(
            transport.clone(),
            serializers.clone(),
            observers.clone(),
        ));
        for layer in self.send_layers.iter().rev() {
            send = layer.apply(send);
        }
        send = BoxCloneSyncService::new(SendTracingLayer::new(transport.system()).layer(send));

        let host = match self.host {
            Some(h) => Arc::new(h),
            None => current_host(),
        };
        let inner = BusInner {
            transport,
            serializers,
            send_pipeline: send,
            host,
            address,
            observers,
            topology,
            plans: Mutex::new(Some(plans)),
            requests: Arc::new(Requests::default()),
            response_topology,
            response: tokio::sync::OnceCell::new(),
            response_stop: CancellationToken::new(),
            request_timeout: self.request_timeout,
        };
        Ok(Bus {
            inner: Arc::new(inner),
        })
    }
}

fn type_name_of_val<T>(_: &T) -> String {
    std::any::type_name::<T>().to_string()
}
