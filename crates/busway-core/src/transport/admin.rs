//! One admin interface over every transport's queues, for tests, tools and operators.

use async_trait::async_trait;

use crate::error::Result;
use crate::transport::message::TransportMessage;

/// Looking into and clearing the queues a bus uses, named as busway names them: an
/// endpoint (`orders`), its error queue (`orders_error`) and its skipped queue
/// (`orders_skipped`). Each transport maps these onto its own entities (RabbitMQ and Service
/// Bus queues; on Kafka the endpoint's topic and its dead-letter topics).
///
/// Every transport implements it; the conformance suite reads `_error` and `_skipped`
/// through it, so what a test checks is what an operator's tool sees.
#[async_trait]
pub trait QueueAdmin: Send + Sync {
    /// Messages ready in `queue` (not counting ones delivered and not yet settled); `0` for
    /// a queue that does not exist.
    async fn queue_depth(&self, queue: &str) -> Result<u64>;

    /// Removes and returns up to `max` ready messages from `queue`, oldest first, each with
    /// its headers as the broker holds them.
    async fn take_messages(&self, queue: &str, max: usize) -> Result<Vec<TransportMessage>>;

    /// Removes every ready message from `queue`; returns how many.
    async fn purge_queue(&self, queue: &str) -> Result<u64>;

    /// Deletes `queues` (ones that do not exist are not an error).
    async fn delete_queues(&self, queues: &[String]) -> Result<()>;
}
