//! The plan of an endpoint: its topology and its consume pipeline, built from its
//! configuration and the bus defaults.

use tower::util::BoxCloneSyncService;
use tower_layer::Layer;

use crate::consumer::Dispatcher;
use crate::endpoint::config::{EndpointConfigurator, EndpointDefaults, default_prefetch};
use crate::observer::Observers;
use crate::pipeline::{
    ConsumeLayer, ConsumeService, ConsumeTracingLayer, RedeliveryLayer, RetryLayer, TimeoutLayer,
    apply_consume_layers,
};
use crate::topology::EndpointTopology;
use crate::urn::Urn;

/// An endpoint ready to run: its topology and its pipeline.
pub(crate) struct EndpointPlan {
    pub(crate) topology: EndpointTopology,
    pub(crate) pipeline: ConsumeService,
    pub(crate) publish_faults: bool,
}

impl EndpointConfigurator {
    /// The endpoint's plan: its topology at `address`, and its pipeline (outermost first:
    /// tracing, bus layers, endpoint layers, delayed redelivery, retry, per-attempt layers,
    /// timeout, the dispatcher).
    pub(crate) fn into_plan(
        self,
        address: String,
        defaults: &EndpointDefaults,
        bus_layers: &[ConsumeLayer],
        observers: &Observers,
    ) -> EndpointPlan {
        let (prefetch, concurrency) = match (
            self.prefetch.or(defaults.prefetch),
            self.concurrency.or(defaults.concurrency),
        ) {
            (Some(p), Some(c)) => (p, c),
            (Some(p), None) => (p, usize::from(p)),
            (None, Some(c)) => (u16::try_from((c * 12 / 10).max(c)).unwrap_or(u16::MAX), c),
            (None, None) => {
                let p = default_prefetch();
                (p, usize::from(p))
            }
        };
        let mut consumers = Vec::new();
        let mut message_types: Vec<Urn> = Vec::new();
        for r in &self.registrations {
            if !consumers.contains(&r.consumer_type) {
                consumers.push(r.consumer_type.clone());
            }
            if !message_types.contains(&r.message_type) {
                message_types.push(r.message_type.clone());
            }
        }
        let mut svc: ConsumeService =
            BoxCloneSyncService::new(Dispatcher::new(self.registrations, observers));
        if let Some(t) = self.timeout.or(defaults.timeout) {
            svc = BoxCloneSyncService::new(TimeoutLayer::new(t).layer(svc));
        }
        svc = apply_consume_layers(&self.attempt_layers, svc);
        if let Some(r) = self.retry.or_else(|| defaults.retry.clone()) {
            svc = BoxCloneSyncService::new(RetryLayer::new(r).layer(svc));
        }
        if let Some(r) = self.redelivery.or_else(|| defaults.redelivery.clone()) {
            svc = BoxCloneSyncService::new(RedeliveryLayer::new(r).layer(svc));
        }
        svc = apply_consume_layers(&self.layers, svc);
        svc = apply_consume_layers(bus_layers, svc);
        svc = BoxCloneSyncService::new(ConsumeTracingLayer.layer(svc));
        EndpointPlan {
            topology: EndpointTopology {
                name: self.name,
                address,
                message_types,
                prefetch,
                concurrency,
                temporary: self.temporary,
                bind_message_types: self.bind_message_types,
                consumers,
                extensions: self.extensions,
            },
            pipeline: svc,
            publish_faults: self.publish_faults.unwrap_or(defaults.publish_faults),
        }
    }

    pub(crate) fn has_redelivery(&self, defaults: &EndpointDefaults) -> bool {
        self.redelivery.is_some() || defaults.redelivery.is_some()
    }
}
