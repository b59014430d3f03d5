//! The conformance suite on RabbitMQ (127.0.0.1:5672, guest/guest, or `BUSWAY_RABBITMQ_URL`).
//! Each test uses uniquely named endpoints and deletes its queues afterwards.

use async_trait::async_trait;
use busway::TransportMessage;
use busway::rabbitmq::RabbitMq;
use busway_integration_tests::TransportFixture;
use busway_integration_tests::rabbit::{transport_for, url};

struct RabbitFixture;

#[async_trait]
impl TransportFixture for RabbitFixture {
    type Transport = RabbitMq;

    fn name(&self) -> &'static str {
        "RabbitMQ"
    }

    async fn transport(&self) -> RabbitMq {
        transport_for(&url())
    }

    async fn take_messages(&self, transport: &RabbitMq, queue: &str) -> Vec<TransportMessage> {
        transport.take(queue, 1000).await.expect("basic.get works")
    }

    async fn queue_depth(&self, transport: &RabbitMq, queue: &str) -> usize {
        transport
            .queue_depth(queue)
            .await
            .expect("passive declare works") as usize
    }

    async fn delete_queues(&self, transport: &RabbitMq, queues: &[String]) {
        transport.delete(queues).await.expect("delete works");
    }
}

busway_integration_tests::conformance_suite!(RabbitFixture);
