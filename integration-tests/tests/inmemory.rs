//! The conformance suite on the in-memory transport.

use async_trait::async_trait;
use busway::{InMemory, TransportMessage};
use busway_integration_tests::TransportFixture;

struct InMemoryFixture;

#[async_trait]
impl TransportFixture for InMemoryFixture {
    type Transport = InMemory;

    fn name(&self) -> &'static str {
        "in-memory"
    }

    async fn transport(&self) -> InMemory {
        InMemory::new()
    }

    async fn take_messages(&self, transport: &InMemory, queue: &str) -> Vec<TransportMessage> {
        transport.take(queue)
    }

    async fn queue_depth(&self, transport: &InMemory, queue: &str) -> usize {
        transport.queue_len(queue)
    }
}

busway_integration_tests::conformance_suite!(InMemoryFixture);
