//! PostgreSQL storage: dispatchers lock an outbox's state row with
//! `FOR UPDATE SKIP LOCKED` (several dispatchers, one per outbox at a time, in order), and
//! stored messages wake them with `LISTEN/NOTIFY`.

use std::time::Duration;

use async_trait::async_trait;
use busway_core::Result;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::store::{
    Claim, Failure, NewMessage, Notifications, OutboxStore, StoredMessage, TableNames, db_error,
};

/// Outbox and inbox storage on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    names: TableNames,
}

impl PostgresStore {
    /// Storage on `pool` with the default tables (`busway_outbox`, `busway_inbox`, ...).
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            names: TableNames::default(),
        }
    }

    /// Uses `prefix` instead of `busway_` and puts the tables in `schema` (which must exist).
    pub fn tables(mut self, schema: Option<&str>, prefix: &str) -> Result<Self> {
        self.names = TableNames::new(schema, prefix)?;
        Ok(self)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn migration_v1(&self) -> Vec<String> {
        let n = &self.names;
        let p = &n.prefix;
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    sequence_number BIGSERIAL PRIMARY KEY,
                    outbox_id TEXT NOT NULL,
                    message_id UUID NOT NULL,
                    message_type TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    envelope TEXT NOT NULL,
                    delay_ms BIGINT,
                    time_to_live_ms BIGINT,
                    partition_key TEXT,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    delivered_at TIMESTAMPTZ,
                    failed_at TIMESTAMPTZ,
                    attempts INT NOT NULL DEFAULT 0,
                    last_error TEXT
                )",
                n.outbox
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {p}outbox_pending ON {} (outbox_id, sequence_number)
                 WHERE delivered_at IS NULL AND failed_at IS NULL",
                n.outbox
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {p}outbox_delivered ON {} (delivered_at)
                 WHERE delivered_at IS NOT NULL",
                n.outbox
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (outbox_id TEXT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                n.state
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    endpoint TEXT NOT NULL,
                    message_id UUID NOT NULL,
                    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    PRIMARY KEY (endpoint, message_id)
                )",
                n.inbox
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {p}inbox_received ON {} (received_at)",
                n.inbox
            ),
        ]
    }
}

#[async_trait]
impl OutboxStore for PostgresStore {
    type Database = Postgres;

