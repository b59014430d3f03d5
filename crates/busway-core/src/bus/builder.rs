//! [`BusBuilder`]: registrations, endpoints, defaults, layers and serializers, turned into a
//! [`Bus`] with its topology deployed.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;

use crate::bus::{
    Bus, BusShared, DEFAULT_REQUEST_TIMEOUT, Requests, ResponseEndpoint, ResponseStarter, Started,
    Starter,
};
use crate::consumer::{Consumer, ConsumerOf, ConsumerRegistration};
use crate::context::ReceiveContext;
use crate::endpoint::config::{EndpointConfigurator, EndpointDefaults, default_prefetch};
use crate::endpoint::plan::EndpointPlan;
use crate::endpoint::receive::{start_endpoint, start_endpoints};
use crate::error::{ConsumeError, Error, Result};
use crate::host::HostInfo;
use crate::inmemory::InMemory;
use crate::message::Message;
use crate::naming::{EndpointNameFormatter, KebabCaseEndpointNameFormatter};
use crate::observer::{BusObserver, Observers};
use crate::outgoing::{OutgoingMessage, SendService, current_host};
use crate::pipeline::transport_sender::TransportSender;
use crate::pipeline::{ConsumeLayer, ConsumeService, Retry, SendLayer, SendTracingLayer};
use crate::request::ResponseSink;
use crate::sender::SendContext;
use crate::serializer::{Serializer, Serializers};
use crate::topology::{EndpointTopology, Extensions, Topology};
use crate::transport::Transport;

impl Bus {
    /// A builder with the in-memory transport and no consumers.
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
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
    errors: Vec<String>,
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
            errors: Vec::new(),
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

    /// Adds registrations (one consumer of several message types, as an extension such as
    /// a saga builds them) on an endpoint named after `type_name` by the endpoint name
    /// formatter, as [`BusBuilder::consumer`] does for a consumer type.
    pub fn consumer_registrations(
        mut self,
        type_name: impl Into<String>,
        registrations: Vec<ConsumerRegistration>,
    ) -> Self {
        self.auto.push(AutoConsumer {
            type_name: type_name.into(),
            registrations,
        });
        self
    }

    /// Makes [`BusBuilder::build`] fail with a configuration error that says `reason`: for
    /// extensions that check what they are given (a saga state machine that cannot work)
    /// from a builder method that returns `Self`.
    pub fn config_error(mut self, reason: impl Into<String>) -> Self {
        self.errors.push(reason.into());
        self
    }

    /// A message scheduler endpoint named `name` for MassTransit services (what their
    /// `UseMessageScheduler(new Uri("queue:<name>"))` sends `ScheduleMessage` to): each
    /// payload is sent to its destination at its time through the transport's delayed
    /// delivery. Cancelling is not supported (a `CancelScheduledMessage` lands in
    /// `<name>_skipped`); see [`crate::scheduling`].
    pub fn message_scheduler_endpoint(self, name: impl Into<String>) -> Self {
        self.receive_endpoint(name, |e| e.handler(crate::scheduler::schedule))
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
        let mut errors = self.errors;
        errors.extend(self.endpoints.iter().flat_map(|e| {
            e.errors
                .iter()
                .map(|reason| format!("endpoint `{}`: {reason}", e.name))
        }));
        if !errors.is_empty() {
            return Err(Error::config(errors.join("; ")));
        }
        let transport: Arc<dyn Transport> =
            self.transport.unwrap_or_else(|| Arc::new(InMemory::new()));
        let observers = Observers::new(self.observers);

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

        let profile = transport.profile();
        let mut serializers = self.serializers;
        if !self.serializer_chosen
            && let Some(preferred) = profile.default_serializer.clone()
        {
            serializers.set_default(preferred);
        }
        let capabilities = profile.capabilities;
        let mut defaults = self.defaults.clone();
        if defaults.prefetch.is_none() && defaults.concurrency.is_none() {
            defaults.prefetch = profile.default_prefetch;
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
                    profile.system
                )));
            }
            let address = transport.endpoint_address(&name);
            plans.push(config.into_plan(address, &defaults, &self.consume_layers, &observers));
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
            prefetch: default_prefetch(),
            concurrency: usize::from(default_prefetch()),
            temporary: true,
            bind_message_types: false,
            consumers: Vec::new(),
            extensions: Extensions::default(),
        };

        transport.deploy(&topology).await?;

        let mut send: SendService = BoxCloneSyncService::new(TransportSender::new(
            transport.clone(),
            serializers.clone(),
            observers.clone(),
        ));
        for layer in self.send_layers.iter().rev() {
            send = layer.apply(send);
        }
        send = BoxCloneSyncService::new(SendTracingLayer::new(profile.system).layer(send));

        let host = match self.host {
            Some(h) => Arc::new(h),
            None => current_host(),
        };
        let shared = BusShared {
            cancelled_schedules: Default::default(),
            send: SendContext {
                transport,
                system: profile.system,
                delivery_headers: profile.delivery_headers,
                serializers,
                pipeline: send,
                host,
                address,
            },
            topology,
            requests: Requests::default(),
            request_timeout: self.request_timeout,
            response: ResponseEndpoint {
                start: response_starter(response_topology.clone(), observers.clone()),
                topology: response_topology,
                task: tokio::sync::OnceCell::new(),
                stop: CancellationToken::new(),
            },
            starter: Mutex::new(Some(endpoints_starter(plans, observers))),
        };
        Ok(Bus::from_shared(shared))
    }
}

/// Starts the planned endpoints, all or none.
fn endpoints_starter(plans: Vec<EndpointPlan>, observers: Observers) -> Starter {
    Box::new(move |bus: Bus| {
        Box::pin(async move {
            let stop = CancellationToken::new();
            let hard = CancellationToken::new();
            let endpoints = start_endpoints(&bus, &observers, plans, &stop, &hard).await?;
            Ok(Started {
                stop,
                hard,
                endpoints,
            })
        })
    })
}

/// Starts the response endpoint: an ordinary endpoint whose one consumer completes waiting
/// requests. It does not publish faults (a response nobody can read goes to its `_error`).
fn response_starter(topology: EndpointTopology, observers: Observers) -> ResponseStarter {
    Box::new(move |bus: Bus, stop: CancellationToken| {
        let plan = EndpointPlan {
            topology: topology.clone(),
            pipeline: BoxCloneSyncService::new(ResponseSink),
            publish_faults: false,
        };
        let observers = observers.clone();
        Box::pin(async move {
            // Responses are settled at once; nothing in flight needs cancelling.
            let hard = CancellationToken::new();
            start_endpoint(&bus, &observers, plan, &stop, &hard).await
        })
    })
}

fn type_name_of_val<T>(_: &T) -> String {
    std::any::type_name::<T>().to_string()
}
