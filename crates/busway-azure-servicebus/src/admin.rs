//! [`QueueAdmin`] on Service Bus: counts from the management API, receive-and-delete over
//! the data plane.

use std::time::Duration;

use async_trait::async_trait;
use busway_core::transport::QueueAdmin;
use busway_core::{Error, ErrorKind, Result, TransportMessage};

use crate::transport::ServiceBus;
use crate::wire::Received;

#[async_trait]
impl QueueAdmin for ServiceBus {
    /// Receive-and-delete (peek-lock, then delete) up to `max` messages; a missing queue
    /// yields nothing.
    async fn take_messages(&self, queue: &str, max: usize) -> Result<Vec<TransportMessage>> {
        let mut out = Vec::new();
        let client = self.queue_client(queue)?;
        while out.len() < max {
            let response = client
                .peek_lock_message2(Some(Duration::ZERO))
                .await
                .map_err(|e| {
                    Error::with_source(ErrorKind::Unavailable, "Service Bus did not answer", e)
                })?;
            if matches!(u16::from(*response.status()), 404 | 410) {
                break;
            }
            let received = match Received::read(&response) {
                Ok(Some(received)) => received,
                Ok(None) => break,
                Err(e) => {
                    let _ = response.unlock_message().await;
                    return Err(e);
                }
            };
            out.push(received.message);
            let _ = response.delete_message().await;
        }
        Ok(out)
    }

    /// Active (ready, not locked, not scheduled) messages, from the queue's management
    /// description (`CountDetails/ActiveMessageCount`); 0 for a missing queue.
    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        let Some(entry) = self.management().get(queue).await? else {
            return Ok(0);
        };
        let count = entry
            .split("ActiveMessageCount>")
            .nth(1)
            .map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|digits| digits.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Transport,
                    format!("the description of `{queue}` has no ActiveMessageCount"),
                )
            })?;
        Ok(count)
    }

    /// Deletes queues (topics and their subscriptions are left alone).
    async fn delete_queues(&self, queues: &[String]) -> Result<()> {
        for q in queues {
            self.management().delete(q).await?;
        }
        Ok(())
    }

    async fn purge_queue(&self, queue: &str) -> Result<u64> {
        let mut purged = 0;
        loop {
            let batch = self.take_messages(queue, 100).await?.len();
            purged += batch as u64;
            if batch < 100 {
                return Ok(purged);
            }
        }
    }
}
