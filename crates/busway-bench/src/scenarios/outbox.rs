//! `outbox`: events committed through the transactional outbox (PostgreSQL) and delivered by
//! its dispatcher, vs the same events published directly; both on busway over RabbitMQ, with
//! the same window of operations in flight. The ratio is the price of the outbox.
//! `outbox-batch` commits ten events per transaction, as a handler that raises several
//! events does; the commit then costs a tenth per event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::BoxError;
use busway::outbox::sqlx::{self, PgPool};
use busway::outbox::{Dispatcher, Outbox, OutboxOptions, PostgresStore};
use busway::prelude::*;
use busway::rabbitmq::RabbitMq;

use super::{BenchTransport, BuswaySide, endpoint_bus, endpoint_name};
use crate::message::{BenchMessage, Tally, WAIT, send_open_loop};
use crate::{Scenario, Settings, Side};

/// The outbox scenario.
#[derive(Debug)]
pub struct OutboxScenario {
    database_url: String,
    rabbitmq_url: String,
    per_transaction: usize,
}

impl OutboxScenario {
    /// On `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and
    /// `BUSWAY_RABBITMQ_URL`.
    pub fn from_env() -> Self {
        Self {
            database_url: std::env::var("DATABASE_URL")
                .ok()
                .filter(|u| u.starts_with("postgres"))
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into()),
            rabbitmq_url: RabbitMq::env_url(),
            per_transaction: 1,
        }
    }

    /// The same with [`BATCH`] events committed per transaction (`outbox-batch`).
    pub fn batched_from_env() -> Self {
        Self {
            per_transaction: BATCH,
            ..Self::from_env()
        }
    }
}

/// Events per transaction in `outbox-batch`.
pub const BATCH: usize = 10;

#[async_trait]
impl Scenario for OutboxScenario {
    fn name(&self) -> &'static str {
        if self.per_transaction > 1 {
            "outbox-batch"
        } else {
            "outbox"
        }
    }

    fn description(&self) -> String {
        format!(
            "busway: commit through the PostgreSQL outbox ({} event(s) per transaction) + dispatcher vs direct publish, both to RabbitMQ",
            self.per_transaction
        )
    }

    async fn available(&self) -> Result<(), String> {
        super::rabbitmq::broker_available(&self.rabbitmq_url)?;
        if !super::rabbitmq::reachable(&self.database_url, 5432) {
            return Err("PostgreSQL is not reachable (start it with scripts/services)".into());
        }
        Ok(())
    }

    async fn busway(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(u32::try_from(settings.window.clamp(1, 64)).unwrap_or(16))
            .connect(&self.database_url)
            .await?;
        let store = PostgresStore::new(pool.clone()).tables(None, "bench_")?;
        Ok(Box::new(OutboxSide {
            pool,
            store,
            url: self.rabbitmq_url.clone(),
            settings: settings.clone(),
            per_transaction: self.per_transaction,
            backlog: None,
            created: Vec::new(),
        }))
    }

    async fn raw(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        let url = self.rabbitmq_url.clone();
        Ok(BuswaySide::boxed(
            Arc::new(move |_: &str| Ok(RabbitMq::new(&url)?)),
            settings,
        ))
    }

    fn sides(&self) -> (&'static str, &'static str) {
        ("outbox", "direct publish")
    }
}

struct OutboxSide {
    pool: PgPool,
    store: PostgresStore,
    url: String,
    settings: Settings,
    per_transaction: usize,
    backlog: Option<(Bus, Arc<Tally>, Dispatcher, Outbox<PostgresStore>)>,
    created: Vec<(RabbitMq, String)>,
}

