//! RabbitMQ transport for busway, on [lapin], wire-compatible with MassTransit.
//!
//! ```no_run
//! use busway_core::Bus;
//! use busway_rabbitmq::RabbitMq;
//!
//! # async fn run() -> busway_core::Result<()> {
//! let bus = Bus::builder()
//!     .transport(RabbitMq::new("amqp://guest:guest@127.0.0.1:5672/%2f")?)
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! - **Topology** is MassTransit's: a fanout exchange per message type
//!   (`Contracts:OrderPlaced`) bound exchange-to-exchange to each consuming endpoint's
//!   exchange, which is bound to the endpoint's queue; `<queue>_error` and `<queue>_skipped`
//!   declared on first use.
//! - **No message lost**: publisher confirms (a nack or a returned message is an error to the
//!   caller); acks only after the consume pipeline finished (batched into `multiple` acks
//!   that never cover an unfinished delivery); moves to error and skipped queues confirmed
//!   before the original is acked.
//! - **Recovery**: a lost connection is re-established with back-off, the topology declared
//!   again and every consumer resumed; publishes wait for the connection up to the publish
//!   timeout. Deliveries whose ack could not be sent are redelivered by the broker
//!   (at-least-once).
//! - **Delayed delivery without plugins**: TTL wait queues that dead-letter back to the
//!   target exchange.
//!
//! See `docs/guide/rabbitmq.md` in the repository.
//!
//! [lapin]: https://docs.rs/lapin

mod acks;
mod admin;
mod config;
mod confirms;
mod connector;
mod declare;
mod frame_guard;
mod link;
pub mod naming;
mod receive;
mod route;
mod settle;
mod transport;
mod wire;

pub use config::{DEFAULT_URL, RabbitMqBuilder, RabbitMqConfig, URL_ENV};
pub use declare::{RabbitMqEndpointExt, RabbitMqEndpointOptions};
pub use naming::DELAYED_EXCHANGE;
pub use transport::RabbitMq;
