//! Kafka transport for busway, on [rdkafka] (librdkafka built in, no system library needed).
//!
//! ```no_run
//! use busway_core::Bus;
//! use busway_kafka::Kafka;
//!
//! # async fn run() -> busway_core::Result<()> {
//! let bus = Bus::builder().transport(Kafka::from_env()?).build().await?;
//! # Ok(()) }
//! ```
//!
//! - **Topology**: a message type is published to its topic (`Contracts.OrderPlaced`, or one
//!   you name); an endpoint consumes the topics of its message types and its own topic (for
//!   sends to `queue:<endpoint>`) as consumer group `<endpoint>`; rider-style topic endpoints
//!   read any topic. Missing topics are created (or checked when creation is off).
//! - **Wire**: the value is the message's JSON; identity travels in headers (`MessageId`,
//!   `CorrelationId`, `ConversationId`, `InitiatorId`, `SourceAddress`,
//!   `DestinationAddress`, `Content-Type`, `MT-MessageType`) as MassTransit's rider writes
//!   them; the message key is the contract's `#[message(key)]`.
//! - **Producing**: idempotent, `acks=all`; `publish` returns after the delivery report.
//! - **Consuming**: per-key ordered lanes, different keys in parallel; a bounded in-flight
//!   window per partition (polling waits while one is full; a partition that stays full is
//!   paused); offsets are committed only up to the lowest unfinished
//!   message of each partition, periodically, on rebalance and at shutdown.
//! - **Failures**: when retries are exhausted, or a record cannot be read, it goes to the
//!   dead-letter topic `<topic>.<group>.error` with the fault headers and the partition
//!   moves on. Kafka has no delayed delivery: no delayed redelivery or scheduled sends.
//!
//! See `docs/guide/kafka.md` in the repository.
//!
//! [rdkafka]: https://docs.rs/rdkafka

mod admin;
mod client;
mod config;
pub mod naming;
mod receive;
mod settle;
mod transport;
mod wire;

pub use admin::ADMIN_GROUP;
pub use config::{BROKERS_ENV, DEFAULT_BROKERS, DeadLetterFailure, KafkaBuilder, KafkaConfig};
pub use naming::sanitize as topic_name;
pub use transport::{Kafka, KafkaBusExt, KafkaEndpointExt, KafkaEndpointOptions};
