//! The conformance suite on the in-memory transport.

use async_trait::async_trait;
use busway::InMemory;
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
}

busway_integration_tests::conformance_suite!(InMemoryFixture);
