//! Configuring a receive endpoint: [`EndpointConfigurator`] and the defaults set on the bus
//! builder.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;
use tower_service::Service;

use crate::consumer::{Consumer, ConsumerConfigurator, ConsumerOf, ConsumerRegistration};
use crate::context::{ConsumeContext, ReceiveContext};
use crate::error::ConsumeError;
use crate::message::Message;
use crate::pipeline::{ConsumeLayer, ConsumeService, Retry};
use crate::topology::Extensions;

/// MassTransit's default prefetch: twice the CPU count, at least 16.
pub(crate) fn default_prefetch() -> u16 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    u16::try_from((cpus * 2).max(16)).unwrap_or(u16::MAX)
}

/// Configures one receive endpoint: its consumers, prefetch, concurrency and pipeline.
///
/// Used by value in `BusBuilder::receive_endpoint("name", |e| e.consumer(..).prefetch(32))`.
#[derive(Debug)]
pub struct EndpointConfigurator {
    pub(crate) name: String,
    pub(crate) prefetch: Option<u16>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) registrations: Vec<ConsumerRegistration>,
    pub(crate) retry: Option<Retry>,
    pub(crate) redelivery: Option<Retry>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) layers: Vec<ConsumeLayer>,
    pub(crate) attempt_layers: Vec<ConsumeLayer>,
    pub(crate) temporary: bool,
    pub(crate) bind_message_types: bool,
    pub(crate) publish_faults: Option<bool>,
    pub(crate) extensions: Extensions,
    pub(crate) errors: Vec<String>,
}

impl EndpointConfigurator {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            prefetch: None,
            concurrency: None,
            registrations: Vec::new(),
            retry: None,
            redelivery: None,
            timeout: None,
            layers: Vec::new(),
            attempt_layers: Vec::new(),
            temporary: false,
            bind_message_types: true,
            publish_faults: None,
            extensions: Extensions::default(),
            errors: Vec::new(),
        }
    }

    /// Makes `Bus::build` fail with a configuration error that names this endpoint and says
    /// `reason`: for extensions that check what they are given (a saga state machine that
    /// cannot work) from a configurator method that returns `Self`.
    pub fn config_error(mut self, reason: impl Into<String>) -> Self {
        self.errors.push(reason.into());
        self
    }

    /// The endpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a consumer of one message type; the type is inferred when `C` consumes only one.
    pub fn consumer<M, C>(mut self, consumer: C) -> Self
    where
        M: Message,
        C: Consumer<M>,
    {
        self.registrations
            .push(ConsumerRegistration::new::<M, C>(Arc::new(consumer)));
        self
    }

    /// Adds a consumer of several message types: `consumer_for::<(A, B)>(c)`.
    pub fn consumer_for<Ms>(mut self, consumer: impl ConsumerOf<Ms>) -> Self {
        self.registrations
            .extend(Arc::new(consumer).registrations());
        self
    }

    /// Adds a consumer with its own pipeline options (retry, timeout, concurrency, layers).
    pub fn consumer_with<M, C>(
        mut self,
        consumer: C,
        configure: impl FnOnce(ConsumerConfigurator) -> ConsumerConfigurator,
    ) -> Self
    where
        M: Message,
        C: Consumer<M>,
    {
        let config = configure(ConsumerConfigurator::default());
        self.registrations
            .push(ConsumerRegistration::new::<M, C>(Arc::new(consumer)).configure(config));
        self
    }

    /// Adds a handler function: `e.handler(|ctx: ConsumeContext<Ping>| async move { .. })`.
    pub fn handler<M, F, Fut>(mut self, handler: F) -> Self
    where
        M: Message,
        F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), ConsumeError>> + Send + 'static,
    {
        self.registrations
            .push(ConsumerRegistration::handler::<M, F, Fut>(handler));
        self
    }

    /// Adds a prepared registration.
    pub fn registration(mut self, registration: ConsumerRegistration) -> Self {
        self.registrations.push(registration);
        self
    }

    /// How many unacknowledged messages the broker may hand this endpoint
    /// (default `max(2 × CPUs, 16)`).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }

    /// How many messages this endpoint processes at once (default: the prefetch).
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency = Some(limit.max(1));
        self
    }

    /// In-process retry for every consumer at the endpoint.
    pub fn retry(mut self, policy: Retry) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Delayed redelivery: after in-process retries fail, send the message back to the
    /// endpoint after each of the policy's intervals (needs transport delayed delivery).
    pub fn redelivery(mut self, policy: Retry) -> Self {
        self.redelivery = Some(policy);
        self
    }

    /// Limits each consume attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Adds a `tower::Layer` around the endpoint's consume pipeline (first added is
    /// outermost; all of them run inside the bus-level layers).
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
        self.layers.push(ConsumeLayer::new(layer));
        self
    }

    /// Adds a `tower::Layer` that runs once per consume attempt: inside retry and delayed
    /// redelivery, around the timeout and the consumers. Transactional layers belong here
    /// (the transactional outbox opens one database transaction per attempt, so a retry
    /// starts from a clean slate).
    pub fn attempt_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<ConsumeService> + Send + Sync + 'static,
        L::Service: Service<ReceiveContext, Response = (), Error = ConsumeError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<ReceiveContext>>::Future: Send + 'static,
    {
        self.attempt_layers.push(ConsumeLayer::new(layer));
        self
    }

    /// Makes the endpoint temporary: its queue is deleted when the bus stops.
    pub fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    /// Whether the consumed message types are bound to the endpoint so publishes reach it
    /// (default true). With `false`, only sends to the endpoint's address arrive.
    pub fn bind_message_types(mut self, bind: bool) -> Self {
        self.bind_message_types = bind;
        self
    }

    /// Whether `Fault<T>` is published when a message faults (default true). Faults are
    /// always sent to the message's fault or response address when it has one.
    pub fn publish_faults(mut self, publish: bool) -> Self {
        self.publish_faults = Some(publish);
        self
    }

    /// Stores a transport-specific option (used by transport crates' extension traits).
    pub fn extension<T: std::any::Any + Send + Sync>(mut self, value: T) -> Self {
        self.extensions.insert(value);
        self
    }

    /// The transport-specific options.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }
}

/// Defaults every endpoint starts from (set on the bus builder).
#[derive(Debug, Clone)]
pub(crate) struct EndpointDefaults {
    pub(crate) prefetch: Option<u16>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) retry: Option<Retry>,
    pub(crate) redelivery: Option<Retry>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) publish_faults: bool,
}

impl Default for EndpointDefaults {
    fn default() -> Self {
        Self {
            prefetch: None,
            concurrency: None,
            retry: None,
            redelivery: None,
            timeout: None,
            publish_faults: true,
        }
    }
}
