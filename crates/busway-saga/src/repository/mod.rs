//! Where saga instances live: the [`SagaRepository`] trait and its implementations.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;

use busway_core::{BoxError, ReceiveContext};
use uuid::Uuid;

use crate::instance::{Instance, SagaState};

mod memory;
#[cfg(feature = "postgres")]
mod postgres;

pub use memory::InMemorySagaRepository;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::{PostgresSagaRepository, postgres_schema};
#[cfg(feature = "redis")]
pub use redis::RedisSagaRepository;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteSagaRepository, sqlite_schema};

/// Stores saga instances. Every write names the version it expects, and refuses with a
/// [`SagaError::conflict`] when the stored instance has moved on, so that two processes
/// handling events of one instance never lose an update: the machine loads again and
/// re-runs the event.
///
/// Each method gets the delivery's [`ReceiveContext`]: a database repository finds the
/// transaction of the consumer outbox there, so the instance and the messages the saga sends
/// commit together.
pub trait SagaRepository<S: SagaState>: Send + Sync + 'static {
    /// The instance with this correlation id, if there is one.
    fn load(
        &self,
        cx: &ReceiveContext,
        correlation_id: Uuid,
    ) -> impl Future<Output = Result<Option<Instance<S>>, SagaError>> + Send;

    /// Whether [`SagaRepository::find`] works (events that correlate by query need it).
    fn supports_queries(&self) -> bool {
        false
    }

    /// The one instance whose fields match `query`, if there is one; more than one is an
    /// error.
    fn find(
        &self,
        cx: &ReceiveContext,
        query: &Query,
    ) -> impl Future<Output = Result<Option<Instance<S>>, SagaError>> + Send {
        let _ = (cx, query);
        async {
            Err(SagaError::storage(
                "this saga repository cannot query by field",
            ))
        }
    }

    /// Stores a new instance (its `version` is 1); a [`SagaError::conflict`] when one with
    /// its correlation id exists.
    fn insert(
        &self,
        cx: &ReceiveContext,
        instance: &Instance<S>,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;

    /// Replaces the stored instance if it is still at `expected_version` (`instance.version`
    /// is the new one); a [`SagaError::conflict`] when it is not.
    fn update(
        &self,
        cx: &ReceiveContext,
        instance: &Instance<S>,
        expected_version: i64,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;

    /// Removes the instance if it is still at `expected_version`.
    fn delete(
        &self,
        cx: &ReceiveContext,
        correlation_id: Uuid,
        expected_version: i64,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;
}

/// An instance whose fields match (MassTransit's `CorrelateBy(expression)`): the JSON value
/// at a path of the user's state equals a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    path: Vec<String>,
    value: serde_json::Value,
}

impl Query {
    /// The field at `path` (dot-separated, as serialized: `orderNumber`,
    /// `customer.email`) equals `value`.
    pub fn eq(path: &str, value: impl Into<serde_json::Value>) -> Self {
        Query {
            path: path.split('.').map(str::to_string).collect(),
            value: value.into(),
        }
    }

    /// The path's segments.
    pub fn path(&self) -> &[String] {
        &self.path
    }

    /// The value the field must equal.
    pub fn value(&self) -> &serde_json::Value {
        &self.value
    }

    /// True when `data` (the user's state as JSON) matches.
    pub fn matches(&self, data: &serde_json::Value) -> bool {
        let mut at = data;
        for segment in &self.path {
            match at.get(segment) {
                Some(next) => at = next,
                None => return false,
            }
        }
        *at == self.value
    }

    /// A key for handling the events of one query one at a time.
    pub(crate) fn partition_key(&self) -> String {
        format!("{}={}", self.path.join("."), self.value)
    }
}

/// Why a repository refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SagaErrorKind {
    /// The stored instance is not at the expected version, or exists already: load again.
    Conflict,
    /// A stored instance no longer reads as the state type (a schema change).
    Corrupt,
    /// The store failed (connection lost, query refused).
    Storage,
}

