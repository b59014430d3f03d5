//! The tasks that run an endpoint's deliveries through its pipeline.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::endpoint::EndpointRuntime;
use crate::endpoint::settle::handle_delivery;
use crate::transport::Delivery;

/// The tasks that process an endpoint's deliveries: started as they are needed, up to the
/// endpoint's concurrency, and kept for the endpoint's life. A delivery is handed to an idle
/// worker, or to a new one when none is idle; a task per delivery would cost an allocation
/// (and, with glibc, a contended arena lock) each time.
pub(crate) struct Workers {
    shared: Arc<WorkQueue>,
    runtime: Arc<EndpointRuntime>,
    hard: CancellationToken,
    started: std::cell::Cell<usize>,
    max: usize,
}

struct WorkQueue {
    queue: std::sync::Mutex<WorkState>,
    ready: tokio::sync::Notify,
}

struct WorkState {
    items: std::collections::VecDeque<(Delivery, OwnedSemaphorePermit)>,
    /// Workers waiting for an item and not yet promised one.
    idle: usize,
    closed: bool,
}

impl Workers {
    pub(crate) fn new(runtime: Arc<EndpointRuntime>, hard: CancellationToken, max: usize) -> Self {
        Self {
            shared: Arc::new(WorkQueue {
                queue: std::sync::Mutex::new(WorkState {
                    items: std::collections::VecDeque::new(),
                    idle: 0,
                    closed: false,
                }),
                ready: tokio::sync::Notify::new(),
            }),
            runtime,
            hard,
            started: std::cell::Cell::new(0),
            max,
        }
    }

    /// Queues a delivery for an idle worker; starts a worker when none is idle.
    pub(crate) fn hand_over(&self, delivery: Delivery, permit: OwnedSemaphorePermit) {
        let claimed = {
            let mut state = self.shared.lock();
            state.items.push_back((delivery, permit));
            if state.idle > 0 {
                state.idle -= 1;
                true
            } else {
                false
            }
        };
        if claimed {
            self.shared.ready.notify_one();
        } else if self.started.get() < self.max {
            self.started.set(self.started.get() + 1);
            tokio::spawn(worker(
                self.shared.clone(),
                self.runtime.clone(),
                self.hard.clone(),
            ));
        } else {
            // Every worker is busy: the one that finishes first takes it.
            self.shared.ready.notify_one();
        }
    }

    /// Lets the workers end once the queue is empty.
    pub(crate) fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_waiters();
    }
}

impl WorkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, WorkState> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn worker(queue: Arc<WorkQueue>, rt: Arc<EndpointRuntime>, hard: CancellationToken) {
    loop {
        let item = loop {
            let notified = queue.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = queue.lock();
                if let Some(item) = state.items.pop_front() {
                    break Some(item);
                }
                if state.closed {
                    break None;
                }
            }
            notified.await;
        };
        let Some((delivery, permit)) = item else {
            return;
        };
        let outcome = AssertUnwindSafe(handle_delivery(rt.clone(), delivery, hard.child_token()))
            .catch_unwind()
            .await;
        drop(permit);
        if outcome.is_err() {
            tracing::error!(endpoint = %rt.info.name, "a delivery panicked outside the consume pipeline");
        }
        queue.lock().idle += 1;
        // Let other tasks on this thread run between deliveries.
        tokio::task::consume_budget().await;
    }
}
