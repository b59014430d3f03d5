//! [`QueueAdmin`] on RabbitMQ: passive declares, `basic.get`, purge and delete, each on a
//! channel of its own and bounded by the publish timeout, so they work while a bus runs and
//! after it shut down.

use async_trait::async_trait;
use busway_core::transport::QueueAdmin;
use busway_core::{Result, TransportMessage};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{FieldTable, ShortString};

use crate::transport::RabbitMq;
use crate::wire;

#[async_trait]
impl QueueAdmin for RabbitMq {
    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        let queue = ShortString::from(queue);
        self.with_admin_channel(move |channel| async move {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            // A passive declare of a missing queue closes the channel: that is depth 0.
            Ok(channel
                .queue_declare(queue, passive, FieldTable::default())
                .await
                .map(|q| u64::from(q.message_count()))
                .unwrap_or(0))
        })
        .await
    }

    async fn take_messages(&self, queue: &str, max: usize) -> Result<Vec<TransportMessage>> {
        let queue = ShortString::from(queue);
        self.with_admin_channel(move |channel| async move {
            let mut out = Vec::new();
            while out.len() < max {
                match channel
                    .basic_get(queue.clone(), BasicGetOptions { no_ack: true })
                    .await
                {
                    Ok(Some(m)) => {
                        let d = m.delivery;
                        out.push(wire::from_delivery(d.data, &d.properties));
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            Ok(out)
        })
        .await
    }

    async fn purge_queue(&self, queue: &str) -> Result<u64> {
        let queue = ShortString::from(queue);
        self.with_admin_channel(move |channel| async move {
            Ok(channel
                .queue_purge(queue, QueuePurgeOptions::default())
                .await
                .map(u64::from)
                .unwrap_or(0))
        })
        .await
    }

    /// Deletes the queues and the exchanges of the same names (MassTransit declares both
    /// for an endpoint); missing ones are ignored.
    async fn delete_queues(&self, queues: &[String]) -> Result<()> {
        for name in queues {
            let n = ShortString::from(name.as_str());
            self.with_admin_channel(move |channel| async move {
                let _ = channel.queue_delete(n, Default::default()).await;
                Ok(())
            })
            .await?;
            let n = ShortString::from(name.as_str());
            self.with_admin_channel(move |channel| async move {
                let _ = channel.exchange_delete(n, Default::default()).await;
                Ok(())
            })
            .await?;
        }
        self.forget_declarations();
        Ok(())
    }
}
