//! One connection generation: the connection, its publishing channel (with the confirm
//! collector), the declaration channel, and consumer channels opened on it. A link that
//! fails is marked broken and the connector makes the next generation.

use std::sync::{Mutex, RwLock};

use busway_core::{Error, Result};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};

use crate::confirms::{Confirms, Identity, Outcome};

/// Cancelled when a link breaks.
pub(crate) use tokio_util::sync::CancellationToken as Token;

/// One established connection with its shared channels.
pub(crate) struct Link {
    pub(crate) connection: Connection,
    pub(crate) publisher: RwLock<Publisher>,
    /// Held while a publish takes its delivery tag and queues its frames (see
    /// [`Link::publish_in_order`]).
    pub(crate) publish_order: Mutex<()>,
    pub(crate) topology: tokio::sync::Mutex<Channel>,
    pub(crate) generation: u64,
    pub(crate) broken: Token,
    pub(crate) confirms: bool,
}

/// The publishing channel and, in confirm mode, the collector that settles its confirms.
#[derive(Clone)]
pub(crate) struct Publisher {
    pub(crate) channel: Channel,
    confirms: Option<Confirms>,
}

impl Publisher {
    pub(crate) fn new(channel: Channel, confirms: bool) -> Self {
        let confirms = confirms.then(|| Confirms::start(channel.clone()));
        Self { channel, confirms }
    }
}

pub(crate) fn lapin_error(what: &str, err: lapin::Error) -> Error {
    Error::transport(what.to_string(), err)
}

/// Opens a channel, in confirm mode if asked.
pub(crate) async fn open_channel(connection: &Connection, confirms: bool) -> Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| lapin_error("could not open a channel", e))?;
    if confirms {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| lapin_error("could not enable publisher confirms", e))?;
    }
    Ok(channel)
}

impl Link {
    /// True while the connection is up and not marked broken.
    pub(crate) fn healthy(&self) -> bool {
        !self.broken.is_cancelled() && self.connection.status().connected()
    }

    /// Marks the link broken so the supervisor reconnects now.
    pub(crate) fn mark_broken(&self) {
        self.broken.cancel();
    }

    async fn open_channel(&self, confirms: bool) -> Result<Channel> {
        open_channel(&self.connection, confirms).await
    }

    /// The publishing channel (confirm mode), reopened if the broker closed it.
    pub(crate) async fn publisher(&self) -> Result<Publisher> {
        let current = self
            .publisher
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if current.channel.status().connected() {
            return Ok(current);
        }
        let fresh = self.open_channel(self.confirms).await?;
        let mut slot = self.publisher.write().unwrap_or_else(|e| e.into_inner());
        if slot.channel.status().connected() {
            // Someone else reopened it first.
            return Ok(slot.clone());
        }
        *slot = Publisher::new(fresh, self.confirms);
        Ok(slot.clone())
    }

    /// Publishes on `publisher` and waits for the broker's word on this very message.
    ///
    /// `publish` is `publisher.channel.basic_publish(..)` for the message `identity`
    /// describes. Its first poll (where lapin takes the delivery tag and queues the frames)
    /// runs under a lock, and so does its registration with the confirm collector, so the
    /// collector sees publishes in tag order (see [`crate::confirms`]).
    pub(crate) async fn publish_confirmed<F>(
        &self,
        publisher: &Publisher,
        publish: F,
        identity: Option<Identity>,
    ) -> lapin::Result<Outcome>
    where
        F: Future<Output = lapin::Result<lapin::PublisherConfirm>>,
    {
        let Some(confirms) = &publisher.confirms else {
            let (confirm, ()) = self.publish_in_order(publish, |_| ()).await;
            return Ok(match confirm?.await? {
                lapin::Confirmation::Nack(_) => Outcome::Refused,
                _ => Outcome::Accepted,
            });
        };
        // A publish refused before it took a tag (closed channel) is not registered.
        let (confirm, pending) = self
            .publish_in_order(publish, |first| match first {
                std::task::Poll::Ready(Err(_)) => None,
                _ => Some(confirms.register(identity)),
            })
            .await;
        let Some(mut pending) = pending else {
            return confirm.map(|_| Outcome::Accepted);
        };
        let failed = confirm.as_ref().err().cloned();
        pending.written(confirm);
        if let Some(err) = failed {
            return Err(err);
        }
        Ok(pending.outcome().await)
    }

    /// Runs `publish` (a `basic.publish` future on this link's publishing channel) so that
    /// its frames reach the wire in the order of the delivery tags, and `in_order` (given
    /// the first poll's result) in that same order.
    ///
    /// lapin takes a publish's delivery tag and queues its frames in the future's first
    /// poll, without a lock across the two: two tasks polling publishes at once on two
    /// threads can take tags 1 and 2 and queue their frames as 2, 1. The broker numbers
    /// messages by arrival, so each confirm then resolves the other publish: a refused
    /// message reported as accepted, and the reverse. The first poll runs under a lock here;
    /// the rest of the future (waiting for the write) does not, so publishes still pipeline.
    pub(crate) async fn publish_in_order<F, T, R>(
        &self,
        publish: F,
        in_order: impl FnOnce(&std::task::Poll<T>) -> R,
    ) -> (T, R)
    where
        F: Future<Output = T>,
    {
        let mut publish = std::pin::pin!(publish);
        let mut in_order = Some(in_order);
        let (first, registered) = std::future::poll_fn(|cx| {
            let _order = self
                .publish_order
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let polled = publish.as_mut().poll(cx);
            let registered = in_order.take().map(|f| f(&polled));
            std::task::Poll::Ready((polled, registered))
        })
        .await;
        let registered = registered.expect("poll_fn runs its closure once");
        match first {
            std::task::Poll::Ready(out) => (out, registered),
            std::task::Poll::Pending => (publish.await, registered),
        }
    }

    /// The declaration channel, reopened if the broker closed it (a failed declare closes it).
    pub(crate) async fn topology_channel(&self) -> Result<tokio::sync::MutexGuard<'_, Channel>> {
        let mut guard = self.topology.lock().await;
        if !guard.status().connected() {
            *guard = self.open_channel(false).await?;
        }
        Ok(guard)
    }

    /// A new channel for a consumer.
    pub(crate) async fn consumer_channel(&self) -> Result<Channel> {
        self.open_channel(false).await
    }
}
