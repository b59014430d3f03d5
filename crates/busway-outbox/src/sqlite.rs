//! SQLite storage: one writer at a time, so dispatchers take a short lease on an outbox
//! (an atomic `UPDATE`) instead of holding a transaction while they deliver. Times are stored
//! as milliseconds since the Unix epoch. There is no `LISTEN`; dispatchers poll (and wake at
//! once for messages stored through the consumer outbox in the same process).

use std::time::Duration;

use async_trait::async_trait;
use busway_core::Result;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use uuid::Uuid;

use crate::store::{Claim, Failure, NewMessage, OutboxStore, StoredMessage, TableNames, db_error};

/// Outbox and inbox storage on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    names: TableNames,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Storage on `pool` with the default tables.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            names: TableNames::default(),
        }
    }

    /// Uses `prefix` instead of `busway_` (SQLite has no schemas here).
    pub fn table_prefix(mut self, prefix: &str) -> Result<Self> {
        self.names = TableNames::new(None, prefix)?;
        Ok(self)
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn migration_v1(&self) -> Vec<String> {
        let n = &self.names;
        let p = &n.prefix;
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    sequence_number INTEGER PRIMARY KEY AUTOINCREMENT,
                    outbox_id TEXT NOT NULL,
                    message_id TEXT NOT NULL,
                    message_type TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    envelope TEXT NOT NULL,
                    delay_ms INTEGER,
                    time_to_live_ms INTEGER,
                    partition_key TEXT,
                    created_at INTEGER NOT NULL,
                    delivered_at INTEGER,
                    failed_at INTEGER,
                    attempts INTEGER NOT NULL DEFAULT 0,
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
                "CREATE TABLE IF NOT EXISTS {} (
                    outbox_id TEXT PRIMARY KEY,
                    locked_by TEXT,
                    locked_until INTEGER
                )",
                n.state
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    endpoint TEXT NOT NULL,
                    message_id TEXT NOT NULL,
                    received_at INTEGER NOT NULL,
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
impl OutboxStore for SqliteStore {
    type Database = Sqlite;

    fn names(&self) -> &TableNames {
        &self.names
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("could not start the migration", e))?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
            self.names.migrations
        )))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("could not create the migrations table", e))?;
        let version: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
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
                "INSERT INTO {} (version, applied_at) VALUES (1, ?)",
                self.names.migrations
            )))
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("could not record the schema version", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| db_error("could not commit the migration", e))
    }

    async fn insert(&self, conn: &mut SqliteConnection, messages: &[NewMessage]) -> Result<()> {
        let mut outboxes: Vec<&str> = messages.iter().map(|m| m.outbox_id.as_str()).collect();
        outboxes.sort_unstable();
        outboxes.dedup();
        for outbox in outboxes {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT OR IGNORE INTO {} (outbox_id) VALUES (?)",
                self.names.state
            )))
            .bind(outbox)
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("could not store the outbox state", e))?;
        }
        let sql = format!(
            "INSERT INTO {} (outbox_id, message_id, message_type, destination, envelope, delay_ms, time_to_live_ms, partition_key, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            self.names.outbox
        );
        let now = now_ms();
        for m in messages {
            sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(&m.outbox_id)
                .bind(m.message_id.to_string())
                .bind(&m.message_type)
                .bind(&m.destination)
                .bind(&m.envelope)
                .bind(m.delay_ms)
                .bind(m.time_to_live_ms)
                .bind(&m.partition_key)
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(|e| db_error("could not store the message in the outbox", e))?;
        }
        Ok(())
    }

    fn max_connections(&self) -> usize {
        usize::try_from(self.pool.options().get_max_connections()).unwrap_or(usize::MAX)
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        // IMMEDIATE: take the write lock at once, so two consumers never both read and then
        // fail to upgrade to writing.
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("could not start a transaction", e))
    }

    async fn record_inbox(
        &self,
        conn: &mut SqliteConnection,
        endpoint: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "INSERT OR IGNORE INTO {} (endpoint, message_id, received_at) VALUES (?, ?, ?)",
            self.names.inbox
        )))
        .bind(endpoint)
        .bind(message_id.to_string())
        .bind(now_ms())
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("could not record the message in the inbox", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim(
        &self,
        dispatcher: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Option<Box<dyn Claim>>> {
        let n = &self.names;
        let now = now_ms();
        let outbox: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "UPDATE {state} SET locked_by = ?1, locked_until = ?2
             WHERE outbox_id = (
                SELECT s.outbox_id FROM {state} s
                WHERE (s.locked_until IS NULL OR s.locked_until < ?3 OR s.locked_by = ?1)
                  AND EXISTS (SELECT 1 FROM {outbox} o
                              WHERE o.outbox_id = s.outbox_id AND o.delivered_at IS NULL AND o.failed_at IS NULL)
                LIMIT 1)
             RETURNING outbox_id",
            state = n.state,
            outbox = n.outbox
        )))
        .bind(dispatcher)
        .bind(now.saturating_add(millis(lease)))
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("could not claim an outbox", e))?;
        let Some(outbox_id) = outbox else {
            return Ok(None);
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT sequence_number, outbox_id, message_id, destination, envelope, delay_ms, time_to_live_ms,
                    partition_key, created_at, attempts
             FROM {} WHERE outbox_id = ? AND delivered_at IS NULL AND failed_at IS NULL
             ORDER BY sequence_number LIMIT ?",
            n.outbox
        )))
        .bind(&outbox_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("could not read the outbox", e))?;
        let messages = rows
            .iter()
            .map(|r| {
                let id: String = r.try_get(2)?;
                let created: i64 = r.try_get(8)?;
                Ok(StoredMessage {
                    sequence: r.try_get(0)?,
                    outbox_id: r.try_get(1)?,
                    message_id: Uuid::parse_str(&id).unwrap_or_default(),
                    destination: r.try_get(3)?,
                    envelope: r.try_get(4)?,
                    delay_ms: r.try_get(5)?,
                    time_to_live_ms: r.try_get(6)?,
                    partition_key: r.try_get(7)?,
                    created_at: DateTime::<Utc>::from_timestamp_millis(created)
                        .unwrap_or_else(Utc::now),
                    attempts: r.try_get::<i64, _>(9)?.try_into().unwrap_or(i32::MAX),
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(|e| db_error("could not read an outbox row", e))?;
        Ok(Some(Box::new(SqliteClaim {
            pool: self.pool.clone(),
            names: self.names.clone(),
            dispatcher: dispatcher.to_string(),
            outbox_id,
            messages,
            lease,
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
            "DELETE FROM {} WHERE delivered_at IS NOT NULL AND delivered_at < ?",
            self.names.outbox
        )))
        .bind(delivered_before.timestamp_millis())
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("could not remove delivered messages", e))?;
        let inbox = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE received_at < ?",
            self.names.inbox
        )))
        .bind(inbox_before.timestamp_millis())
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("could not remove expired inbox rows", e))?;
        Ok((outbox.rows_affected(), inbox.rows_affected()))
    }
}