    fn names(&self) -> &TableNames {
        &self.names
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error("could not start the migration", e))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("busway-migrations:{}", self.names.migrations))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("could not lock for the migration", e))?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            self.names.migrations
        )))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("could not create the migrations table", e))?;
        let version: i32 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COALESCE(MAX(version), 0) FROM {}",
            self.names.migrations
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_error("could not read the schema version", e))?;
        if version < 1 {
            for statement in self.migration_v1() {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error("the outbox migration failed", e))?;
            }
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (version) VALUES (1)",
                self.names.migrations
            )))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("could not record the schema version", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| db_error("could not commit the migration", e))
    }

    async fn insert(&self, conn: &mut PgConnection, messages: &[NewMessage]) -> Result<()> {
        // One round trip per message: the outbox state row, the message, and the
        // notification (delivered at commit; PostgreSQL folds repeats in one transaction).
        let sql = format!(
            "WITH state AS (INSERT INTO {state} (outbox_id) VALUES ($1) ON CONFLICT DO NOTHING)
             INSERT INTO {outbox} (outbox_id, message_id, message_type, destination, envelope, delay_ms, time_to_live_ms, partition_key)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM (SELECT pg_notify($9, '')) AS notified",
            state = self.names.state,
            outbox = self.names.outbox
        );
        for m in messages {
            sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(&m.outbox_id)
                .bind(m.message_id)
                .bind(&m.message_type)
                .bind(&m.destination)
                .bind(&m.envelope)
                .bind(m.delay_ms)
                .bind(m.time_to_live_ms)
                .bind(&m.partition_key)
                .bind(&self.names.channel)
                .execute(&mut *conn)
                .await
                .map_err(|e| db_error("could not store the message in the outbox", e))?;
        }
        Ok(())
    }

    fn max_connections(&self) -> usize {
        usize::try_from(self.pool.options().get_max_connections()).unwrap_or(usize::MAX)
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        self.pool
            .begin()
            .await
            .map_err(|e| db_error("could not start a transaction", e))
    }

    async fn record_inbox(
        &self,
        conn: &mut PgConnection,
        endpoint: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (endpoint, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            self.names.inbox
        )))
        .bind(endpoint)
        .bind(message_id)
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("could not record the message in the inbox", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim(
        &self,
        _dispatcher: &str,
        limit: i64,
        _lease: Duration,
    ) -> Result<Option<Box<dyn Claim>>> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error("could not start a dispatch transaction", e))?;
        let n = &self.names;
        let outbox: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT s.outbox_id FROM {state} s
             WHERE EXISTS (SELECT 1 FROM {outbox} o
                           WHERE o.outbox_id = s.outbox_id AND o.delivered_at IS NULL AND o.failed_at IS NULL)
             LIMIT 1
             FOR UPDATE OF s SKIP LOCKED",
            state = n.state,
            outbox = n.outbox
        )))
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error("could not claim an outbox", e))?;
        let Some(outbox_id) = outbox else {
            let _ = tx.rollback().await;
            return Ok(None);
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT sequence_number, outbox_id, message_id, destination, envelope, delay_ms, time_to_live_ms,
                    partition_key, created_at, attempts
             FROM {} WHERE outbox_id = $1 AND delivered_at IS NULL AND failed_at IS NULL
             ORDER BY sequence_number LIMIT $2",
            n.outbox
        )))
        .bind(&outbox_id)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| db_error("could not read the outbox", e))?;
        let messages = rows
            .iter()
            .map(|r| {
                Ok(StoredMessage {
                    sequence: r.try_get(0)?,
                    outbox_id: r.try_get(1)?,
                    message_id: r.try_get(2)?,
                    destination: r.try_get(3)?,
                    envelope: r.try_get(4)?,
                    delay_ms: r.try_get(5)?,
                    time_to_live_ms: r.try_get(6)?,
                    partition_key: r.try_get(7)?,
                    created_at: r.try_get::<DateTime<Utc>, _>(8)?,
                    attempts: r.try_get(9)?,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(|e| db_error("could not read an outbox row", e))?;
        Ok(Some(Box::new(PgClaim {
            tx,
            outbox_id,
            messages,
            names: self.names.clone(),
        })))
    }

    async fn counts(&self) -> Result<(i64, i64)> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL),
                    COUNT(*) FILTER (WHERE failed_at IS NOT NULL)
             FROM {}",
            self.names.outbox
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_error("could not count outbox messages", e))?;
        let pending: i64 = row
            .try_get(0)
            .map_err(|e| db_error("could not count outbox messages", e))?;
        let parked: i64 = row
            .try_get(1)
            .map_err(|e| db_error("could not count outbox messages", e))?;
        Ok((pending, parked))
    }

    async fn cleanup(
        &self,
        delivered_before: DateTime<Utc>,
        inbox_before: DateTime<Utc>,
    ) -> Result<(u64, u64)> {
        let outbox = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE delivered_at IS NOT NULL AND delivered_at < $1",
            self.names.outbox
        )))
        .bind(delivered_before)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("could not remove delivered messages", e))?;
        let inbox = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE received_at < $1",
            self.names.inbox
        )))
        .bind(inbox_before)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("could not remove expired inbox rows", e))?;
        Ok((outbox.rows_affected(), inbox.rows_affected()))
    }

    async fn listen(&self) -> Result<Option<Box<dyn Notifications>>> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| db_error("could not open the LISTEN connection", e))?;
        listener
            .listen(&self.names.channel)
            .await
            .map_err(|e| db_error("could not LISTEN for outbox notifications", e))?;
        Ok(Some(Box::new(PgNotifications(listener))))
    }
}

struct PgNotifications(PgListener);

#[async_trait]
impl Notifications for PgNotifications {
    async fn next(&mut self) -> Result<()> {
        self.0
            .recv()
            .await
            .map(|_| ())
            .map_err(|e| db_error("the LISTEN connection failed", e))
    }
}

struct PgClaim {
    tx: Transaction<'static, Postgres>,
    outbox_id: String,
    messages: Vec<StoredMessage>,
    names: TableNames,
}

#[async_trait]
impl Claim for PgClaim {
    fn outbox_id(&self) -> &str {
        &self.outbox_id
    }

    fn messages(&self) -> &[StoredMessage] {
        &self.messages
    }

    async fn finish(
        mut self: Box<Self>,
        delivered: &[i64],
        failure: Option<Failure>,
    ) -> Result<()> {
        if !delivered.is_empty() {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {} SET delivered_at = now() WHERE sequence_number = ANY($1)",
                self.names.outbox
            )))
            .bind(delivered)
            .execute(&mut *self.tx)
            .await
            .map_err(|e| db_error("could not mark messages delivered", e))?;
        }
        if let Some(f) = failure {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {} SET attempts = attempts + 1, last_error = $2,
                        failed_at = CASE WHEN $3 THEN now() ELSE NULL END
                 WHERE sequence_number = $1",
                self.names.outbox
            )))
            .bind(f.sequence)
            .bind(&f.error)
            .bind(f.park)
            .execute(&mut *self.tx)
            .await
            .map_err(|e| db_error("could not record a delivery failure", e))?;
        }
        self.tx
            .commit()
            .await
            .map_err(|e| db_error("could not commit the dispatch", e))
    }
}
