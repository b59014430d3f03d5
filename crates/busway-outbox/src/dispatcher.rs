//! The dispatcher: claims stored messages, delivers them through the bus in order, marks them
//! delivered, backs off while the broker is away, and removes old rows.

use busway_core::Result;
use busway_core::transport::Backoff;
use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use std::fmt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;
use crate::store::{Failure, OutboxStore};

/// A running dispatcher. Stop it with [`Dispatcher::stop`]; dropping it stops it too.
pub struct Dispatcher {
    id: String,
    stop: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl Dispatcher {
    pub(crate) fn new(id: String, stop: CancellationToken, handle: JoinHandle<()>) -> Self {
        Self {
            id,
            stop,
            handle: Some(handle),
        }
    }

    /// The dispatcher's id (its lease owner name on SQLite).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops after the delivery in progress and waits for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher").field("id", &self.id).finish()
    }
}

/// What one round did.
enum Round {
    /// Nothing to deliver.
    Idle,
    /// Delivered everything claimed.
    Delivered,
    /// A delivery failed; wait before the next round.
    Failed { unavailable: bool },
}

pub(crate) async fn run_dispatcher<S: OutboxStore>(
    outbox: Outbox<S>,
    id: String,
    stop: CancellationToken,
) {
    let inner = &outbox.inner;
    let options = &inner.options;
    let wake = inner.wake.clone();

    // Database notifications (PostgreSQL LISTEN) wake the loop; a broken listener is
    // re-opened on the next idle round.
    let listener_stop = stop.child_token();
    let mut listener: Option<JoinHandle<()>> = None;

    let mut failures = Backoff::new(options.min_backoff, options.max_backoff);
    let mut last_cleanup = tokio::time::Instant::now();
    tracing::debug!(dispatcher = %id, "outbox dispatcher started");
    loop {
        if stop.is_cancelled() {
            break;
        }
        if listener.as_ref().is_none_or(|h| h.is_finished()) {
            listener = spawn_listener(&outbox, wake.clone(), listener_stop.clone()).await;
        }
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        // Checked every round, busy or idle: under a constant backlog the loop never idles,
        // and delivered rows would pile up forever.
        if last_cleanup.elapsed() >= options.cleanup_interval {
            last_cleanup = tokio::time::Instant::now();
            cleanup(&outbox, &id).await;
        }
        let round = match deliver_round(&outbox, &id).await {
            Ok(r) => r,
            Err(err) => {
                tracing::warn!(dispatcher = %id, error = %err, "outbox dispatch failed");
                Round::Failed {
                    unavailable: err.is_unavailable() || err.is_database(),
                }
            }
        };
        match round {
            Round::Delivered => {
                failures.reset();
                continue;
            }
            Round::Idle => {
                failures.reset();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(options.poll_interval) => {}
                }
            }
            Round::Failed { unavailable } => {
                if unavailable {
                    tracing::info!(dispatcher = %id, failures = failures.failures() + 1, "the broker is unavailable; outbox delivery waits");
                }
                if !failures.wait(&stop).await {
                    break;
                }
            }
        }
    }
    listener_stop.cancel();
    if let Some(h) = listener {
        let _ = h.await;
    }
    tracing::debug!(dispatcher = %id, "outbox dispatcher stopped");
}

/// Removes delivered rows past their retention and inbox rows past the inbox window.
async fn cleanup<S: OutboxStore>(outbox: &Outbox<S>, id: &str) {
    let options = &outbox.inner.options;
    let now = Utc::now();
    let retention = chrono::Duration::from_std(options.retention).unwrap_or_default();
    let window = chrono::Duration::from_std(options.inbox_window).unwrap_or_default();
    match outbox
        .inner
        .store
        .cleanup(now - retention, now - window)
        .await
    {
        Ok((outbox_rows, inbox_rows)) if outbox_rows + inbox_rows > 0 => {
            tracing::debug!(dispatcher = %id, outbox_rows, inbox_rows, "removed old outbox and inbox rows");
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(dispatcher = %id, error = %err, "outbox cleanup failed"),
    }
}

async fn spawn_listener<S: OutboxStore>(
    outbox: &Outbox<S>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    match outbox.inner.store.listen().await {
        Ok(Some(mut notifications)) => Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = notifications.next() => match n {
                        Ok(()) => wake.notify_waiters(),
                        Err(err) => {
                            tracing::debug!(error = %err, "outbox notifications stopped; polling");
                            return;
                        }
                    },
                }
            }
        })),
        Ok(None) => None,
        Err(err) => {
            tracing::debug!(error = %err, "could not listen for outbox notifications; polling");
            None
        }
    }
}

