//! Receiving from the in-memory broker: a receiver per endpoint bounded by prefetch, and a
//! settlement that acks, requeues, moves or redelivers; an unsettled delivery goes back to
//! the front of its queue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::broker::{Broker, Queue, Stored, lock};
use crate::error::Result;
use crate::transport::{
    Delivery, GiveBack, MoveError, MoveKind, Receiver, SettleOnDrop, Settlement, TransportMessage,
};

pub(super) struct InMemoryReceiver {
    pub(super) broker: Arc<Broker>,
    pub(super) queue: Arc<Queue>,
    pub(super) prefetch: Arc<Semaphore>,
    pub(super) stopped: bool,
}

#[async_trait]
impl Receiver for InMemoryReceiver {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.stopped {
            return None;
        }
        let permit = self.prefetch.clone().acquire_owned().await.ok()?;
        loop {
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.queue.inner).deleted {
                return None;
            }
            if let Some(stored) = self.queue.pop() {
                let message = stored.message.clone();
                let delivery_count = stored.delivery_count;
                return Some(Ok(Delivery {
                    message,
                    redelivered: delivery_count > 1,
                    delivery_count: Some(delivery_count),
                    lost: None,
                    settlement: Box::new(InMemorySettlement {
                        broker: self.broker.clone(),
                        unacked: SettleOnDrop::new(Unacked {
                            queue: self.queue.clone(),
                            stored,
                        }),
                        _permit: permit,
                    }),
                }));
            }
            notified.await;
        }
    }

    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let remaining = {
            let mut q = lock(&self.queue.inner);
            q.consumers = q.consumers.saturating_sub(1);
            q.consumers
        };
        // Wake another receiver on the queue in case this one held a notification.
        self.queue.notify.notify_one();
        if self.queue.temporary && remaining == 0 {
            self.broker.delete_queue(&self.queue.name);
        }
        Ok(())
    }
}

struct InMemorySettlement {
    broker: Arc<Broker>,
    unacked: SettleOnDrop<Unacked>,
    _permit: OwnedSemaphorePermit,
}

/// A delivery not yet settled: it goes back to the front of its queue if the settlement is
/// dropped.
struct Unacked {
    queue: Arc<Queue>,
    stored: Stored,
}

impl GiveBack for Unacked {
    fn give_back(self) {
        self.queue.push_front(self.stored);
    }
}

impl InMemorySettlement {
    fn ack_now(&mut self) -> Option<Arc<Queue>> {
        let Unacked { queue, .. } = self.unacked.take()?;
        queue.settled();
        Some(queue)
    }
}

#[async_trait]
impl Settlement for InMemorySettlement {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.ack_now();
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<()> {
        if let Some(unacked) = self.unacked.take() {
            unacked.give_back();
        }
        Ok(())
    }

    async fn move_to(
        mut self: Box<Self>,
        kind: MoveKind,
        message: TransportMessage,
    ) -> std::result::Result<(), MoveError> {
        let Some(unacked) = self.unacked.get() else {
            return Ok(());
        };
        let target = kind.queue_name(&unacked.queue.name);
        let queue = {
            let mut state = lock(&self.broker.state);
            Broker::declare_queue(&mut state, &target, false)
        };
        queue.push_back(Stored {
            message,
            delivery_count: 0,
        });
        self.ack_now();
        Ok(())
    }

    async fn redeliver(
        mut self: Box<Self>,
        message: TransportMessage,
        delay: Duration,
    ) -> Result<()> {
        if let Some(queue) = self.ack_now() {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                queue.push_back(Stored {
                    message,
                    delivery_count: 0,
                });
            });
        }
        Ok(())
    }
}
