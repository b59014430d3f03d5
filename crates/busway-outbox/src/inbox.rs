//! The consumer outbox and idempotent inbox: one database transaction per consume attempt.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::task::{Context, Poll};

use busway_core::{
    ConsumeContext, ConsumeError, ConsumeErrorKind, EndpointConfigurator, OutgoingCapture,
    ReceiveContext,
};
use futures_util::future::BoxFuture;
use sqlx::{Database, Transaction};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tower_layer::Layer;
use tower_service::Service;

use crate::outbox::Outbox;
use crate::store::OutboxStore;

/// The database transaction of the consume attempt in progress, shared between the
/// consumer outbox layer and the consumer. Get it with [`transaction`].
pub struct OutboxTransaction<DB: Database> {
    slot: Arc<Mutex<Option<Transaction<'static, DB>>>>,
}

impl<DB: Database> Clone for OutboxTransaction<DB> {
    fn clone(&self) -> Self {
        Self {
            slot: self.slot.clone(),
        }
    }
}

impl<DB: Database> fmt::Debug for OutboxTransaction<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxTransaction").finish_non_exhaustive()
    }
}

/// A locked transaction: derefs to the database connection, so queries run in it:
/// `sqlx::query("..").execute(&mut *tx).await`.
pub struct TxGuard<'a, DB: Database> {
    guard: MappedMutexGuard<'a, Transaction<'static, DB>>,
}

impl<DB: Database> Deref for TxGuard<'_, DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.guard
    }
}

impl<DB: Database> DerefMut for TxGuard<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.guard
    }
}

impl<DB: Database> fmt::Debug for TxGuard<'_, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxGuard").finish_non_exhaustive()
    }
}

fn outbox_error(what: &str, err: impl Into<busway_core::BoxError>) -> ConsumeError {
    ConsumeError::with_kind(
        ConsumeErrorKind::Consumer,
        format!("busway::OutboxError ({what})"),
        err,
    )
}

impl<DB: Database> OutboxTransaction<DB> {
    fn new(tx: Transaction<'static, DB>) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Some(tx))),
        }
    }

    /// Locks the transaction for a query.
    pub async fn lock(&self) -> Result<TxGuard<'_, DB>, ConsumeError> {
        let guard = self.slot.lock().await;
        MutexGuard::try_map(guard, |slot| slot.as_mut())
            .map(|guard| TxGuard { guard })
            .map_err(|_| {
                outbox_error(
                    "transaction",
                    "the consume attempt's transaction is already finished",
                )
            })
    }

    async fn take(&self) -> Option<Transaction<'static, DB>> {
        self.slot.lock().await.take()
    }
}

/// The transaction of the consume attempt in progress, for a consumer on an endpoint with
/// the consumer outbox. Its writes commit together with the inbox record and the messages
/// the consumer publishes, before the message is acknowledged.
///
/// ```ignore
/// let tx = busway::outbox::transaction::<Postgres, _>(ctx)?;
/// sqlx::query("UPDATE orders SET status = 'confirmed' WHERE id = $1")
///     .bind(order_id)
///     .execute(&mut *tx.lock().await?)
///     .await?;
/// ```
pub fn transaction<DB: Database, M>(
    ctx: &ConsumeContext<M>,
) -> Result<OutboxTransaction<DB>, ConsumeError> {
    ctx.payload::<OutboxTransaction<DB>>().ok_or_else(|| {
        ConsumeError::msg(
            "no outbox transaction: add the consumer outbox to this endpoint \
             (`e.transactional_outbox(&outbox)`) to consume inside a transaction",
        )
    })
}

/// Adds the consumer outbox to an endpoint.
pub trait EndpointOutboxExt: Sized {
    /// Runs each consume attempt in a transaction of `outbox`'s database with an inbox
    /// record and the consumer's messages stored in the same transaction.
    fn transactional_outbox<S: OutboxStore>(self, outbox: &Outbox<S>) -> Self;
}

impl EndpointOutboxExt for EndpointConfigurator {
    fn transactional_outbox<S: OutboxStore>(self, outbox: &Outbox<S>) -> Self {
        self.attempt_layer(outbox.consumer_outbox())
    }
}

/// The consumer outbox and inbox as a `tower::Layer` (an attempt layer).
pub struct ConsumerOutboxLayer<S: OutboxStore> {
    outbox: Outbox<S>,
}

