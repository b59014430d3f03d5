//! The outbox: store messages in the caller's transaction; a dispatcher delivers them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use busway_core::{Bus, IntoAddress, Message, OutgoingMessage, Result, SendBuilder};
use tokio::sync::Notify;

use crate::store::{NewMessage, OutboxStore};

/// The connection type of a store's database (`PgConnection`, `SqliteConnection`).
pub type Connection<S> = <<S as OutboxStore>::Database as sqlx::Database>::Connection;

/// How the outbox stores and delivers.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// The outbox id messages stored with [`Outbox::publish`] / [`Outbox::send`] get:
    /// messages of one outbox are delivered in the order they were stored.
    pub outbox_id: String,
    /// Messages delivered per claim.
    pub batch_size: i64,
    /// Deliveries of one claim in flight at once (default 1). With 1, a message is sent only
    /// after the one before it was confirmed, so order holds even across failures. With more,
    /// messages still leave in order and only the unbroken run of confirmed ones is marked
    /// delivered; but when one fails, the ones after it that were already in flight have
    /// reached the broker ahead of its retry (and go again with it: at least once).
    pub delivery_window: usize,
    /// How often an idle dispatcher looks for messages without a notification.
    pub poll_interval: Duration,
    /// First wait after a failed delivery; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest wait between delivery attempts.
    pub max_backoff: Duration,
    /// Delivery attempts before a message that keeps failing (for a reason other than the
    /// broker being unavailable) is parked (`failed_at` set) so the messages after it move on.
    pub max_attempts: i32,
    /// How long delivered messages stay in the table.
    pub retention: Duration,
    /// How long inbox rows are kept: a redelivery later than this is consumed again.
    pub inbox_window: Duration,
    /// How often delivered messages and old inbox rows are removed.
    pub cleanup_interval: Duration,
    /// SQLite: how long a dispatcher's claim on an outbox lasts before another may take it.
    pub lease: Duration,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        Self {
            outbox_id: "default".to_string(),
            batch_size: 100,
            delivery_window: 1,
            poll_interval: Duration::from_millis(500),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            max_attempts: 10,
            retention: Duration::from_secs(24 * 3600),
            inbox_window: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            lease: Duration::from_secs(60),
        }
    }
}

/// A transactional outbox on a database store, delivering through a bus.
pub struct Outbox<S: OutboxStore> {
    pub(crate) inner: Arc<OutboxInner<S>>,
}

pub(crate) struct OutboxInner<S: OutboxStore> {
    pub(crate) store: S,
    pub(crate) bus: Bus,
    pub(crate) options: OutboxOptions,
    pub(crate) wake: Arc<Notify>,
    /// Consume attempts that may hold a pooled connection at once (see
    /// [`OutboxStore::max_connections`]): more wait here instead of timing out in the pool.
    pub(crate) consumers: Arc<tokio::sync::Semaphore>,
}

impl<S: OutboxStore> Clone for Outbox<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: OutboxStore + fmt::Debug> fmt::Debug for Outbox<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("store", &self.inner.store)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl<S: OutboxStore> Outbox<S> {
    /// An outbox on `store` that delivers through `bus`; creates or upgrades its tables.
    pub async fn new(store: S, bus: &Bus) -> Result<Self> {
        Self::with_options(store, bus, OutboxOptions::default()).await
    }

    /// Like [`Outbox::new`] with options.
    pub async fn with_options(store: S, bus: &Bus, options: OutboxOptions) -> Result<Self> {
        store.migrate().await?;
        Ok(Self {
            inner: Arc::new(OutboxInner {
                consumers: Arc::new(tokio::sync::Semaphore::new(
                    store.max_connections().saturating_sub(1).max(1),
                )),
                store,
                bus: bus.clone(),
                options,
                wake: Arc::new(Notify::new()),
            }),
        })
    }

    /// The same outbox under another outbox id: its messages form their own ordered
    /// sequence, delivered independently (and in parallel) of the others.
    pub fn with_outbox_id(&self, outbox_id: &str) -> Self
    where
        S: Clone,
    {
        let mut options = self.inner.options.clone();
        options.outbox_id = outbox_id.to_string();
        Self {
            inner: Arc::new(OutboxInner {
                store: self.inner.store.clone(),
                bus: self.inner.bus.clone(),
                options,
                wake: self.inner.wake.clone(),
                consumers: self.inner.consumers.clone(),
            }),
        }
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.inner.store
    }

    /// The options.
    pub fn options(&self) -> &OutboxOptions {
        &self.inner.options
    }

    /// Stores a publish of `message` in the caller's transaction (`&mut *tx`). Nothing is
    /// delivered unless the transaction commits; then a dispatcher delivers it.
    pub async fn publish<M: Message>(&self, conn: &mut Connection<S>, message: M) -> Result<()> {
        let outgoing = self.inner.bus.publish(message).into_outgoing()?;
        self.store_outgoing(conn, &[outgoing]).await
    }

    /// Stores a send of `message` to `address` in the caller's transaction.
    pub async fn send<M: Message>(
        &self,
        conn: &mut Connection<S>,
        address: impl IntoAddress,
        message: M,
    ) -> Result<()> {
        let outgoing = self.inner.bus.send(address, message).into_outgoing()?;
        self.store_outgoing(conn, &[outgoing]).await
    }

    /// Stores a publish or send prepared with options:
    /// `outbox.store(&mut *tx, bus.publish(m).header("Tenant", "acme"))`.
    pub async fn store<M: Message>(
        &self,
        conn: &mut Connection<S>,
        builder: SendBuilder<'_, M>,
    ) -> Result<()> {
        let outgoing = builder.into_outgoing()?;
        self.store_outgoing(conn, &[outgoing]).await
    }

    /// Stores built messages in the caller's transaction, in order, in this outbox.
    pub async fn store_outgoing(
        &self,
        conn: &mut Connection<S>,
        messages: &[OutgoingMessage],
    ) -> Result<()> {
        self.store_in(conn, &self.inner.options.outbox_id, messages)
            .await
    }

    pub(crate) async fn store_in(
        &self,
        conn: &mut Connection<S>,
        outbox_id: &str,
        messages: &[OutgoingMessage],
    ) -> Result<()> {
        let rows = messages
            .iter()
            .map(|m| NewMessage::from_outgoing(outbox_id, m))
            .collect::<Result<Vec<_>>>()?;
        self.inner.store.insert(conn, &rows).await
    }

    /// Messages stored and not delivered yet (committed ones only).
    pub async fn pending(&self) -> Result<i64> {
        Ok(self.inner.store.counts().await?.0)
    }

    /// Messages parked after failing for good (`failed_at` set); they stay in the table for
    /// an operator to inspect and are never removed by the retention cleanup.
    pub async fn parked(&self) -> Result<i64> {
        Ok(self.inner.store.counts().await?.1)
    }

    /// Wakes this process's dispatchers now (call it after committing, where the database
    /// has no notifications, to skip the poll interval).
    pub fn notify(&self) {
        self.inner.wake.notify_waiters();
    }
}
