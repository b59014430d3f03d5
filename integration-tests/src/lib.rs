//! The transport conformance suite: one set of behaviour tests that every transport must
//! pass, plus helpers for transport-specific fault tests.
//!
//! A transport crate's test file implements [`TransportFixture`] and expands
//! [`conformance_suite!`](crate::conformance_suite) once:
//!
//! ```text
//! struct Fixture;
//! #[async_trait::async_trait]
//! impl busway_integration_tests::TransportFixture for Fixture { /* ... */ }
//! busway_integration_tests::conformance_suite!(Fixture);
//! ```

pub mod conformance;
pub mod db;
pub mod kafka;
pub mod rabbit;
pub mod saga_worker;
pub mod servicebus;
pub mod support;

use async_trait::async_trait;
use busway::Transport;
use busway::transport::QueueAdmin;

/// What the conformance suite needs from a transport under test: the transport, connected.
/// The suite reads and clears queues through the transport's own [`QueueAdmin`], the
/// interface operators' tools use too.
#[async_trait]
pub trait TransportFixture: Send + Sync + 'static {
    /// The transport type; clones share one connection/broker.
    type Transport: Transport + QueueAdmin + Clone;

    /// A human name for messages (`in-memory`, `RabbitMQ`).
    fn name(&self) -> &'static str;

    /// A connected transport. Panics with a message that names the service and how to start
    /// it when the service is unreachable (a test must never pass without its broker).
    async fn transport(&self) -> Self::Transport;

    /// Deletes what a test created: by default `queues` through [`QueueAdmin`].
    async fn cleanup(&self, transport: &Self::Transport, queues: &[String]) {
        transport
            .delete_queues(queues)
            .await
            .unwrap_or_else(|e| panic!("{}: deleting {queues:?} failed: {e}", self.name()));
    }
}
