//! Transactional outbox and idempotent inbox for busway, on PostgreSQL and SQLite with sqlx.
//!
//! **Outbox**: write your rows and your events in one database transaction; the events are
//! delivered after the commit, exactly once in effect with the inbox, and never when the
//! transaction rolls back. A dispatcher delivers stored messages through the bus in the order
//! they were stored (per outbox), retrying with back-off while the broker is down.
//!
//! ```ignore
//! let outbox = Outbox::new(PostgresStore::new(pool.clone()), &bus).await?;
//! let dispatcher = outbox.start_dispatcher();
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind(id).execute(&mut *tx).await?;
//! outbox.publish(&mut *tx, OrderPlaced { order_id: id, .. }).await?;
//! tx.commit().await?;
//! ```
//!
//! **Consumer outbox and inbox**: `e.transactional_outbox(&outbox)` runs each consume
//! attempt in a transaction; the message id is recorded in `busway_inbox` (a duplicate
//! delivery is acknowledged and skipped), the consumer's own writes join the transaction
//! ([`transaction`]), its publishes and sends are stored in it, and it commits before the
//! message is acknowledged.
//!
//! Features: `postgres` ([`PostgresStore`]: `FOR UPDATE SKIP LOCKED`, `LISTEN/NOTIFY`) and
//! `sqlite` ([`SqliteStore`]: leases). See `docs/guide/outbox.md`.

#[cfg(not(any(feature = "postgres", feature = "sqlite")))]
compile_error!("busway-outbox needs the `postgres` or the `sqlite` feature (or both)");

mod dispatcher;
mod inbox;
mod outbox;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;

pub use dispatcher::Dispatcher;
pub use inbox::{
    ConsumerOutbox, ConsumerOutboxLayer, EndpointOutboxExt, OutboxTransaction, TxGuard, transaction,
};
pub use outbox::{Connection, Outbox, OutboxOptions};
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
pub use store::{
    Claim, Failure, NewMessage, Notifications, OutboxStore, PUBLISH, StoredMessage, TableNames,
    is_plain_identifier,
};

/// An outbox on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgOutbox = Outbox<PostgresStore>;

/// An outbox on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteOutbox = Outbox<SqliteStore>;

/// sqlx, as this crate uses it (the user's transactions must be of the same version).
pub use sqlx;
