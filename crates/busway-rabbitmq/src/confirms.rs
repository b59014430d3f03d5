//! Publisher confirms and returns, each attributed to the publish it belongs to.
//!
//! lapin resolves a publish's confirm future when the broker acks or nacks its delivery tag,
//! and attaches a `basic.return` to whichever confirm it completes next. Under concurrency
//! that is often another publish: a `multiple` ack completes its tags in hash order, and the
//! immediate ack of an unroutable message races the later acks of routed, persisted ones. A
//! returned send could then be reported as delivered (a lost message) and a delivered one as
//! returned.
//!
//! So every confirm of a publishing channel goes through one collector task, in delivery-tag
//! order. It gathers every returned message it sees into a pool and decides each publish in
//! turn: returned when the pool holds a message with the publish's identity (exchange,
//! routing key, message id, body), else acked or nacked as the broker said. A return always
//! reaches the client before the confirm of its message, so by the time a publish's confirm
//! is resolved its return (if any) sits in a confirm resolved no later; the collector takes
//! lapin's acknowledgement lock once (see [`barrier`]) so a `multiple` ack still being
//! applied has finished, then harvests every confirm that is ready.

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::FutureExt;
use lapin::message::BasicReturnMessage;
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};

/// How many returned messages the collector keeps unmatched before it drops the oldest (the
/// returns of publishes whose callers went away).
const MAX_UNMATCHED: usize = 1024;

/// What identifies a publish among the returns.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) message_id: Option<String>,
    pub(crate) body: Bytes,
}

impl Identity {
    fn matches(&self, returned: &BasicReturnMessage) -> bool {
        let d = &returned.delivery;
        d.exchange.as_str() == self.exchange
            && d.routing_key.as_str() == self.routing_key
            && d.properties.message_id().as_ref().map(ShortString::as_str)
                == self.message_id.as_deref()
            && d.data.as_slice() == self.body.as_ref()
    }
}

/// How the broker settled one publish.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Accepted (or confirms are off).
    Accepted,
    /// Refused (`basic.nack`).
    Refused,
    /// Returned as unroutable (`basic.return`): the reply code and text.
    Returned(u16, String),
    /// The channel or connection failed before the broker said.
    Failed(lapin::Error),
    /// The collector stopped (its channel is gone) before the broker said.
    Lost,
}

/// One publish waiting for its outcome.
struct Entry {
    state: State,
    /// `None` for a publish that is not mandatory: the broker never returns one.
    identity: Option<Identity>,
    done: Option<oneshot::Sender<Outcome>>,
}

enum State {
    /// The publish took its tag; its frames are not written yet.
    Writing(oneshot::Receiver<lapin::Result<PublisherConfirm>>),
    /// Written; the broker has not said yet.
    Waiting(PublisherConfirm),
    /// The broker said (the returned message, if any, moved to the pool).
    Said(SaidKind),
    /// Failed before the broker said.
    Failed(lapin::Error),
    /// The caller went away before the frames were written.
    Abandoned,
}

#[derive(Clone, Copy)]
enum SaidKind {
    Ack,
    Nack,
}

/// The publishing side of a channel's collector.
#[derive(Clone, Debug)]
pub(crate) struct Confirms {
    entries: mpsc::UnboundedSender<Entry>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// A publish registered with the collector: complete it with [`Pending::written`], then
/// await [`Pending::outcome`].
pub(crate) struct Pending {
    written: Option<oneshot::Sender<lapin::Result<PublisherConfirm>>>,
    outcome: oneshot::Receiver<Outcome>,
}

impl Confirms {
    /// Starts the collector of `channel` (a channel in confirm mode).
    pub(crate) fn start(channel: Channel) -> Self {
        let (entries, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect(channel, rx));
        Self { entries }
    }

    /// Registers a publish that just took its delivery tag. Call it in tag order (under the
    /// lock the tags are taken with).
    pub(crate) fn register(&self, identity: Option<Identity>) -> Pending {
        let (written, writing) = oneshot::channel();
        let (done, outcome) = oneshot::channel();
        let _ = self.entries.send(Entry {
            state: State::Writing(writing),
            identity,
            done: Some(done),
        });
        Pending {
            written: Some(written),
            outcome,
        }
    }
}

impl Pending {
    /// Hands over the publish's confirm (or the error writing it).
    pub(crate) fn written(&mut self, confirm: lapin::Result<PublisherConfirm>) {
        if let Some(tx) = self.written.take() {
            let _ = tx.send(confirm);
        }
    }

