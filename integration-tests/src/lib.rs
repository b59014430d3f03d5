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
pub mod servicebus;
pub mod support;

use async_trait::async_trait;
use busway::{Transport, TransportMessage};

/// What the conformance suite needs from a transport under test.
#[async_trait]
pub trait TransportFixture: Send + Sync + 'static {
    /// The transport type; clones share one connection/broker.
    type Transport: Transport + Clone;

    /// A human name for messages (`in-memory`, `RabbitMQ`).
    fn name(&self) -> &'static str;

    /// A connected transport. Panics with a message that names the service and how to start
    /// it when the service is unreachable (a test must never pass without its broker).
    async fn transport(&self) -> Self::Transport;

    /// Removes and returns the messages waiting in `queue` (used to read `_error` and
    /// `_skipped` queues).
    async fn take_messages(
        &self,
        transport: &Self::Transport,
        queue: &str,
    ) -> Vec<TransportMessage>;

    /// Messages waiting in `queue` (not counting unacknowledged ones).
    async fn queue_depth(&self, transport: &Self::Transport, queue: &str) -> usize;

    /// Deletes queues a test created (no-op where nothing outlives the test).
    async fn delete_queues(&self, transport: &Self::Transport, queues: &[String]) {
        let _ = (transport, queues);
    }
}
