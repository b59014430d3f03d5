//! Settling a delivery: ack, requeue, move to the error or skipped queue, redeliver later;
//! a delivery dropped unsettled goes back to its queue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway_core::transport::{
    GiveBack, MoveError, MoveKind, SettleOnDrop, Settlement, spawn_on_current,
};
use busway_core::{Error, ErrorKind, Result, TransportMessage};

use crate::acks::{Acked, Acks};
use crate::connector::Connector;
use crate::declare::EndpointSpec;
use crate::route::{Route, publish};

/// The settlement of one RabbitMQ delivery.
pub(crate) struct RabbitSettlement {
    pending: SettleOnDrop<Unacked>,
    connector: Arc<Connector>,
    spec: EndpointSpec,
}

impl RabbitSettlement {
    /// The settlement of the delivery `tag` of the channel whose acks are `acks`, received
    /// from the endpoint `spec`.
    pub(crate) fn new(
        acks: Arc<Acks>,
        tag: u64,
        connector: Arc<Connector>,
        spec: EndpointSpec,
    ) -> Self {
        Self {
            pending: SettleOnDrop::new(Unacked { acks, tag }),
            connector,
            spec,
        }
    }

    /// Marks the delivery done; its ack goes out with the channel's next `multiple` ack
    /// (see [`Acks`]). A process that dies before then gets the message redelivered.
    async fn ack_now(&mut self) -> Result<()> {
        let Some(Unacked { acks, tag }) = self.pending.take() else {
            return Ok(());
        };
        match acks.ack(tag).await {
            Acked::Later => Ok(()),
            Acked::ChannelGone => Err(Error::new(
                ErrorKind::Transport,
                "the ack was not sent: its channel is gone; RabbitMQ will redeliver the message",
            )),
        }
    }
}

#[async_trait]
impl Settlement for RabbitSettlement {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.ack_now().await
    }

    async fn requeue(mut self: Box<Self>) -> Result<()> {
        let Some(Unacked { acks, tag }) = self.pending.take() else {
            return Ok(());
        };
        match acks.nack(tag, true).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::new(
                ErrorKind::Unavailable,
                "requeue was not sent (channel gone or timed out); RabbitMQ will redeliver the message when the channel closes",
            )),
            Err(e) => Err(Error::transport(
                "requeue failed; RabbitMQ will redeliver the message",
                e,
            )),
        }
    }

    async fn move_to(
        mut self: Box<Self>,
        kind: MoveKind,
        message: TransportMessage,
    ) -> std::result::Result<(), MoveError> {
        let spec = self.spec.companion(kind.suffix());
        if let Err(err) = publish(&self.connector, Route::Endpoint(spec), &message, None).await {
            // Still unacked: the bus backs off and moves it again.
            return Err(MoveError::retry(err, self));
        }
        Ok(self.ack_now().await?)
    }

    async fn redeliver(
        mut self: Box<Self>,
        message: TransportMessage,
        delay: Duration,
    ) -> Result<()> {
        let mut target = self.spec.clone();
        target.message_types.clear();
        publish(
            &self.connector,
            Route::Endpoint(target),
            &message,
            Some(delay.max(Duration::from_millis(1))),
        )
        .await?;
        self.ack_now().await
    }
}

/// A delivery not acked yet: nacked with requeue when its settlement is dropped.
struct Unacked {
    acks: Arc<Acks>,
    tag: u64,
}

impl GiveBack for Unacked {
    fn give_back(self) {
        spawn_on_current(async move {
            let _ = self.acks.nack(self.tag, true).await;
        });
    }
}
