//! `saga` and `saga-memory`: events through a counter saga (100 instances, each event adds
//! one and publishes an acknowledgement), on the in-memory transport so that what is
//! measured is the saga's own work.
//!
//! - `saga`: busway's state machine on `PostgresSagaRepository` behind the consumer outbox,
//!   against a handler written by hand with sqlx doing the same work in one transaction:
//!   the inbox row, `SELECT .. FOR UPDATE` of the instance, insert or update, the outbox row
//!   of the acknowledgement, commit.
//! - `saga-memory`: the state machine on `InMemorySagaRepository`, against a handler over a
//!   `Mutex<HashMap>` of JSON rows with a version (the same serde work), publishing the
//!   acknowledgement after the update.
//!
//! Each side counts an event when its update is done (just before the commit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use busway::outbox::sqlx::{self, PgPool};
use busway::outbox::{EndpointOutboxExt, Outbox, PostgresStore};
use busway::prelude::*;
use busway::saga::{
    Activities, EndpointSagaExt, InMemorySagaRepository, PostgresSagaRepository, StateMachine,
};
use busway::{BoxError, BusBuilder, ConsumeErrorKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::PublishingSide;
use crate::message::{BenchMessage, Tally};
use crate::{Scenario, Settings, Side};

/// How many saga instances the events are spread over.
const INSTANCES: u64 = 100;

/// What the saga publishes for each event.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
pub struct BenchAck {
    /// The instance.
    pub counter_id: Uuid,
    /// The event's sequence number.
    pub seq: u64,
}

/// The counter's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchCounter {
    /// Events applied.
    pub count: u64,
}

/// The instance an event belongs to: 100 instances, every 100th event on the same one.
fn instance_of(seq: u64) -> Uuid {
    Uuid::from_u64_pair(0xB0B5, seq % INSTANCES)
}

/// Where instances live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Memory,
}

/// The saga scenarios.
#[derive(Debug)]
pub struct SagaScenario {
    store: Store,
    database_url: String,
}

impl SagaScenario {
    /// On PostgreSQL (`DATABASE_URL`, default the local `test` database).
    pub fn postgres() -> Self {
        Self {
            store: Store::Postgres,
            database_url: std::env::var("DATABASE_URL")
                .ok()
                .filter(|u| u.starts_with("postgres"))
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into()),
        }
    }

    /// On the in-memory repository.
    pub fn memory() -> Self {
        Self {
            store: Store::Memory,
            database_url: String::new(),
        }
    }

    async fn side(
        &self,
        settings: &Settings,
        hand_written: bool,
    ) -> Result<Box<dyn Side>, BoxError> {
        let pool = match self.store {
            Store::Postgres => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(u32::from(settings.prefetch.clamp(4, 32)))
                    .connect(&self.database_url)
                    .await?,
            ),
            Store::Memory => None,
        };
        if let Some(pool) = &pool {
            for sql in [
                "CREATE TABLE IF NOT EXISTS bench_saga_raw (correlation_id UUID PRIMARY KEY, \
                 version BIGINT NOT NULL, data JSONB NOT NULL)",
                "DROP TABLE IF EXISTS bench_saga_instances",
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
            }
        }
        Ok(Box::new(SagaSide {
            pool,
            hand_written,
            settings: settings.clone(),
            backlog: None,
        }))
    }
}

#[async_trait]
impl Scenario for SagaScenario {
    fn name(&self) -> &'static str {
        match self.store {
            Store::Postgres => "saga",
            Store::Memory => "saga-memory",
        }
    }

    fn description(&self) -> String {
        match self.store {
            Store::Postgres => "busway saga on PostgreSQL + consumer outbox vs a hand-written sqlx transaction (inbox, SELECT FOR UPDATE, upsert, outbox row), 100 instances, in-memory transport".into(),
            Store::Memory => "busway saga on the in-memory repository vs a hand-written Mutex<HashMap> of JSON rows, 100 instances, in-memory transport".into(),
        }
    }

    async fn available(&self) -> Result<(), String> {
        if self.store == Store::Postgres && !super::rabbitmq::reachable(&self.database_url, 5432) {
            return Err("PostgreSQL is not reachable (start it with scripts/services)".into());
        }
        Ok(())
    }

    async fn busway(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        self.side(settings, false).await
    }

    async fn raw(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        self.side(settings, true).await
    }

    fn sides(&self) -> (&'static str, &'static str) {
        ("busway saga", "hand-written")
    }
}

