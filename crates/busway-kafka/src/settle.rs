//! Settling a Kafka delivery. A finished record lets its partition's commit position move
//! past it; a record handed back waits at the front of its lane; a record that faulted or
//! has no consumer is copied to its dead-letter or skipped topic first (a copy that cannot be
//! written keeps the record unfinished, so the bus moves it again, up to the configured
//! `DeadLetterFailure`). Kafka has no delayed delivery.

use std::sync::Arc;

use async_trait::async_trait;
use busway_core::headers::names;
use busway_core::transport::{GiveBack, MoveError, MoveKind, SettleOnDrop, Settlement};
use busway_core::{Error, ErrorKind, Result, TransportMessage};

use crate::config::DeadLetterFailure;
use crate::receive::Shared;
use crate::receive::state::{Record, RecordRef};

/// How a Kafka delivery is settled: finished (its offset may be committed), handed back to
/// its lane, or copied to a dead-letter or skipped topic and finished.
pub(crate) struct KafkaSettlement {
    shared: Arc<Shared>,
    record: SettleOnDrop<Unfinished>,
    /// Failed writes of this record's dead-letter or skipped copy.
    move_failures: u32,
}

/// A record handed out and not finished: back to the front of its lane (its offset stays
/// uncommitted) when the settlement is dropped.
struct Unfinished {
    shared: Arc<Shared>,
    record: Record,
}

impl GiveBack for Unfinished {
    fn give_back(self) {
        self.shared.requeue(self.record);
    }
}

impl KafkaSettlement {
    pub(crate) fn new(shared: Arc<Shared>, record: Record) -> Self {
        Self {
            record: SettleOnDrop::new(Unfinished {
                shared: shared.clone(),
                record,
            }),
            shared,
            move_failures: 0,
        }
    }

    fn complete(&mut self) {
        if let Some(Unfinished { shared, record }) = self.record.take() {
            shared.finish(&RecordRef::from(&record));
        }
    }
}

#[async_trait]
impl Settlement for KafkaSettlement {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.complete();
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<()> {
        if let Some(unfinished) = self.record.take() {
            unfinished.give_back();
        }
        Ok(())
    }

    async fn move_to(
        mut self: Box<Self>,
        kind: MoveKind,
        mut message: TransportMessage,
    ) -> std::result::Result<(), MoveError> {
        let Some(Unfinished { record, .. }) = self.record.get() else {
            return Ok(());
        };
        let config = &self.shared.client.config;
        let topic = match kind {
            MoveKind::Skipped => config.skipped_topic(&record.topic, &self.shared.group),
            _ => config.dead_letter_topic(&record.topic, &self.shared.group),
        };
        message
            .headers
            .insert("MT-Fault-Topic", record.topic.as_str());
        message
            .headers
            .insert("MT-Fault-Partition", i64::from(record.partition));
        message.headers.insert("MT-Fault-Offset", record.offset);
        if message.partition_key.is_none() {
            message.partition_key = record.key.clone();
        }
        if message.content_type.is_none() {
            message.content_type = record.message.content_type.clone();
        }
        message.headers.remove(names::CONTENT_TYPE);
        if let Err(err) = self.shared.client.produce(&topic, &message).await {
            self.move_failures = self.move_failures.saturating_add(1);
            let limit = match config.dead_letter_failure {
                DeadLetterFailure::SkipAfter(n) | DeadLetterFailure::StopAfter(n) => Some(n),
                _ => None,
            };
            if limit.is_some_and(|n| self.move_failures >= n) {
                let stop = matches!(config.dead_letter_failure, DeadLetterFailure::StopAfter(_));
                let outcome = if stop {
                    "ENDPOINT STOPPED: a dead-letter copy could not be written (DeadLetterFailure::StopAfter); the record is not committed and runs again when the endpoint starts again"
                } else {
                    "MESSAGE LOST: its dead-letter copy could not be written; skipping it as configured (DeadLetterFailure::SkipAfter)"
                };
                tracing::error!(
                    group = %self.shared.group,
                    topic = %record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    key = ?record.key,
                    dead_letter_topic = %topic,
                    failures = self.move_failures,
                    error = %err,
                    "{outcome}"
                );
                if stop {
                    self.shared.halt();
                    // Dropping the settlement hands the record back unfinished.
                    return Err(MoveError::from(err));
                }
                self.complete();
                return Ok(());
            }
            // The record stays unfinished (its offset is not committed): the bus backs off
            // and writes the dead-letter copy again.
            return Err(MoveError::retry(err, self));
        }
        self.complete();
        Ok(())
    }

    async fn redeliver(
        self: Box<Self>,
        _message: TransportMessage,
        _delay: std::time::Duration,
    ) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "Kafka has no delayed delivery; use in-process retry",
        ))
    }
}
