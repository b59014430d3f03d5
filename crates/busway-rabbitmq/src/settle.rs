//! Settling a delivery: ack, requeue, move to the error or skipped queue, redeliver later;
//! a delivery dropped unsettled goes back to its queue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway_core::transport::{
    GiveBack, MoveError, MoveKind, SettleOnDrop, Settlement, spawn_on_current,
};
use busway_core::{Error, ErrorKind, Result, TransportMessage};
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use crate::connector::Connector;
use crate::declare::EndpointSpec;
use crate::route::{Route, publish};

/// How long an ack or nack may take before the channel is presumed dead (the broker then
/// redelivers the message when it notices).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The settlement of one RabbitMQ delivery.
pub(crate) struct RabbitSettlement {
    acker: SettleOnDrop<Unacked>,
    connector: Arc<Connector>,
    spec: EndpointSpec,
}

impl RabbitSettlement {
    /// The settlement of the delivery `acker` acks, received from the endpoint `spec`.
    pub(crate) fn new(acker: Acker, connector: Arc<Connector>, spec: EndpointSpec) -> Self {
        Self {
            acker: SettleOnDrop::new(Unacked(acker)),
            connector,
            spec,
        }
    }

    async fn ack_now(&mut self) -> Result<()> {
        let Some(Unacked(acker)) = self.acker.take() else {
            return Ok(());
        };
        let acked = tokio::time::timeout(SETTLE_TIMEOUT, acker.ack(BasicAckOptions::default()))
            .await
            .unwrap_or(Ok(false));
        match acked {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::new(
                ErrorKind::Transport,
                "the ack was not sent: its channel is gone; RabbitMQ will redeliver the message",
            )),
            Err(e) => Err(Error::transport(
                "the ack failed; RabbitMQ will redeliver the message",
                e,
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
        let Some(Unacked(acker)) = self.acker.take() else {
            return Ok(());
        };
        let nack = acker.nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        });
        match tokio::time::timeout(SETTLE_TIMEOUT, nack).await {
            Ok(result) => result.map(|_| ()).map_err(|e| {
                Error::transport("requeue failed; RabbitMQ will redeliver the message", e)
            }),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                "requeue timed out; RabbitMQ will redeliver the message when the channel closes",
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
struct Unacked(Acker);

impl GiveBack for Unacked {
    fn give_back(self) {
        spawn_on_current(async move {
            let _ = self
                .0
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
        });
    }
}
