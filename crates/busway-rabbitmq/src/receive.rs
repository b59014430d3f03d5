//! Receiving: the consumer of one endpoint, started again (with back-off) after a lost
//! connection or a cancelled consumer, stopped and closed with the endpoint.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway_core::transport::{Backoff, Delivery, Receiver};
use busway_core::{Error, ErrorKind, Result};
use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};

use crate::acks::Acks;
use crate::connector::{Connector, Link, Token};
use crate::declare::{self, EndpointSpec};
use crate::settle::RabbitSettlement;
use crate::wire;

struct Active {
    channel: Channel,
    consumer: lapin::Consumer,
    acks: Arc<Acks>,
}

/// The [`Receiver`] of one endpoint's queue.
pub(crate) struct RabbitReceiver {
    connector: Arc<Connector>,
    spec: EndpointSpec,
    prefetch: u16,
    tag: String,
    active: Option<Active>,
    retired: Option<Active>,
    stop: Token,
    stopped: bool,
    failures: u32,
}

impl RabbitReceiver {
    /// A receiver of the endpoint `spec`; it starts consuming on its first `next`.
    pub(crate) fn new(connector: Arc<Connector>, spec: EndpointSpec, prefetch: u16) -> Self {
        Self {
            connector,
            spec,
            prefetch,
            tag: format!("busway-{}", uuid::Uuid::new_v4().simple()),
            active: None,
            retired: None,
            stop: Token::new(),
            stopped: false,
            failures: 0,
        }
    }

    async fn start(&self, link: &Link) -> Result<Active> {
        declare::endpoint(&self.connector, link, &self.spec).await?;
        let channel = link.consumer_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| {
                Error::transport(format!("basic.qos on `{}` failed", self.spec.name), e)
            })?;
        let consumer = channel
            .basic_consume(
                ShortString::from(self.spec.name.as_str()),
                ShortString::from(self.tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::transport(format!("consuming `{}` failed", self.spec.name), e))?;
        Ok(Active {
            channel,
            consumer,
            acks: Acks::new(self.prefetch),
        })
    }
}

#[async_trait]
impl Receiver for RabbitReceiver {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.stopped {
                return None;
            }
            if self.active.is_none() {
                let link = self.connector.link_wait(&self.stop).await?;
                tracing::debug!(endpoint = %self.spec.name, generation = link.generation, "starting the consumer");
                let started =
                    tokio::time::timeout(self.connector.config.connect_timeout, self.start(&link))
                        .await
                        .unwrap_or_else(|_| {
                            // The connection died under us; a new one comes from the supervisor.
                            link.mark_broken();
                            Err(Error::new(
                                ErrorKind::Unavailable,
                                "RabbitMQ did not answer while the consumer was starting",
                            ))
                        });
                match started {
                    Ok(active) => {
                        tracing::debug!(endpoint = %self.spec.name, generation = link.generation, "consumer started");
                        if self.failures > 0 {
                            tracing::info!(endpoint = %self.spec.name, "consuming again");
                        }
                        self.failures = 0;
                        self.active = Some(active);
                    }
                    Err(err) => {
                        self.failures += 1;
                        // The queue may be gone (deleted, expired): declare everything again
                        // on the next try instead of trusting what this link declared before.
                        self.connector.forget_declarations();
                        if self.failures == 1 || self.failures.is_multiple_of(10) {
                            tracing::warn!(endpoint = %self.spec.name, attempt = self.failures, error = %err, "could not start consuming; retrying");
                        }
                        // 100 ms doubling to 5 s.
                        let backoff = Backoff::delay_for(
                            self.failures,
                            Duration::from_millis(100),
                            Duration::from_secs(5),
                        );
                        tokio::select! {
                            _ = self.stop.cancelled() => return None,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        continue;
                    }
                }
            }
            let Some(active) = self.active.as_mut() else {
                continue;
            };
            match active.consumer.next().await {
                Some(Ok(d)) => {
                    let message = wire::from_delivery(d.data, &d.properties);
                    let redelivered = d.redelivered;
                    active.acks.register(d.delivery_tag, d.acker);
                    let settlement = Box::new(RabbitSettlement::new(
                        active.acks.clone(),
                        d.delivery_tag,
                        self.connector.clone(),
                        self.spec.clone(),
                    ));
                    let mut delivery = Delivery::new(message, settlement);
                    delivery.redelivered = redelivered;
                    return Some(Ok(delivery));
                }
                Some(Err(err)) => {
                    tracing::debug!(endpoint = %self.spec.name, error = %err, "the consumer failed; resuming");
                    self.active = None;
                }
                None => {
                    self.active = None;
                    if !self.stopped {
                        // The broker cancels a consumer when its queue is deleted (by an
                        // operator, a policy, `x-expires`): declare the queue and its bindings
                        // again before consuming, or the endpoint stays dead and publishes to
                        // its message types are dropped.
                        tracing::warn!(endpoint = %self.spec.name, "the broker cancelled the consumer (was the queue deleted?); declaring the endpoint again");
                        self.connector.forget_declarations();
                        tokio::select! {
                            _ = self.stop.cancelled() => return None,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                }
            }
        }
    }

    async fn stop(&mut self) -> Result<()> {
        self.stopped = true;
        self.stop.cancel();
        if let Some(mut active) = self.active.take() {
            let _ = active
                .channel
                .basic_cancel(
                    ShortString::from(self.tag.as_str()),
                    BasicCancelOptions::default(),
                )
                .await;
            // Deliveries already buffered in the client go back to the queue.
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_millis(200), active.consumer.next()).await
            {
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
            }
            // Keep the channel open: deliveries already handed out are still to be acked on
            // it. It closes when the receiver is dropped, after the endpoint settled them.
            self.retired = Some(active);
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        for active in [self.retired.take(), self.active.take()]
            .into_iter()
            .flatten()
        {
            if active.channel.status().connected() {
                // Acks still owed go out first, or the broker redelivers what was handled.
                active.acks.drain().await;
                let _ = active
                    .channel
                    .close(200, ShortString::from("busway: endpoint stopped"))
                    .await;
            }
        }
        Ok(())
    }
}
