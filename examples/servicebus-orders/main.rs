//! Publishes or consumes `OrderPlaced` on Azure Service Bus with MassTransit's topology:
//! topic `Contracts/OrderPlaced`, queue `order-confirmation`, and a subscription
//! `order-confirmation` on the topic that forwards to the queue.
//!
//! Run with:
//!
//! ```text
//! export BUSWAY_ASB_CONNECTION_STRING='Endpoint=sb://<ns>.servicebus.windows.net/;SharedAccessKeyName=..;SharedAccessKey=..'
//! cargo run --example servicebus-orders --features azure-servicebus -- consume --count 10
//! cargo run --example servicebus-orders --features azure-servicebus -- publish --count 10
//! ```
//!
//! `BUSWAY_ASB_BASE_URL` (optional) sends the requests somewhere else than
//! `https://<ns>.servicebus.windows.net`: the test suite points it at its local stand-in.
//! Consumed orders are printed one JSON line each.

use busway::BoxError;
use busway::servicebus::ServiceBus;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mode = busway_examples::parse_args(std::env::args().skip(1)).map_err(BoxError::from)?;
    busway_examples::run(ServiceBus::from_env()?, mode).await
}
