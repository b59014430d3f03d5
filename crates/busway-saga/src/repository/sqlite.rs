//! Saga instances in a SQLite table: one row per instance, the user's state as JSON text and
//! a version column checked on every write. SQLite serialises writers, so there is no
//! pessimistic option; the version check keeps processes sharing a file from losing updates.

use std::fmt;
use std::marker::PhantomData;

use busway_core::ReceiveContext;
use busway_outbox::OutboxTransaction;
use futures_util::future::BoxFuture;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row, Sqlite};
use uuid::Uuid;

use super::{
    Query, SagaError, SagaRepository, check_table_name, decode_instance, encode_instance, one_row,
};
use crate::instance::{Instance, SagaState};
use crate::testing::InspectSagas;

/// The SQL that creates a saga table named `table` on SQLite (what
/// [`SqliteSagaRepository::create_schema`] runs; also in `crates/busway-saga/sql/sqlite.sql`).
pub fn sqlite_schema(table: &str) -> Result<String, SagaError> {
    check_table_name(table)?;
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            correlation_id BLOB PRIMARY KEY,
            current_state TEXT NOT NULL,
            version INTEGER NOT NULL,
            meta TEXT NOT NULL DEFAULT '{{}}',
            data TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
            updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
        )"
    ))
}

/// Saga instances in a SQLite table (create it with [`SqliteSagaRepository::create_schema`]).
///
/// On an endpoint with busway-outbox's consumer outbox the reads and writes run in the
/// delivery's transaction, so the instance and the saga's messages commit together.
pub struct SqliteSagaRepository<S> {
    pool: SqlitePool,
    table: String,
    _state: PhantomData<fn() -> S>,
}

impl<S> Clone for SqliteSagaRepository<S> {
    fn clone(&self) -> Self {
        SqliteSagaRepository {
            pool: self.pool.clone(),
            table: self.table.clone(),
            _state: PhantomData,
        }
    }
}

impl<S> fmt::Debug for SqliteSagaRepository<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteSagaRepository")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> SagaError {
    move |e| SagaError::storage_with(format!("SQLite: {what} failed"), e)
}

const COLUMNS: &str = "correlation_id, current_state, version, meta, data";

impl<S: SagaState> SqliteSagaRepository<S> {
    /// Instances in `table` on `pool`.
    pub fn new(pool: SqlitePool, table: &str) -> Result<Self, SagaError> {
        check_table_name(table)?;
        Ok(SqliteSagaRepository {
            pool,
            table: table.to_string(),
            _state: PhantomData,
        })
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table if it does not exist.
    pub async fn create_schema(&self) -> Result<(), SagaError> {
        let sql = sqlite_schema(&self.table)?;
        sqlx::query(AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(db("creating the saga table"))?;
        Ok(())
    }

    async fn run<T: Send>(
        &self,
        cx: Option<&ReceiveContext>,
        f: impl for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, SagaError>> + Send,
    ) -> Result<T, SagaError> {
        match cx.and_then(|cx| cx.payload::<OutboxTransaction<Sqlite>>()) {
            Some(tx) => {
                let mut guard = tx.lock().await.map_err(|e| {
                    SagaError::storage(format!("the consumer outbox's transaction: {e}"))
                })?;
                f(&mut guard).await
            }
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
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE correlation_id = ?",
            self.table
        );
        self.run(cx, move |conn| {
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

    /// Runs an insert or update whose parameters are the instance's columns and, for an
    /// update, the expected version; returns the rows it changed.
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
        self.run(Some(cx), move |conn| {
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

fn read<S: SagaState>(row: &SqliteRow) -> Result<Instance<S>, SagaError> {
    let get = |e| SagaError::storage_with("SQLite: reading a saga row failed", e);
    let id: Uuid = row.try_get(0).map_err(get)?;
    let state: String = row.try_get(1).map_err(get)?;
    let version: i64 = row.try_get(2).map_err(get)?;
    let meta: String = row.try_get(3).map_err(get)?;
    let data: String = row.try_get(4).map_err(get)?;
    decode_instance(id, state, version, &meta, &data)
}

/// A JSON path for `json_extract`: `$."a"."b"`, each segment quoted.
fn json_path(query: &Query) -> String {
    let mut path = String::from("$");
    for segment in query.path() {
        path.push_str(".\"");
        path.push_str(&segment.replace('"', "\\\""));
        path.push('"');
    }
    path
}

impl<S: SagaState> SagaRepository<S> for SqliteSagaRepository<S> {
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
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE json_extract(data, ?) = json_extract(?, '$') LIMIT 2",
            self.table
        );
        let path = json_path(query);
        let value = query.value().to_string();
        let what = query.partition_key();
        self.run(Some(cx), move |conn| {
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
            "INSERT INTO {} ({COLUMNS}) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (correlation_id) DO NOTHING",
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
            "UPDATE {} SET correlation_id = ?1, current_state = ?2, version = ?3, meta = ?4, \
             data = ?5, updated_at = CURRENT_TIMESTAMP WHERE correlation_id = ?1 AND version = ?6",
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
            "DELETE FROM {} WHERE correlation_id = ? AND version = ?",
            self.table
        );
        let rows = self
            .run(Some(cx), move |conn| {
                Box::pin(async move {
                    let done = sqlx::query(AssertSqlSafe(sql))
                        .bind(correlation_id)
                        .bind(expected_version)
                        .execute(conn)
                        .await
                        .map_err(db("deleting a saga instance"))?;
                    Ok(done.rows_affected())
                })
            })
            .await?;
        one_row(rows, || {
            SagaError::moved_on(correlation_id, expected_version)
        })
    }
}

impl<S: SagaState> InspectSagas<S> for SqliteSagaRepository<S> {
    async fn instance(&self, correlation_id: Uuid) -> Result<Option<Instance<S>>, SagaError> {
        self.select(None, correlation_id).await
    }
}