/// A repository error.
pub struct SagaError {
    kind: SagaErrorKind,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl SagaError {
    /// The instance moved on (or exists already): the event is run again on a fresh load.
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(SagaErrorKind::Conflict, message, None)
    }

    /// The conflict of a write that expected the instance at `expected_version` and found it
    /// elsewhere (or gone).
    pub fn moved_on(correlation_id: Uuid, expected_version: i64) -> Self {
        Self::conflict(format!(
            "the saga instance {correlation_id} is no longer at version {expected_version}"
        ))
    }

    /// The conflict of an insert that found the instance there already.
    pub fn exists(correlation_id: Uuid) -> Self {
        Self::conflict(format!("a saga instance {correlation_id} exists already"))
    }

    /// A stored instance that no longer reads as the state type.
    pub fn corrupt(message: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::new(SagaErrorKind::Corrupt, message, Some(source.into()))
    }

    /// The store failed.
    pub fn storage(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(SagaErrorKind::Storage, message, None)
    }

    /// The store failed with `source`.
    pub fn storage_with(
        message: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::new(SagaErrorKind::Storage, message, Some(source.into()))
    }

    fn new(
        kind: SagaErrorKind,
        message: impl Into<Cow<'static, str>>,
        source: Option<BoxError>,
    ) -> Self {
        SagaError {
            kind,
            message: message.into(),
            source,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> SagaErrorKind {
        self.kind
    }

    /// True for a version conflict.
    pub fn is_conflict(&self) -> bool {
        self.kind == SagaErrorKind::Conflict
    }
}

impl fmt::Debug for SagaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for SagaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SagaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Reads a stored instance's JSON parts back as an [`Instance`]; a [`SagaError::corrupt`]
/// naming the instance when they no longer fit the state type.
pub fn decode_instance<S: SagaState>(
    correlation_id: Uuid,
    current_state: String,
    version: i64,
    meta: &str,
    data: &str,
) -> Result<Instance<S>, SagaError> {
    let corrupt = |what: &str, e: serde_json::Error| {
        SagaError::corrupt(
            format!(
                "the stored saga instance {correlation_id} no longer reads as {}: its {what} \
                 does not fit",
                std::any::type_name::<S>()
            ),
            e,
        )
    };
    let data = serde_json::from_str(data).map_err(|e| corrupt("data", e))?;
    let meta = if meta.is_empty() {
        Default::default()
    } else {
        serde_json::from_str(meta).map_err(|e| corrupt("bookkeeping", e))?
    };
    Ok(Instance {
        correlation_id,
        current_state,
        version,
        meta,
        data,
    })
}

/// An instance's user data and bookkeeping as JSON text, for a repository to store.
pub fn encode_instance<S: SagaState>(
    instance: &Instance<S>,
) -> Result<(String, String), SagaError> {
    let fail = |e: serde_json::Error| {
        SagaError::storage_with(
            format!(
                "the saga instance {} does not serialize",
                instance.correlation_id
            ),
            e,
        )
    };
    let data = serde_json::to_string(&instance.data).map_err(fail)?;
    let meta = serde_json::to_string(&instance.meta).map_err(fail)?;
    Ok((meta, data))
}

/// Refuses a table name that is not a plain (optionally schema-qualified) SQL identifier
/// (busway-outbox's rule): the name goes into SQL text.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn check_table_name(table: &str) -> Result<(), SagaError> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| busway_outbox::is_plain_identifier(p)) {
        Ok(())
    } else {
        Err(SagaError::storage(format!(
            "`{table}` is not a table name busway uses: letters, digits and `_`, optionally \
             `schema.table`"
        )))
    }
}

/// `Ok` when a write changed exactly one row; `conflict()` otherwise.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn one_row(rows: u64, conflict: impl FnOnce() -> SagaError) -> Result<(), SagaError> {
    if rows == 1 { Ok(()) } else { Err(conflict()) }
}
