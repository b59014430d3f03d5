//! Publishes or consumes `OrderPlaced` on Kafka: topic `Contracts.OrderPlaced`, raw JSON
//! values with MassTransit rider headers, the customer id as the key (orders of one customer
//! stay in order).
//!
//! Run with:
//!
//! ```text
//! cargo run --example kafka-orders --features kafka -- consume --count 10   # consumer group order-confirmation
//! cargo run --example kafka-orders --features kafka -- publish --count 10
//! ```
//!
//! The brokers come from `BUSWAY_KAFKA_BROKERS` (default `127.0.0.1:9092`). Consumed orders
//! are printed one JSON line each.

use busway::BoxError;
use busway::kafka::Kafka;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mode = busway_examples::parse_args(std::env::args().skip(1)).map_err(BoxError::from)?;
    busway_examples::run(Kafka::from_env()?, mode).await
}
