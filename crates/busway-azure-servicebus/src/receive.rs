//! Receiving: pollers that peek-lock messages from a queue (at most `prefetch` held at once),
//! renew each lock while its consumer runs, and hand deliveries to the [`SbReceiver`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_messaging_servicebus::service_bus::PeekLockResponse;
use busway_core::transport::{Delivery, Receiver, SettleOnDrop};
use busway_core::{Error, ErrorKind, Result};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::settle::{Locked, SbSettlement};
use crate::transport::ServiceBus;
use crate::wire::Received;

pub(crate) async fn poll(
    bus: ServiceBus,
    queue: String,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
) {
    let client = match bus.queue_client(&queue) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    let wait = bus.shared.receive_wait;
    // Receive failures: 100 ms doubling to 5 s.
    let mut failures =
        busway_core::transport::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let response = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.peek_lock_message2(Some(wait)) => r,
        };
        let outcome = match response {
            Ok(response) => match Received::read(&response) {
                Ok(received) => Ok(received.map(|r| (r, response))),
                Err(e) => {
                    if matches!(u16::from(*response.status()), 200 | 201) {
                        // Locked but unreadable: hand it back now.
                        let _ = response.unlock_message().await;
                    }
                    Err(e)
                }
            },
            Err(e) => Err(Error::with_source(
                ErrorKind::Unavailable,
                format!("Service Bus did not answer a receive on `{queue}`"),
                e,
            )),
        };
        let received = match outcome {
            Ok(received) => received,
            Err(e) => {
                drop(permit);
                let failed = failures.failures() + 1;
                if failed == 1 || failed.is_multiple_of(20) {
                    tracing::warn!(queue = %queue, error = %e, failures = failed, "Service Bus receive failed");
                }
                if e.is_config() && failed == 1 {
                    // The endpoint reports it (a key without Listen rights, a revoked key).
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = tx.send(Err(e)) => if r.is_err() { return },
                    }
                }
                if !failures.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        let Some((received, lock)) = received else {
            drop(permit);
            continue;
        };
        failures.reset();
        let renew = CancellationToken::new();
        let lost = CancellationToken::new();
        let lock = Arc::new(lock);
        tokio::spawn(renew_lock(
            lock.clone(),
            received.lock_left,
            renew.clone(),
            lost.clone(),
            queue.clone(),
        ));
        let mut delivery = Delivery::new(
            received.message,
            Box::new(SbSettlement {
                bus: bus.clone(),
                queue: queue.clone(),
                lock: SettleOnDrop::new(Locked(lock)),
                renew,
                _permit: permit,
            }),
        );
        delivery.redelivered = received.delivery_count > 1;
        delivery.delivery_count = Some(received.delivery_count);
        delivery.lost = Some(lost);
        // Cannot block for long: a delivery holds one of `prefetch` permits and the channel
        // holds `prefetch`. A send refused after `stop` drops the delivery, which unlocks it.
        if tx.send(Ok(delivery)).await.is_err() {
            return;
        }
    }
}

/// Renews the lock at half its remaining time until the delivery is settled. When the lock
/// runs out without a successful renewal, it is lost: `lost` fires (the consumer's
/// cancellation), since Service Bus delivers the message again and this delivery can no
/// longer be completed.
async fn renew_lock(
    lock: Arc<PeekLockResponse>,
    first: Option<Duration>,
    settled: CancellationToken,
    lost: CancellationToken,
    queue: String,
) {
    let period = first
        .unwrap_or(Duration::from_secs(30))
        .max(Duration::from_millis(400));
    let mut held_until = tokio::time::Instant::now() + period;
    let mut wait = period / 2;
    loop {
        tokio::select! {
            _ = settled.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let asked = tokio::time::Instant::now();
        let renewed = tokio::select! {
            _ = settled.cancelled() => return,
            r = lock.renew_message_lock() => r,
        };
        match renewed {
            Ok(()) => {
                held_until = asked + period;
                wait = period / 2;
            }
            Err(e) if tokio::time::Instant::now() >= held_until => {
                tracing::warn!(queue = %queue, error = %e, "the message lock was lost (not renewed in time); cancelling the consumer, Service Bus delivers the message again");
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(queue = %queue, error = %e, "renewing a message lock failed; trying again before it runs out");
                let left = held_until.saturating_duration_since(tokio::time::Instant::now());
                wait = (period / 4)
                    .max(Duration::from_millis(200))
                    .min(left.max(Duration::from_millis(50)));
            }
        }
    }
}

pub(crate) struct SbReceiver {
    pub(crate) rx: mpsc::Receiver<Result<Delivery>>,
    pub(crate) stop: CancellationToken,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[async_trait]
impl Receiver for SbReceiver {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        // Closed first, so no poller can wait on a full channel; deliveries locked but not
        // handed out go back (their settlements unlock on drop).
        self.rx.close();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        while let Ok(d) = self.rx.try_recv() {
            drop(d);
        }
        Ok(())
    }
}
