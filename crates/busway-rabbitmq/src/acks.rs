//! The acks of one consumer channel, sent as few `multiple` acks as at-least-once allows.
//!
//! A `basic.ack` with `multiple` set acknowledges every delivery of its channel up to its
//! tag, so it may only go out once every delivery at or below that tag is finished: one
//! still being handled, or about to be nacked back to its queue, must never be covered.
//! Deliveries are registered in the order the broker tagged them; settling one marks it
//! done, and the run of done deliveries at the front of the channel goes out as one
//! `multiple` ack when it reaches half the prefetch, or after a short linger. Done
//! deliveries held behind one still being handled are acked one by one at the linger, so a
//! slow message never keeps the prefetch window full of finished ones.
//!
//! Every ack leaves through one turn at a time, in the order it was collected: RabbitMQ
//! closes the channel for an ack of a tag it no longer holds, which a `multiple` ack
//! overtaken by an earlier single one would be.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;

/// How long a done delivery may wait for others before its ack goes out anyway.
pub(crate) const LINGER: Duration = Duration::from_millis(2);

/// How long an ack or nack may take before the channel is presumed dead (the broker then
/// redelivers the message when it notices).
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The unsettled deliveries of one consumer channel and the acks they are owed.
pub(crate) struct Acks {
    state: Mutex<Window<Acker>>,
    /// One flush sends at a time, so acks leave in the order they were collected.
    turn: tokio::sync::Mutex<()>,
    /// Wakes the flusher, which sends what is done after [`LINGER`].
    wake: mpsc::Sender<()>,
}

/// What settling one delivery did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Acked {
    /// The delivery is marked done; its ack goes out with others.
    Later,
    /// The channel is closed: RabbitMQ redelivers the message.
    ChannelGone,
}

impl Acks {
    /// The acks of a channel consuming with `prefetch`; a `multiple` ack goes out once half
    /// of it is done. Spawns the flusher on the current runtime.
    pub(crate) fn new(prefetch: u16) -> Arc<Self> {
        let batch = match prefetch {
            0 => 64,
            n => usize::from(n / 2).max(1),
        };
        let (wake, woken) = mpsc::channel(1);
        let acks = Arc::new(Self {
            state: Mutex::new(Window::new(batch)),
            turn: tokio::sync::Mutex::new(()),
            wake,
        });
        tokio::spawn(flusher(Arc::downgrade(&acks), woken));
        acks
    }

    fn window(&self) -> MutexGuard<'_, Window<Acker>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tracks a delivery just received; deliveries must be registered in tag order.
    pub(crate) fn register(&self, tag: u64, acker: Acker) {
        self.window().register(tag, acker);
    }

    /// Marks the delivery `tag` done: its ack goes out with the others, or now when the run
    /// of done deliveries at the front is long enough.
    pub(crate) async fn ack(&self, tag: u64) -> Acked {
        let full = {
            let mut window = self.window();
            if window.get(tag).is_some_and(Acker::poisoned) {
                window.remove(tag);
                return Acked::ChannelGone;
            }
            let Some(marked) = window.mark_done(tag) else {
                return Acked::Later;
            };
            if marked.arm {
                // Capacity one: a wake already pending serves this ack too.
                let _ = self.wake.try_send(());
            }
            marked.full
        };
        if full {
            self.flush(false).await;
        }
        Acked::Later
    }

    /// Nacks the delivery `tag` on its own (back to the queue with `requeue`). No
    /// `multiple` ack covers it while the nack is on its way.
    pub(crate) async fn nack(&self, tag: u64, requeue: bool) -> lapin::Result<bool> {
        let Some(acker) = self.window().start_return(tag) else {
            return Ok(false);
        };
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        let result = match tokio::time::timeout(SETTLE_TIMEOUT, acker.nack(options)).await {
            Ok(result) => result,
            Err(_) => Ok(false),
        };
        let arm = {
            let mut window = self.window();
            window.remove(tag);
            window.arm_if_done()
        };
        if arm {
            let _ = self.wake.try_send(());
        }
        result
    }

