//! Management helpers for tests and tools: read a topic as a group, measure a group's lag,
//! list and delete topics. They use manual partition assignment (no group rebalances).

use std::time::Duration;

use busway_core::{Error, ErrorKind, Result, TransportMessage};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::client::{Client, from_record};
use crate::transport::Kafka;

const TIMEOUT: Duration = Duration::from_secs(10);

fn consumer_for(client: &Client, group: &str) -> Result<BaseConsumer> {
    let mut config = Client::base_config(&client.config);
    config.set("group.id", group);
    config.set("enable.auto.commit", "false");
    config.set("enable.partition.eof", "false");
    config.create().map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            "the Kafka consumer configuration is not valid",
            e,
        )
    })
}

fn blocking_error(e: tokio::task::JoinError) -> Error {
    Error::transport("a Kafka management call did not finish", e)
}

fn admin_error(what: &str, e: rdkafka::error::KafkaError) -> Error {
    Error::transport(what.to_string(), e)
}

/// Partitions of `topic` (none if it does not exist).
fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| admin_error("fetching topic metadata failed", e))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// The committed offsets of `group` on `topic`'s partitions (`None` where nothing is committed).
fn committed(
    consumer: &BaseConsumer,
    topic: &str,
    parts: &[i32],
) -> Result<Vec<(i32, Option<i64>)>> {
    let mut list = TopicPartitionList::new();
    for p in parts {
        list.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(list, TIMEOUT)
        .map_err(|e| admin_error("reading committed offsets failed", e))?;
    Ok(parts
        .iter()
        .map(|p| {
            let offset = committed
                .find_partition(topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            (*p, offset)
        })
        .collect())
}

impl Kafka {
    /// Reads what group `group` has not read of `topic` yet, up to the end of each partition,
    /// and commits it. A management helper for tests and tools.
    pub async fn read(&self, topic: &str, group: &str) -> Result<Vec<TransportMessage>> {
        let client = self.client().clone();
        let topic = topic.to_string();
        let group = group.to_string();
        tokio::task::spawn_blocking(move || -> Result<Vec<TransportMessage>> {
            let consumer = consumer_for(&client, &group)?;
            let parts = partitions(&consumer, &topic)?;
            if parts.is_empty() {
                return Ok(Vec::new());
            }
            let mut assignment = TopicPartitionList::new();
            let mut ends = Vec::new();
            for (p, offset) in committed(&consumer, &topic, &parts)? {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, TIMEOUT)
                    .map_err(|e| admin_error("fetching watermarks failed", e))?;
                let start = offset.unwrap_or(low).max(low);
                if start < high {
                    let _ = assignment.add_partition_offset(&topic, p, Offset::Offset(start));
                    ends.push((p, high));
                }
            }
            if ends.is_empty() {
                return Ok(Vec::new());
            }
            consumer
                .assign(&assignment)
                .map_err(|e| admin_error("assigning partitions failed", e))?;
            let mut out = Vec::new();
            let mut positions: Vec<(i32, i64)> = Vec::new();
            let deadline = std::time::Instant::now() + TIMEOUT;
            while !ends.is_empty() && std::time::Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        out.push(from_record(&m));
                        let (p, o) = (m.partition(), m.offset());
                        positions.retain(|(q, _)| *q != p);
                        positions.push((p, o + 1));
                        ends.retain(|(q, high)| !(*q == p && o + 1 >= *high));
                    }
                    Some(Err(e)) => return Err(admin_error("reading the topic failed", e)),
                    None => {}
                }
            }
            if !positions.is_empty() {
                let mut commit = TopicPartitionList::new();
                for (p, o) in positions {
                    let _ = commit.add_partition_offset(&topic, p, Offset::Offset(o));
                }
                consumer
                    .commit(&commit, CommitMode::Sync)
                    .map_err(|e| admin_error("committing the read failed", e))?;
            }
            Ok(out)
        })
        .await
        .map_err(blocking_error)?
    }

    /// Messages of `topic` that `group` has not committed past. A management helper.
    pub async fn lag(&self, group: &str, topic: &str) -> Result<i64> {
        let client = self.client().clone();
        let topic = topic.to_string();
        let group = group.to_string();
        tokio::task::spawn_blocking(move || -> Result<i64> {
            let consumer = consumer_for(&client, &group)?;
            let parts = partitions(&consumer, &topic)?;
            let mut lag = 0;
            for (p, offset) in committed(&consumer, &topic, &parts)? {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, TIMEOUT)
                    .map_err(|e| admin_error("fetching watermarks failed", e))?;
                lag += high - offset.unwrap_or(low).max(low);
            }
            Ok(lag)
        })
        .await
        .map_err(blocking_error)?
    }

    /// Names of all topics. A management helper.
    pub async fn topic_names(&self) -> Result<Vec<String>> {
        let client = self.client().clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let consumer = consumer_for(&client, "busway-admin")?;
            let metadata = consumer
                .fetch_metadata(None, TIMEOUT)
                .map_err(|e| admin_error("fetching metadata failed", e))?;
            Ok(metadata
                .topics()
                .iter()
                .map(|t| t.name().to_string())
                .collect())
        })
        .await
        .map_err(blocking_error)?
    }

    /// Deletes topics (missing ones are ignored). A management helper.
    pub async fn delete_topics(&self, topics: &[String]) -> Result<()> {
        self.client().delete_topics(topics).await;
        Ok(())
    }
}
