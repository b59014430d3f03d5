//! Saga instances in a PostgreSQL table: one row per instance, the user's state as `jsonb`,
//! a version column checked on every write and, as an option, rows locked with
//! `SELECT .. FOR UPDATE` for the transaction of the consumer outbox.

use std::fmt;
use std::marker::PhantomData;

use busway_core::ReceiveContext;
use busway_outbox::OutboxTransaction;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row};
use uuid::Uuid;

use super::{
    Query, SagaError, SagaRepository, check_table_name, decode_instance, encode_instance, one_row,
};
use crate::instance::{Instance, SagaState};
use crate::testing::InspectSagas;

/// The SQL that creates a saga table named `{table}` (what
/// [`PostgresSagaRepository::create_schema`] runs; also in `crates/busway-saga/sql/postgres.sql`
/// for those who manage their schema by hand).
pub fn postgres_schema(table: &str) -> Result<String, SagaError> {
    check_table_name(table)?;
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            correlation_id UUID PRIMARY KEY,
            current_state TEXT NOT NULL,
            version BIGINT NOT NULL,
            meta JSONB NOT NULL DEFAULT '{{}}',
            data JSONB NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )"
    ))
}

/// Saga instances in a PostgreSQL table (create it with
/// [`PostgresSagaRepository::create_schema`] or [`postgres_schema`]'s SQL).
///
/// On an endpoint with busway-outbox's consumer outbox (`e.transactional_outbox(&outbox)`)
/// every read and write runs in the delivery's transaction, so the instance and the
/// messages the saga publishes or sends commit together; elsewhere each statement commits on
/// its own and the messages go out after the save. Either way every write checks the
/// version it read, so two processes never lose each other's updates.
pub struct PostgresSagaRepository<S> {
    pool: PgPool,
    table: String,
    pessimistic: bool,
    _state: PhantomData<fn() -> S>,
}

impl<S> Clone for PostgresSagaRepository<S> {
    fn clone(&self) -> Self {
        PostgresSagaRepository {
            pool: self.pool.clone(),
            table: self.table.clone(),
            pessimistic: self.pessimistic,
            _state: PhantomData,
        }
    }
}

impl<S> fmt::Debug for PostgresSagaRepository<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSagaRepository")
            .field("table", &self.table)
            .field("pessimistic", &self.pessimistic)
            .finish_non_exhaustive()
    }
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> SagaError {
    move |e| SagaError::storage_with(format!("PostgreSQL: {what} failed"), e)
}

impl<S: SagaState> PostgresSagaRepository<S> {
    /// Instances in `table` (`order_state`, or `schema.order_state`) on `pool`.
    pub fn new(pool: PgPool, table: &str) -> Result<Self, SagaError> {
        check_table_name(table)?;
        Ok(PostgresSagaRepository {
            pool,
            table: table.to_string(),
            pessimistic: false,
            _state: PhantomData,
        })
    }

