//! A process running the tick saga (`busway_integration_tests::saga_worker`) on RabbitMQ with
//! its instances in PostgreSQL behind the consumer outbox; used by the two-process saga test.
//!
//! `saga-worker <worker-number> <queue> <table> <outbox-prefix>`; RabbitMQ and PostgreSQL
//! from `RABBITMQ_URL` and `DATABASE_URL` (the test's defaults otherwise). Prints `ready`
//! once consuming and `stopped` after a graceful shutdown on SIGTERM.

use std::time::Duration;

use busway::outbox::{EndpointOutboxExt, Outbox, OutboxOptions, PostgresStore};
use busway::saga::{EndpointSagaExt, PostgresSagaRepository};
use busway::{Bus, Retry};
use busway_integration_tests::{db, rabbit, saga_worker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, worker, queue, table, prefix] = args.as_slice() else {
        return Err("usage: saga-worker <worker-number> <queue> <table> <outbox-prefix>".into());
    };
    let worker: u32 = worker.parse()?;
    db::require_postgres();
    // A connection for each delivery in flight (16), the dispatcher and the inbox cleanup.
    let pool = busway::outbox::sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&db::postgres_url())
        .await?;
    let transport = rabbit::transport_for(&rabbit::url());
    let delivery = Bus::builder().transport(transport.clone()).build().await?;
    let options = OutboxOptions {
        poll_interval: Duration::from_millis(20),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        delivery_window: 64,
        ..OutboxOptions::default()
    };
    let store = PostgresStore::new(pool.clone()).tables(None, prefix)?;
    let outbox = Outbox::with_options(store, &delivery, options).await?;
    let dispatcher = outbox.start_dispatcher();
    let repo = PostgresSagaRepository::new(pool, table)?;
    let bus = Bus::builder()
        .transport(transport)
        .receive_endpoint(queue.clone(), move |e| {
            e.prefetch(64)
                .concurrency_limit(16)
                .retry(Retry::immediate(5))
                .transactional_outbox(&outbox)
                .state_machine(saga_worker::tick_machine(worker), repo)
        })
        .build()
        .await?;
    let running = bus.start().await?;
    println!("ready");
    running.run_until_signal().await?;
    dispatcher.stop().await;
    println!("stopped");
    Ok(())
}