impl OutboxSide {
    async fn endpoint(
        &mut self,
        phase: &str,
        n: usize,
        latency: bool,
    ) -> Result<(Bus, Arc<Tally>, Outbox<PostgresStore>, Dispatcher), BoxError> {
        let name = endpoint_name(phase);
        let transport = RabbitMq::new(&self.url)?;
        let tally = Tally::new(n, latency);
        let bus = endpoint_bus(
            Bus::builder().transport(transport.clone()),
            &name,
            self.settings.prefetch,
            tally.clone(),
        )
        .build()
        .await?;
        self.created.push((transport, name));
        // The dispatcher keeps as many deliveries in flight as the direct publisher does.
        let options = OutboxOptions {
            delivery_window: self.settings.window,
            ..OutboxOptions::default()
        };
        let outbox = Outbox::with_options(self.store.clone(), &bus, options).await?;
        // Rows a crashed earlier run left behind would be delivered into this run.
        sqlx::query("DELETE FROM bench_outbox")
            .execute(&self.pool)
            .await?;
        let dispatcher = outbox.start_dispatcher();
        Ok((bus, tally, outbox, dispatcher))
    }

    /// Commits `n` events, `per_transaction` to a transaction, with as many transactions in
    /// flight as fit the window of messages.
    /// Removes the endpoints of a finished phase (see `PublishingSide::end_phase`).
    async fn end_phase(&mut self) {
        for (t, name) in self.created.drain(..) {
            t.remove(&name).await;
            let _ = busway::Transport::close(&t).await;
        }
    }

    async fn commit_all(&self, outbox: &Outbox<PostgresStore>, n: usize) -> Result<(), BoxError> {
        use futures_util::StreamExt;
        let per = self.per_transaction.max(1);
        let payload = self.settings.payload;
        let mut commits = futures_util::stream::iter((0..n).step_by(per))
            .map(|first| {
                let events = (first..(first + per).min(n))
                    .map(|i| BenchMessage::new(i as u64, payload))
                    .collect();
                commit(&self.pool, outbox, events)
            })
            .buffer_unordered((self.settings.window / per).max(1));
        while let Some(done) = commits.next().await {
            done?;
        }
        Ok(())
    }
}

/// One transaction with `events` written through the outbox.
async fn commit(
    pool: &PgPool,
    outbox: &Outbox<PostgresStore>,
    events: Vec<BenchMessage>,
) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    for m in events {
        outbox.publish(&mut tx, m).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[async_trait]
impl Side for OutboxSide {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let (bus, tally, outbox, dispatcher) = self.endpoint("outbox-backlog", n, false).await?;
        self.commit_all(&outbox, n).await?;
        self.backlog = Some((bus, tally, dispatcher, outbox));
        Ok(())
    }

    async fn consume(&mut self, _n: usize) -> Result<Duration, BoxError> {
        let (bus, tally, dispatcher, _outbox) =
            self.backlog.take().ok_or("consume before publish")?;
        let running = bus.start().await?;
        tally.wait(WAIT).await?;
        dispatcher.stop().await;
        running.shutdown().await?;
        self.end_phase().await;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let (bus, tally, outbox, dispatcher) = self.endpoint("outbox-e2e", n, false).await?;
        let running = bus.start().await?;
        let started = Instant::now();
        self.commit_all(&outbox, n).await?;
        tally.wait(WAIT).await?;
        let took = started.elapsed();
        dispatcher.stop().await;
        running.shutdown().await?;
        self.end_phase().await;
        Ok(took)
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let (bus, tally, outbox, dispatcher) = self.endpoint("outbox-latency", n, true).await?;
        let running = bus.start().await?;
        let pool = self.pool.clone();
        send_open_loop(n, rate, self.settings.payload, |m| {
            let (pool, outbox) = (pool.clone(), outbox.clone());
            async move { commit(&pool, &outbox, vec![m]).await }
        })
        .await?;
        tally.wait(WAIT).await?;
        dispatcher.stop().await;
        running.shutdown().await?;
        self.end_phase().await;
        Ok(tally.latencies())
    }

    async fn cleanup(&mut self) {
        self.end_phase().await;
        self.pool.close().await;
    }
}