struct SagaSide {
    pool: Option<PgPool>,
    hand_written: bool,
    settings: Settings,
    backlog: Option<(Bus, Arc<Tally>)>,
}

/// The counter machine; `tally` counts each applied event.
fn machine(tally: Arc<Tally>) -> StateMachine<BenchCounter> {
    let mut m = StateMachine::<BenchCounter>::new("BenchCounterStateMachine");
    let counting = m.state("Counting");
    let event = m.event::<BenchMessage>("Counted", |e| e.correlate_by(|m| instance_of(m.seq)));
    let step = move |b: Activities<BenchCounter, BenchMessage>| {
        let tally = tally.clone();
        b.then(|ctx| {
            ctx.saga.count += 1;
            Ok(())
        })
        .publish(|ctx| BenchAck {
            counter_id: ctx.correlation_id(),
            seq: ctx.message().seq,
        })
        .then(move |ctx| {
            tally.record(ctx.message());
            Ok(())
        })
    };
    let first = step.clone();
    m.initially()
        .when(event, move |b| first(b).transition_to(counting));
    m.during(counting).when(event, step);
    m
}

/// The hand-written PostgreSQL handler: the same rows as the saga, in one transaction.
async fn by_hand_postgres(
    pool: &PgPool,
    outbox: &Outbox<PostgresStore>,
    endpoint: &str,
    ctx: &ConsumeContext<BenchMessage>,
    tally: &Tally,
) -> Result<(), BoxError> {
    let id = instance_of(ctx.message().seq);
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO bench_saga_inbox (endpoint, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(endpoint)
        .bind(ctx.message_id().unwrap_or_else(Uuid::now_v7))
        .execute(&mut *tx)
        .await?;
    let select =
        "SELECT version, data::text FROM bench_saga_raw WHERE correlation_id = $1 FOR UPDATE";
    let mut row: Option<(i64, String)> = sqlx::query_as(select)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if row.is_none() {
        // A new instance: create it, or lock the one a concurrent event just created.
        let created = sqlx::query(
            "INSERT INTO bench_saga_raw (correlation_id, version, data) VALUES ($1, 0, '{}') \
             ON CONFLICT (correlation_id) DO NOTHING",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        row = if created.rows_affected() == 1 {
            Some((0, "{}".to_string()))
        } else {
            sqlx::query_as(select)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
        };
    }
    let (version, data) = row.ok_or("the instance row vanished")?;
    let mut state: BenchCounter = serde_json::from_str(&data)?;
    state.count += 1;
    sqlx::query(
        "UPDATE bench_saga_raw SET version = $2, data = $3::jsonb WHERE correlation_id = $1",
    )
    .bind(id)
    .bind(version + 1)
    .bind(serde_json::to_string(&state)?)
    .execute(&mut *tx)
    .await?;
    outbox
        .publish(
            &mut tx,
            BenchAck {
                counter_id: id,
                seq: ctx.message().seq,
            },
        )
        .await?;
    tally.record(ctx.message());
    tx.commit().await?;
    Ok(())
}

type Rows = Arc<Mutex<HashMap<Uuid, (i64, String)>>>;

/// The hand-written in-memory handler: a JSON row with a version per instance.
async fn by_hand_memory(
    rows: &Rows,
    ctx: &ConsumeContext<BenchMessage>,
    tally: &Tally,
) -> Result<(), BoxError> {
    let id = instance_of(ctx.message().seq);
    {
        let mut rows = rows.lock().map_err(|_| "poisoned")?;
        let (version, data) = rows.entry(id).or_insert_with(|| (0, "{}".to_string()));
        let mut state: BenchCounter = serde_json::from_str(data).unwrap_or_default();
        state.count += 1;
        *data = serde_json::to_string(&state)?;
        *version += 1;
    }
    ctx.publish(BenchAck {
        counter_id: id,
        seq: ctx.message().seq,
    })
    .await?;
    tally.record(ctx.message());
    Ok(())
}

#[async_trait]
impl PublishingSide for SagaSide {
    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn backlog(&mut self) -> &mut Option<(Bus, Arc<Tally>)> {
        &mut self.backlog
    }

    async fn endpoint(
        &mut self,
        phase: &str,
        n: usize,
        latency: bool,
    ) -> Result<(Bus, Arc<Tally>), BoxError> {
        let name = super::endpoint_name(phase);
        let transport = InMemory::new();
        let tally = Tally::new(n, latency);
        let prefetch = self.settings.prefetch;
        let builder = Bus::builder().transport(transport.clone());
        let builder: BusBuilder = match (&self.pool, self.hand_written) {
            (Some(pool), hand_written) => {
                let delivery = Bus::builder().transport(transport.clone()).build().await?;
                let store = PostgresStore::new(pool.clone()).tables(None, "bench_saga_")?;
                let outbox = Outbox::new(store, &delivery).await?;
                for sql in [
                    "TRUNCATE bench_saga_raw",
                    "TRUNCATE bench_saga_outbox",
                    "TRUNCATE bench_saga_inbox",
                ] {
                    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
                }
                if hand_written {
                    let (pool, tally, endpoint) = (pool.clone(), tally.clone(), name.clone());
                    builder.receive_endpoint(name.clone(), move |e| {
                        e.prefetch(prefetch)
                            .handler(move |ctx: ConsumeContext<BenchMessage>| {
                                let (pool, outbox, tally, endpoint) = (
                                    pool.clone(),
                                    outbox.clone(),
                                    tally.clone(),
                                    endpoint.clone(),
                                );
                                async move {
                                    by_hand_postgres(&pool, &outbox, &endpoint, &ctx, &tally)
                                        .await
                                        .map_err(|e| {
                                            ConsumeError::with_kind(
                                                ConsumeErrorKind::Consumer,
                                                "bench",
                                                e,
                                            )
                                        })
                                }
                            })
                    })
                } else {
                    let repo = PostgresSagaRepository::new(pool.clone(), "bench_saga_instances")?;
                    repo.create_schema().await?;
                    sqlx::query("TRUNCATE bench_saga_instances")
                        .execute(pool)
                        .await?;
                    let tally = tally.clone();
                    builder.receive_endpoint(name.clone(), move |e| {
                        e.prefetch(prefetch)
                            .transactional_outbox(&outbox)
                            .state_machine(machine(tally), repo)
                    })
                }
            }
            (None, true) => {
                let rows: Rows = Arc::default();
                let tally = tally.clone();
                builder.receive_endpoint(name.clone(), move |e| {
                    e.prefetch(prefetch)
                        .handler(move |ctx: ConsumeContext<BenchMessage>| {
                            let (rows, tally) = (rows.clone(), tally.clone());
                            async move {
                                by_hand_memory(&rows, &ctx, &tally).await.map_err(|e| {
                                    ConsumeError::with_kind(ConsumeErrorKind::Consumer, "bench", e)
                                })
                            }
                        })
                })
            }
            (None, false) => {
                let tally = tally.clone();
                builder.receive_endpoint(name.clone(), move |e| {
                    e.prefetch(prefetch)
                        .state_machine(machine(tally), InMemorySagaRepository::new())
                })
            }
        };
        let bus = builder.build().await?;
        Ok((bus, tally))
    }

    async fn teardown(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
    }
}
