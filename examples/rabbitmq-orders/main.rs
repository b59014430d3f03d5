//! Publishes or consumes `OrderPlaced` on RabbitMQ, interoperable with MassTransit services
//! (`urn:message:Contracts:OrderPlaced`, exchange `Contracts:OrderPlaced`).
//!
//! Run with:
//!
//! ```text
//! cargo run --example rabbitmq-orders --features rabbitmq -- consume --count 10   # endpoint order-confirmation
//! cargo run --example rabbitmq-orders --features rabbitmq -- publish --count 10
//! ```
//!
//! The broker URL comes from `BUSWAY_RABBITMQ_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). Consumed orders are printed one JSON line each.

use busway::BoxError;
use busway::rabbitmq::RabbitMq;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mode = busway_examples::parse_args(std::env::args().skip(1)).map_err(BoxError::from)?;
    busway_examples::run(RabbitMq::from_env()?, mode).await
}
