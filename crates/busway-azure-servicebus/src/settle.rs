//! Settling a Service Bus delivery: complete (delete) it, unlock it so it comes back, move it
//! to an `_error` or `_skipped` queue, or redeliver it later with `ScheduledEnqueueTimeUtc`;
//! a settlement dropped unsettled unlocks its message.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_messaging_servicebus::service_bus::PeekLockResponse;
use busway_core::transport::{
    GiveBack, MoveError, MoveKind, SettleOnDrop, Settlement, spawn_on_current,
};
use busway_core::{Error, ErrorKind, Result, TransportMessage};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::transport::ServiceBus;

pub(crate) struct SbSettlement {
    pub(crate) bus: ServiceBus,
    pub(crate) queue: String,
    pub(crate) lock: SettleOnDrop<Locked>,
    pub(crate) renew: CancellationToken,
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// A message still locked to this receiver: unlocked (so Service Bus delivers it again at
/// once) when its settlement is dropped.
pub(crate) struct Locked(pub(crate) Arc<PeekLockResponse>);

impl GiveBack for Locked {
    fn give_back(self) {
        spawn_on_current(async move {
            let _ = self.0.unlock_message().await;
        });
    }
}

impl SbSettlement {
    async fn complete(&mut self) -> Result<()> {
        self.renew.cancel();
        let Some(Locked(lock)) = self.lock.take() else {
            return Ok(());
        };
        lock.delete_message().await.map(|_| ()).map_err(|e| {
            Error::with_source(
                ErrorKind::Transport,
                "completing the message failed (its lock was lost); Service Bus delivers it again",
                e,
            )
        })
    }
}

#[async_trait]
impl Settlement for SbSettlement {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.complete().await
    }

    async fn requeue(mut self: Box<Self>) -> Result<()> {
        self.renew.cancel();
        if let Some(Locked(lock)) = self.lock.take() {
            lock.unlock_message().await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Transport,
                    "unlocking the message failed; it returns when its lock expires",
                    e,
                )
            })?;
        }
        Ok(())
    }

    async fn move_to(
        mut self: Box<Self>,
        kind: MoveKind,
        message: TransportMessage,
    ) -> std::result::Result<(), MoveError> {
        let target = kind.queue_name(&self.queue);
        let sent = match self.bus.ensure_queue(&target, false).await {
            Ok(()) => self.bus.send_to_queue(&target, &message, None).await,
            Err(err) => Err(err),
        };
        if let Err(err) = sent {
            // Still locked (and renewed): the bus backs off and moves it again.
            return Err(MoveError::retry(err, self));
        }
        Ok(self.complete().await?)
    }

    async fn redeliver(
        mut self: Box<Self>,
        message: TransportMessage,
        delay: Duration,
    ) -> Result<()> {
        let queue = self.queue.clone();
        self.bus
            .send_to_queue(&queue, &message, Some(delay))
            .await?;
        self.complete().await
    }
}

impl Drop for SbSettlement {
    fn drop(&mut self) {
        // Stop renewing first; `lock` then unlocks a message nobody settled.
        self.renew.cancel();
    }
}