    /// Sends every ack owed now (before the channel closes).
    pub(crate) async fn drain(&self) {
        self.flush(true).await;
    }

    /// Sends the run of done deliveries at the front as one `multiple` ack; with `all`,
    /// also the done ones held behind a delivery still being handled, one by one.
    async fn flush(&self, all: bool) {
        let _turn = self.turn.lock().await;
        let (multiple, singles) = self.window().collect(all);
        if let Some(acker) = multiple {
            send_ack(acker, true).await;
        }
        for acker in singles {
            send_ack(acker, false).await;
        }
    }
}

async fn send_ack(acker: Acker, multiple: bool) {
    let ack = acker.ack(BasicAckOptions { multiple });
    match tokio::time::timeout(SETTLE_TIMEOUT, ack).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            tracing::debug!("an ack was not sent: its channel is gone; RabbitMQ redelivers");
        }
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "an ack failed; RabbitMQ redelivers");
        }
        Err(_) => tracing::debug!("an ack timed out; RabbitMQ redelivers"),
    }
}

/// Sends what is done a linger after it was woken, until its [`Acks`] is dropped.
async fn flusher(acks: Weak<Acks>, mut woken: mpsc::Receiver<()>) {
    while woken.recv().await.is_some() {
        tokio::time::sleep(LINGER).await;
        let Some(acks) = acks.upgrade() else { return };
        acks.flush(true).await;
    }
}

/// Where one delivery is in its settling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Handed to the endpoint and not settled yet.
    Handling,
    /// Settled with an ack not sent yet.
    Done,
    /// A nack on its way.
    Returning,
}

struct Slot<A> {
    tag: u64,
    acker: A,
    stage: Stage,
}

/// What marking a delivery done calls for.
struct Marked {
    /// The run of done deliveries at the front is long enough for a `multiple` ack now.
    full: bool,
    /// The flusher is not woken yet: wake it.
    arm: bool,
}

/// The bookkeeping behind [`Acks`], apart from the client so it can be tested alone: the
/// unsettled deliveries of a channel in tag order.
struct Window<A> {
    slots: VecDeque<Slot<A>>,
    /// Done deliveries at the front that make a `multiple` ack worth sending at once.
    batch: usize,
    /// The flusher was woken and has not flushed yet.
    armed: bool,
}

impl<A> Window<A> {
    fn new(batch: usize) -> Self {
        Self {
            slots: VecDeque::new(),
            batch,
            armed: false,
        }
    }

    fn register(&mut self, tag: u64, acker: A) {
        debug_assert!(self.slots.back().is_none_or(|s| s.tag < tag));
        self.slots.push_back(Slot {
            tag,
            acker,
            stage: Stage::Handling,
        });
    }