    /// How the broker settled the publish.
    pub(crate) async fn outcome(self) -> Outcome {
        drop(self.written);
        self.outcome.await.unwrap_or(Outcome::Lost)
    }
}

/// Waits until any acknowledgement lapin is applying (a `multiple` ack resolves its tags one
/// by one under its acknowledgement lock) has been applied, by taking that lock once:
/// `wait_for_confirms` takes it synchronously in its first poll. busway does not otherwise
/// use `wait_for_confirms`, whose bookkeeping this touches.
fn barrier(channel: &Channel) {
    let _ = channel.wait_for_confirms().now_or_never();
}

async fn collect(channel: Channel, mut rx: mpsc::UnboundedReceiver<Entry>) {
    let mut queue: VecDeque<Entry> = VecDeque::new();
    let mut returned: VecDeque<BasicReturnMessage> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(entry) => queue.push_back(entry),
                None => return,
            }
        }
        // Bring the front to a final state, waiting as needed.
        let Some(front) = queue.front_mut() else {
            continue;
        };
        match &mut front.state {
            State::Writing(writing) => {
                front.state = match writing.await {
                    Ok(Ok(confirm)) => State::Waiting(confirm),
                    Ok(Err(err)) => State::Failed(err),
                    Err(_) => State::Abandoned,
                };
                continue;
            }
            State::Waiting(confirm) => {
                let said = confirm.await;
                front.state = settle(said, &mut returned);
            }
            State::Said(_) | State::Failed(_) | State::Abandoned => {}
        }
        // Harvest every confirm that is ready now, so returns carried by later confirms of
        // the same acknowledgement are in the pool.
        barrier(&channel);
        while let Ok(entry) = rx.try_recv() {
            queue.push_back(entry);
        }
        for entry in queue.iter_mut().skip(1) {
            harvest(entry, &mut returned);
        }
        while returned.len() > MAX_UNMATCHED {
            returned.pop_front();
        }
        let Some(mut front) = queue.pop_front() else {
            continue;
        };
        let outcome = match std::mem::replace(&mut front.state, State::Abandoned) {
            State::Said(kind) => match returned
                .iter()
                .position(|r| front.identity.as_ref().is_some_and(|i| i.matches(r)))
            {
                Some(i) => {
                    let r = returned.remove(i).expect("index from position");
                    Outcome::Returned(r.reply_code, r.reply_text.as_str().to_string())
                }
                None => match kind {
                    SaidKind::Ack => Outcome::Accepted,
                    SaidKind::Nack => Outcome::Refused,
                },
            },
            State::Failed(err) => Outcome::Failed(err),
            State::Abandoned | State::Writing(_) | State::Waiting(_) => continue,
        };
        if let Some(done) = front.done.take() {
            let _ = done.send(outcome);
        }
    }
}

/// Moves an entry on as far as it can go without waiting.
fn harvest(entry: &mut Entry, returned: &mut VecDeque<BasicReturnMessage>) {
    if let State::Writing(writing) = &mut entry.state {
        entry.state = match writing.try_recv() {
            Ok(Ok(confirm)) => State::Waiting(confirm),
            Ok(Err(err)) => State::Failed(err),
            Err(oneshot::error::TryRecvError::Empty) => return,
            Err(oneshot::error::TryRecvError::Closed) => State::Abandoned,
        };
    }
    if let State::Waiting(confirm) = &mut entry.state
        && let Some(said) = confirm.now_or_never()
    {
        entry.state = settle(said, returned);
    }
}

fn settle(said: lapin::Result<Confirmation>, returned: &mut VecDeque<BasicReturnMessage>) -> State {
    match said {
        Ok(Confirmation::Ack(r)) => {
            returned.extend(r);
            State::Said(SaidKind::Ack)
        }
        Ok(Confirmation::Nack(r)) => {
            returned.extend(r);
            State::Said(SaidKind::Nack)
        }
        Ok(Confirmation::NotRequested) => State::Said(SaidKind::Ack),
        Err(err) => State::Failed(err),
    }
}
