//! Management on Kafka: read a topic as a group, measure a group's lag, list and delete
//! topics (manual partition assignment, no group rebalances), and [`QueueAdmin`] over them.
//!
//! [`QueueAdmin`]'s queue names map onto topics: `orders` is endpoint `orders`'s own topic
//! (its depth is what consumer group `orders` has not committed past), `orders_error` and
//! `orders_skipped` are every dead-letter or skipped topic of group `orders` (one per topic
//! it consumes; their depth is what the admin group has not taken yet). Taking reads as the
//! admin group [`ADMIN_GROUP`] and commits, so a message is taken once; Kafka keeps the
//! records until retention removes them.

use std::time::Duration;

use async_trait::async_trait;
use busway_core::transport::QueueAdmin;
use busway_core::{Error, ErrorKind, Result, TransportMessage};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::client::Client;
use crate::transport::Kafka;
use crate::wire::from_record;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The consumer group [`QueueAdmin::take_messages`] reads as.
pub const ADMIN_GROUP: &str = "busway-admin";

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
        self.read_up_to(topic, group, usize::MAX).await
    }

    /// [`Kafka::read`], stopping after `limit` records; only what is returned is committed.
    async fn read_up_to(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<TransportMessage>> {
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
            if ends.is_empty() || limit == 0 {
                return Ok(Vec::new());
            }
            consumer
                .assign(&assignment)
                .map_err(|e| admin_error("assigning partitions failed", e))?;
            let mut out = Vec::new();
            let mut positions: Vec<(i32, i64)> = Vec::new();
            let deadline = std::time::Instant::now() + TIMEOUT;
            while !ends.is_empty() && out.len() < limit && std::time::Instant::now() < deadline {
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
            let consumer = consumer_for(&client, ADMIN_GROUP)?;
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

/// What a busway queue name means on Kafka.
enum Queue<'a> {
    /// An endpoint's own topic.
    Endpoint(&'a str),
    /// The dead-letter (`error`) or skipped topics of an endpoint's group.
    Companions(&'a str, &'a str),
}

impl<'a> Queue<'a> {
    fn parse(name: &'a str) -> Self {
        if let Some(endpoint) = name.strip_suffix("_error") {
            Self::Companions(endpoint, "error")
        } else if let Some(endpoint) = name.strip_suffix("_skipped") {
            Self::Companions(endpoint, "skipped")
        } else {
            Self::Endpoint(name)
        }
    }
}

impl Kafka {
    /// The existing topics a busway queue name stands for.
    async fn topics_of(&self, queue: &Queue<'_>) -> Result<Vec<String>> {
        let existing = self.topic_names().await?;
        Ok(match *queue {
            Queue::Endpoint(endpoint) => {
                let topic = self.endpoint_topic(endpoint);
                existing.into_iter().filter(|t| *t == topic).collect()
            }
            Queue::Companions(group, kind) => {
                let config = self.config();
                let companion = |t: &str| match kind {
                    "error" => config.dead_letter_topic(t, group),
                    _ => config.skipped_topic(t, group),
                };
                let wanted: Vec<String> = existing.iter().map(|t| companion(t)).collect();
                existing
                    .into_iter()
                    .filter(|t| wanted.contains(t))
                    .collect()
            }
        })
    }
}

#[async_trait]
impl QueueAdmin for Kafka {
    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        let parsed = Queue::parse(queue);
        let group = match parsed {
            Queue::Endpoint(endpoint) => endpoint,
            Queue::Companions(..) => ADMIN_GROUP,
        };
        let mut depth = 0;
        for topic in self.topics_of(&parsed).await? {
            depth += self.lag(group, &topic).await?;
        }
        Ok(u64::try_from(depth).unwrap_or(0))
    }

    /// Reads as [`ADMIN_GROUP`] up to `max` records it has not read yet and commits past
    /// exactly those, so the next take goes on where this one stopped.
    async fn take_messages(&self, queue: &str, max: usize) -> Result<Vec<TransportMessage>> {
        let mut out = Vec::new();
        for topic in self.topics_of(&Queue::parse(queue)).await? {
            let left = max - out.len();
            if left == 0 {
                break;
            }
            out.extend(self.read_up_to(&topic, ADMIN_GROUP, left).await?);
        }
        Ok(out)
    }

    async fn purge_queue(&self, queue: &str) -> Result<u64> {
        Ok(self.take_messages(queue, usize::MAX).await?.len() as u64)
    }

    /// Deletes the topics the names stand for (an endpoint's topic, its dead-letter and
    /// skipped topics); the message types' topics, which other services share, stay.
    async fn delete_queues(&self, queues: &[String]) -> Result<()> {
        let mut topics = Vec::new();
        for q in queues {
            topics.extend(self.topics_of(&Queue::parse(q)).await?);
        }
        self.delete_topics(&topics).await
    }
}