impl<S: OutboxStore> ConsumerOutboxLayer<S> {
    pub(crate) fn new(outbox: Outbox<S>) -> Self {
        Self { outbox }
    }
}

impl<S: OutboxStore> Clone for ConsumerOutboxLayer<S> {
    fn clone(&self) -> Self {
        Self {
            outbox: self.outbox.clone(),
        }
    }
}

impl<S: OutboxStore> fmt::Debug for ConsumerOutboxLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerOutboxLayer")
            .finish_non_exhaustive()
    }
}

impl<S: OutboxStore, Inner> Layer<Inner> for ConsumerOutboxLayer<S> {
    type Service = ConsumerOutbox<S, Inner>;

    fn layer(&self, inner: Inner) -> Self::Service {
        ConsumerOutbox {
            outbox: self.outbox.clone(),
            inner,
        }
    }
}

/// The service made by [`ConsumerOutboxLayer`].
pub struct ConsumerOutbox<S: OutboxStore, Inner> {
    outbox: Outbox<S>,
    inner: Inner,
}

impl<S: OutboxStore, Inner: Clone> Clone for ConsumerOutbox<S, Inner> {
    fn clone(&self) -> Self {
        Self {
            outbox: self.outbox.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S: OutboxStore, Inner> fmt::Debug for ConsumerOutbox<S, Inner> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerOutbox").finish_non_exhaustive()
    }
}

impl<S, Inner> Service<ReceiveContext> for ConsumerOutbox<S, Inner>
where
    S: OutboxStore,
    Inner: Service<ReceiveContext, Response = (), Error = ConsumeError> + Clone + Send + 'static,
    Inner::Future: Send + 'static,
    for<'c> &'c mut <S::Database as Database>::Connection: Send,
{
    type Response = ();
    type Error = ConsumeError;
    type Future = BoxFuture<'static, Result<(), ConsumeError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConsumeError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, rc: ReceiveContext) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let outbox = self.outbox.clone();
        Box::pin(async move {
            let store = &outbox.inner.store;
            let endpoint = rc.endpoint_name().to_string();
            // Held for the attempt, like the transaction: attempts beyond the pool's size wait
            // here (for as long as it takes) rather than for a pooled connection, whose
            // acquire timeout would fault a healthy message.
            let _slot = outbox
                .inner
                .consumers
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| outbox_error("begin", e))?;
            let tx = store.begin().await.map_err(|e| outbox_error("begin", e))?;
            let handle = OutboxTransaction::new(tx);
            if let Some(message_id) = rc.message_id() {
                let fresh = {
                    let mut conn = handle.lock().await?;
                    store
                        .record_inbox(&mut conn, &endpoint, message_id)
                        .await
                        .map_err(|e| outbox_error("inbox", e))?
                };
                if !fresh {
                    if let Some(tx) = handle.take().await {
                        let _ = tx.rollback().await;
                    }
                    tracing::debug!(endpoint = %endpoint, %message_id, "already consumed (inbox); acknowledging the duplicate");
                    return Ok(());
                }
            } else {
                tracing::warn!(endpoint = %endpoint, "a message without a message id cannot be deduplicated by the inbox");
            }
            rc.set_payload(handle.clone());
            let capture = OutgoingCapture::new();
            let result = capture.scope(inner.call(rc.clone())).await;
            let captured = capture.take();
            let Some(mut tx) = handle.take().await else {
                return Err(outbox_error(
                    "commit",
                    "the consumer finished the outbox transaction itself",
                ));
            };
            if let Err(err) = result {
                let _ = tx.rollback().await;
                return Err(err);
            }
            outbox
                .store_in(&mut tx, &endpoint, &captured)
                .await
                .map_err(|e| outbox_error("store", e))?;
            tx.commit().await.map_err(|e| outbox_error("commit", e))?;
            if !captured.is_empty() {
                outbox.notify();
            }
            Ok(())
        })
    }
}

impl<S: OutboxStore> Outbox<S> {
    /// The consumer outbox and inbox for an endpoint: each attempt runs in a database
    /// transaction the consumer can use; the message id is recorded in the inbox (a duplicate
    /// is acknowledged and skipped); the consumer's publishes and sends are stored in the same
    /// transaction, which commits before the message is acknowledged. Add it with
    /// `e.attempt_layer(outbox.consumer_outbox())` (or [`EndpointOutboxExt`]).
    pub fn consumer_outbox(&self) -> ConsumerOutboxLayer<S> {
        ConsumerOutboxLayer::new(self.clone())
    }
}