async fn deliver_round<S: OutboxStore>(outbox: &Outbox<S>, id: &str) -> Result<Round> {
    let inner = &outbox.inner;
    let options = &inner.options;
    let Some(claim) = inner
        .store
        .claim(id, options.batch_size, options.lease)
        .await?
    else {
        return Ok(Round::Idle);
    };
    // A lease (SQLite) is renewed at a third of its length while the batch is delivered, so
    // a slow batch keeps it; a lease found lost stops the batch (nothing new starts).
    let mut renew = tokio::time::interval(options.lease / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renew.tick().await;
    let mut lost = false;
    let messages = claim.messages();
    let window = options.delivery_window.max(1);
    let mut delivered = Vec::with_capacity(messages.len());
    let mut failure = None;
    let mut unavailable = false;
    // Started in order, finished in order: `delivered` is the unbroken run of confirmed
    // messages; nothing new starts once one has failed.
    let mut in_flight = FuturesOrdered::new();
    let mut next = 0;
    loop {
        while !lost && failure.is_none() && next < messages.len() && in_flight.len() < window {
            let stored = &messages[next];
            next += 1;
            let bus = &inner.bus;
            in_flight.push_back(async move {
                let result = match stored.to_outgoing() {
                    Ok(outgoing) => bus.dispatch(outgoing).await,
                    Err(err) => Err(err),
                };
                (stored, result)
            });
        }
        let finished = tokio::select! {
            f = in_flight.next() => f,
            _ = renew.tick(), if !lost => {
                match claim.renew().await {
                    Ok(true) => {}
                    Ok(false) => {
                        lost = true;
                        tracing::warn!(dispatcher = %id, outbox = %claim.outbox_id(), "the outbox lease was lost; finishing what is in flight");
                    }
                    Err(err) => {
                        tracing::warn!(dispatcher = %id, error = %err, "renewing the outbox lease failed");
                    }
                }
                continue;
            }
        };
        let Some((stored, result)) = finished else {
            break;
        };
        if failure.is_some() {
            // In flight when an earlier one failed: it is delivered again after that one.
            continue;
        }
        match result {
            Ok(()) => delivered.push(stored.sequence),
            Err(err) => {
                unavailable = err.is_unavailable();
                let permanent = err.is_serialization() || err.is_address() || err.is_config();
                let park =
                    permanent || (!unavailable && stored.attempts + 1 >= options.max_attempts);
                let text = busway_core::error::chain_text(&err);
                if park {
                    tracing::error!(
                        outbox = %stored.outbox_id,
                        message_id = %stored.message_id,
                        attempts = stored.attempts + 1,
                        error = %text,
                        "outbox message cannot be delivered; parked (failed_at set) so the next ones can go"
                    );
                } else {
                    tracing::debug!(outbox = %stored.outbox_id, message_id = %stored.message_id, error = %text, "outbox delivery failed; will retry");
                }
                // Keep the order: nothing after a failed message is marked delivered.
                failure = Some(Failure {
                    sequence: stored.sequence,
                    error: text,
                    park,
                });
            }
        }
    }
    drop(in_flight);
    let failed = failure.as_ref().is_some_and(|f| !f.park);
    tracing::debug!(dispatcher = %id, outbox = %claim.outbox_id(), delivered = delivered.len(), "outbox batch delivered");
    claim.finish(&delivered, failure).await?;
    if failed {
        return Ok(Round::Failed { unavailable });
    }
    Ok(Round::Delivered)
}

impl<S: OutboxStore> Outbox<S> {
    /// Starts a dispatcher task. Run one per process or more; they share the work safely.
    pub fn start_dispatcher(&self) -> Dispatcher {
        let stop = tokio_util::sync::CancellationToken::new();
        let id = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let handle = tokio::spawn(run_dispatcher(self.clone(), id.clone(), stop.clone()));
        Dispatcher::new(id, stop, handle)
    }
}
