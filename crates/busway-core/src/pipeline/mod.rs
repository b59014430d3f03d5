//! The consume and send pipelines are `tower` services. This module has the built-in layers
//! and the type-erased forms user layers are stored in.
//!
//! Consume side: every stage is a `tower::Service<ReceiveContext, Response = (), Error =
//! ConsumeError>`. An endpoint's stack, outermost first, is: tracing, bus layers, endpoint
//! layers, delayed redelivery, retry, per-attempt layers, timeout, then the dispatcher, which
//! calls each matching consumer's own stack (consumer layers, concurrency limit, retry,
//! timeout, consumer).
//!
//! Send side: `tower::Service<OutgoingMessage, Response = (), Error = Error>`: tracing, user
//! send layers, then serialization and the transport.

use std::sync::Arc;

use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;

use crate::context::ReceiveContext;
use crate::error::{ConsumeError, Error};
use crate::outgoing::{OutgoingMessage, SendService};

mod in_memory_outbox;
mod redelivery;
mod retry;
mod timeout;
mod tracing_layer;
pub(crate) mod transport_sender;

pub use in_memory_outbox::{InMemoryOutbox, InMemoryOutboxLayer};
pub use redelivery::RedeliveryLayer;
pub use retry::{ErrorFilter, Retry, RetryLayer};
pub use timeout::TimeoutLayer;
// The services the layers make: nameable (they are the layers' `Service` types), not
// documented.
#[doc(hidden)]
pub use redelivery::RedeliveryService;
#[doc(hidden)]
pub use retry::RetryService;
#[doc(hidden)]
pub use timeout::TimeoutService;
pub use tower::limit::{ConcurrencyLimit, ConcurrencyLimitLayer};
pub use tracing_layer::{ConsumeTracingLayer, SendTracingLayer};
#[doc(hidden)]
pub use tracing_layer::{ConsumeTracingService, SendTracingService};

/// The type-erased consume pipeline: a cloneable `tower::Service` from [`ReceiveContext`].
pub type ConsumeService = BoxCloneSyncService<ReceiveContext, (), ConsumeError>;

/// A user layer for the consume pipeline, type-erased so it can be stored in a builder.
#[derive(Clone)]
pub struct ConsumeLayer(Arc<dyn Fn(ConsumeService) -> ConsumeService + Send + Sync>);

impl ConsumeLayer {
    /// Erases any `tower::Layer` whose service consumes [`ReceiveContext`].
    pub fn new<L>(layer: L) -> Self
    where
        L: Layer<ConsumeService> + Send + Sync + 'static,
        L::Service: Service<ReceiveContext, Response = (), Error = ConsumeError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<ReceiveContext>>::Future: Send + 'static,
    {
        Self(Arc::new(move |inner| {
            BoxCloneSyncService::new(layer.layer(inner))
        }))
    }

    /// Wraps `inner`.
    pub fn apply(&self, inner: ConsumeService) -> ConsumeService {
        (self.0)(inner)
    }
}

impl std::fmt::Debug for ConsumeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsumeLayer")
    }
}

/// A user layer for the send pipeline, type-erased.
#[derive(Clone)]
pub struct SendLayer(Arc<dyn Fn(SendService) -> SendService + Send + Sync>);

impl SendLayer {
    /// Erases any `tower::Layer` whose service takes [`OutgoingMessage`].
    pub fn new<L>(layer: L) -> Self
    where
        L: Layer<SendService> + Send + Sync + 'static,
        L::Service:
            Service<OutgoingMessage, Response = (), Error = Error> + Clone + Send + Sync + 'static,
        <L::Service as Service<OutgoingMessage>>::Future: Send + 'static,
    {
        Self(Arc::new(move |inner| {
            BoxCloneSyncService::new(layer.layer(inner))
        }))
    }

    /// Wraps `inner`.
    pub fn apply(&self, inner: SendService) -> SendService {
        (self.0)(inner)
    }
}

impl std::fmt::Debug for SendLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendLayer")
    }
}

/// Applies layers so the first in the list is the outermost.
pub(crate) fn apply_consume_layers(
    layers: &[ConsumeLayer],
    inner: ConsumeService,
) -> ConsumeService {
    layers
        .iter()
        .rev()
        .fold(inner, |svc, layer| layer.apply(svc))
}