    fn position(&self, tag: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&tag, |s| s.tag).ok()
    }

    fn get(&self, tag: u64) -> Option<&A> {
        self.position(tag).map(|i| &self.slots[i].acker)
    }

    fn remove(&mut self, tag: u64) -> Option<A> {
        let i = self.position(tag)?;
        self.slots.remove(i).map(|s| s.acker)
    }

    /// Marks `tag` done; `None` when it is not an unsettled delivery handed out.
    fn mark_done(&mut self, tag: u64) -> Option<Marked> {
        let i = self.position(tag)?;
        let slot = &mut self.slots[i];
        if slot.stage != Stage::Handling {
            return None;
        }
        slot.stage = Stage::Done;
        let full = self.done_at_front() >= self.batch;
        let arm = !std::mem::replace(&mut self.armed, true);
        Some(Marked { full, arm })
    }

    /// Arms the flusher when done deliveries wait and it is not armed.
    fn arm_if_done(&mut self) -> bool {
        if self.armed || !self.slots.iter().any(|s| s.stage == Stage::Done) {
            return false;
        }
        self.armed = true;
        true
    }

    /// Starts returning `tag`: its acker, with the delivery kept in place so that no
    /// `multiple` ack covers it until [`Self::remove`].
    fn start_return(&mut self, tag: u64) -> Option<A>
    where
        A: Clone,
    {
        let i = self.position(tag)?;
        let slot = &mut self.slots[i];
        if slot.stage != Stage::Handling {
            return None;
        }
        slot.stage = Stage::Returning;
        Some(slot.acker.clone())
    }

    fn done_at_front(&self) -> usize {
        self.slots
            .iter()
            .take_while(|s| s.stage == Stage::Done)
            .count()
    }

    /// Takes the acks to send: the acker of the last done delivery of the run at the front
    /// (to ack with `multiple`), and with `all` the ackers of the done deliveries behind it
    /// (to ack one by one). `all` also disarms the flusher, since nothing done is left.
    fn collect(&mut self, all: bool) -> (Option<A>, Vec<A>) {
        let mut multiple = None;
        while self.slots.front().is_some_and(|s| s.stage == Stage::Done) {
            multiple = self.slots.pop_front().map(|s| s.acker);
        }
        let mut singles = Vec::new();
        if all {
            self.armed = false;
            let mut kept = VecDeque::with_capacity(self.slots.len());
            for slot in self.slots.drain(..) {
                if slot.stage == Stage::Done {
                    singles.push(slot.acker);
                } else {
                    kept.push_back(slot);
                }
            }
            self.slots = kept;
        }
        (multiple, singles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(tags: impl IntoIterator<Item = u64>, batch: usize) -> Window<u64> {
        let mut w = Window::new(batch);
        for tag in tags {
            w.register(tag, tag);
        }
        w
    }

    #[test]
    fn the_done_run_at_the_front_goes_out_as_one_multiple_ack() {
        let mut w = window(1..=4, 3);
        assert!(!w.mark_done(1).expect("handed out").full);
        assert!(!w.mark_done(2).expect("handed out").full);
        assert!(w.mark_done(3).expect("handed out").full);
        assert_eq!(w.collect(false), (Some(3), vec![]));
        assert_eq!(w.slots.len(), 1, "only tag 4 is left");
    }

    #[test]
    fn a_delivery_still_handled_holds_back_the_multiple_ack() {
        let mut w = window(1..=5, 2);
        w.mark_done(1);
        w.mark_done(3);
        w.mark_done(4);
        // Tag 2 is being handled: a multiple ack may cover 1 only.
        assert_eq!(w.collect(false), (Some(1), vec![]));
        // At the linger, 3 and 4 go out on their own; 2 and 5 stay.
        w.mark_done(3);
        assert_eq!(w.collect(true), (None, vec![3, 4]));
        assert_eq!(w.slots.iter().map(|s| s.tag).collect::<Vec<_>>(), [2, 5]);
    }

    #[test]
    fn a_delivery_being_nacked_is_never_covered() {
        let mut w = window(1..=3, 1);
        assert_eq!(w.start_return(2), Some(2));
        w.mark_done(3);
        w.mark_done(1);
        assert_eq!(w.collect(false), (Some(1), vec![]));
        // Still in place while its nack is on its way: 3 waits behind it.
        assert_eq!(w.collect(false), (None, vec![]));
        assert_eq!(w.remove(2), Some(2));
        assert_eq!(w.collect(false), (Some(3), vec![]));
        assert!(w.slots.is_empty());
    }

    #[test]
    fn settling_twice_or_an_unknown_tag_does_nothing() {
        let mut w = window([7], 4);
        assert!(w.mark_done(7).expect("handed out").arm);
        assert!(w.mark_done(7).is_none(), "already done");
        assert!(w.start_return(7).is_none(), "done, not returned");
        assert!(w.mark_done(8).is_none(), "never handed out");
        assert_eq!(w.collect(true), (Some(7), vec![]));
        assert!(!w.armed);
    }

    #[test]
    fn the_flusher_is_armed_once_per_flush() {
        let mut w = window(1..=3, 8);
        assert!(w.mark_done(1).expect("handed out").arm);
        assert!(!w.mark_done(2).expect("handed out").arm);
        w.collect(true);
        assert!(w.mark_done(3).expect("handed out").arm);
    }
}