struct SqliteClaim {
    pool: SqlitePool,
    names: TableNames,
    dispatcher: String,
    outbox_id: String,
    messages: Vec<StoredMessage>,
    lease: Duration,
}

#[async_trait]
impl Claim for SqliteClaim {
    async fn renew(&self) -> Result<bool> {
        let now = now_ms();
        let renewed = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET locked_until = ? WHERE outbox_id = ? AND locked_by = ? AND locked_until >= ?",
            self.names.state
        )))
        .bind(now.saturating_add(millis(self.lease)))
        .bind(&self.outbox_id)
        .bind(&self.dispatcher)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("could not renew the outbox lease", e))?;
        Ok(renewed.rows_affected() == 1)
    }

    fn outbox_id(&self) -> &str {
        &self.outbox_id
    }

    fn messages(&self) -> &[StoredMessage] {
        &self.messages
    }

    async fn finish(self: Box<Self>, delivered: &[i64], failure: Option<Failure>) -> Result<()> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("could not start the dispatch update", e))?;
        let now = now_ms();
        for seq in delivered {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {} SET delivered_at = ? WHERE sequence_number = ?",
                self.names.outbox
            )))
            .bind(now)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("could not mark messages delivered", e))?;
        }
        if let Some(f) = failure {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {} SET attempts = attempts + 1, last_error = ?, failed_at = CASE WHEN ? THEN ? ELSE NULL END
                 WHERE sequence_number = ?",
                self.names.outbox
            )))
            .bind(&f.error)
            .bind(f.park)
            .bind(now)
            .bind(f.sequence)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("could not record a delivery failure", e))?;
        }
        let released = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET locked_by = NULL, locked_until = NULL WHERE outbox_id = ? AND locked_by = ?",
            self.names.state
        )))
        .bind(&self.outbox_id)
        .bind(&self.dispatcher)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("could not release the outbox", e))?;
        if released.rows_affected() == 0 {
            // The messages marked above were delivered, so marking them is right; but another
            // dispatcher holds the outbox now and may deliver some of them again.
            tracing::warn!(outbox = %self.outbox_id, dispatcher = %self.dispatcher, "the outbox lease was lost before the batch finished");
        }
        tx.commit()
            .await
            .map_err(|e| db_error("could not commit the dispatch update", e))
    }
}