    /// Locks each instance it loads with `SELECT .. FOR UPDATE` until the delivery's
    /// transaction ends, so events of one instance in other processes wait instead of
    /// conflicting (MassTransit's pessimistic concurrency). Needs the consumer outbox on the
    /// endpoint: without its transaction a lock would end with the statement, and loads fail
    /// with an error that says so.
    pub fn pessimistic(mut self) -> Self {
        self.pessimistic = true;
        self
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table if it does not exist.
    pub async fn create_schema(&self) -> Result<(), SagaError> {
        let sql = postgres_schema(&self.table)?;
        sqlx::query(AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(db("creating the saga table"))?;
        Ok(())
    }

    /// Runs `f` on the delivery's outbox transaction when there is one, on a pooled
    /// connection otherwise.
    async fn run<T: Send>(
        &self,
        cx: Option<&ReceiveContext>,
        locking: bool,
        f: impl for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, SagaError>> + Send,
    ) -> Result<T, SagaError> {
        match cx.and_then(|cx| cx.payload::<OutboxTransaction<Postgres>>()) {
            Some(tx) => {
                let mut guard = tx.lock().await.map_err(|e| {
                    SagaError::storage(format!("the consumer outbox's transaction: {e}"))
                })?;
                f(&mut guard).await
            }
            None if locking => Err(SagaError::storage(
                "pessimistic saga locking needs the consumer outbox on the endpoint \
                 (`e.transactional_outbox(&outbox)`): without its transaction the row lock \
                 would end with the statement",
            )),
            None => {
                let mut conn = self
                    .pool
                    .acquire()
                    .await
                    .map_err(db("getting a connection"))?;
                f(&mut conn).await
            }
        }
    }

    async fn select(
        &self,
        cx: Option<&ReceiveContext>,
        id: Uuid,
    ) -> Result<Option<Instance<S>>, SagaError> {
        let lock = self.pessimistic && cx.is_some();
        let sql = format!(
            "SELECT correlation_id, current_state, version, meta::text, data::text FROM {} \
             WHERE correlation_id = $1{}",
            self.table,
            if lock { " FOR UPDATE" } else { "" }
        );
        self.run(cx, lock, move |conn| {
            Box::pin(async move {
                let row = sqlx::query(AssertSqlSafe(sql))
                    .bind(id)
                    .fetch_optional(conn)
                    .await
                    .map_err(db("loading a saga instance"))?;
                row.map(|row| read(&row)).transpose()
            })
        })
        .await
    }
}

impl<S: SagaState> PostgresSagaRepository<S> {
    /// Runs an insert or update whose parameters are the instance's columns (`$1` to `$5`)
    /// and, for an update, the expected version (`$6`); returns the rows it changed.
    async fn write(
        &self,
        cx: &ReceiveContext,
        sql: String,
        instance: &Instance<S>,
        expected_version: Option<i64>,
    ) -> Result<u64, SagaError> {
        let (meta, data) = encode_instance(instance)?;
        let (id, state, version) = (
            instance.correlation_id,
            instance.current_state.clone(),
            instance.version,
        );
        self.run(Some(cx), false, move |conn| {
            Box::pin(async move {
                let mut query = sqlx::query(AssertSqlSafe(sql))
                    .bind(id)
                    .bind(state)
                    .bind(version)
                    .bind(meta)
                    .bind(data);
                if let Some(expected) = expected_version {
                    query = query.bind(expected);
                }
                let done = query
                    .execute(conn)
                    .await
                    .map_err(db("saving a saga instance"))?;
                Ok(done.rows_affected())
            })
        })
        .await
    }
}

fn read<S: SagaState>(row: &PgRow) -> Result<Instance<S>, SagaError> {
    let get = |e| SagaError::storage_with("PostgreSQL: reading a saga row failed", e);
    let id: Uuid = row.try_get(0).map_err(get)?;
    let state: String = row.try_get(1).map_err(get)?;
    let version: i64 = row.try_get(2).map_err(get)?;
    let meta: String = row.try_get(3).map_err(get)?;
    let data: String = row.try_get(4).map_err(get)?;
    decode_instance(id, state, version, &meta, &data)
}

impl<S: SagaState> SagaRepository<S> for PostgresSagaRepository<S> {
    async fn load(
        &self,
        cx: &ReceiveContext,
        correlation_id: Uuid,
    ) -> Result<Option<Instance<S>>, SagaError> {
        self.select(Some(cx), correlation_id).await
    }

    fn supports_queries(&self) -> bool {
        true
    }

    async fn find(
        &self,
        cx: &ReceiveContext,
        query: &Query,
    ) -> Result<Option<Instance<S>>, SagaError> {
        let lock = self.pessimistic;
        let sql = format!(
            "SELECT correlation_id, current_state, version, meta::text, data::text FROM {} \
             WHERE data #> $1 = $2::jsonb LIMIT 2{}",
            self.table,
            if lock { " FOR UPDATE" } else { "" }
        );
        let path = query.path().to_vec();
        let value = query.value().to_string();
        let what = query.partition_key();
        self.run(Some(cx), lock, move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(AssertSqlSafe(sql))
                    .bind(path)
                    .bind(value)
                    .fetch_all(conn)
                    .await
                    .map_err(db("finding a saga instance"))?;
                match rows.as_slice() {
                    [] => Ok(None),
                    [row] => read(row).map(Some),
                    _ => Err(SagaError::storage(format!(
                        "more than one saga instance matches {what}"
                    ))),
                }
            })
        })
        .await
    }

    async fn insert(&self, cx: &ReceiveContext, instance: &Instance<S>) -> Result<(), SagaError> {
        let sql = format!(
            "INSERT INTO {} (correlation_id, current_state, version, meta, data) \
             VALUES ($1, $2, $3, $4::jsonb, $5::jsonb) ON CONFLICT (correlation_id) DO NOTHING",
            self.table
        );
        let rows = self.write(cx, sql, instance, None).await?;
        one_row(rows, || SagaError::exists(instance.correlation_id))
    }

    async fn update(
        &self,
        cx: &ReceiveContext,
        instance: &Instance<S>,
        expected_version: i64,
    ) -> Result<(), SagaError> {
        let sql = format!(
            "UPDATE {} SET current_state = $2, version = $3, meta = $4::jsonb, \
             data = $5::jsonb, updated_at = now() WHERE correlation_id = $1 AND version = $6",
            self.table
        );
        let rows = self
            .write(cx, sql, instance, Some(expected_version))
            .await?;
        one_row(rows, || {
            SagaError::moved_on(instance.correlation_id, expected_version)
        })
    }

    async fn delete(
        &self,
        cx: &ReceiveContext,
        correlation_id: Uuid,
        expected_version: i64,
    ) -> Result<(), SagaError> {
        let sql = format!(
            "DELETE FROM {} WHERE correlation_id = $1 AND version = $2",
            self.table
        );
        self.run(Some(cx), false, move |conn| {
            Box::pin(async move {
                let done = sqlx::query(AssertSqlSafe(sql))
                    .bind(correlation_id)
                    .bind(expected_version)
                    .execute(conn)
                    .await
                    .map_err(db("deleting a saga instance"))?;
                one_row(done.rows_affected(), || {
                    SagaError::moved_on(correlation_id, expected_version)
                })
            })
        })
        .await
    }
}

impl<S: SagaState> InspectSagas<S> for PostgresSagaRepository<S> {
    async fn instance(&self, correlation_id: Uuid) -> Result<Option<Instance<S>>, SagaError> {
        self.select(None, correlation_id).await
    }
}
