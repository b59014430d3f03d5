//! `rabbitmq-json`, `ruststream`, `hexeract`: busway on RabbitMQ writing raw JSON (the message
//! alone as the body, [`busway::RawJson`]) against raw lapin with the same plain JSON body and
//! against two peer frameworks, RustStream (`ruststream` + `ruststream-lapin`) and Hexeract
//! (`hexeract`, feature `bus-rabbitmq`), each written the way its own documentation shows.
//!
//! Every side runs with the same settings: persistent messages, publisher confirms with
//! `window` publishes in flight, `prefetch` unacknowledged deliveries, a manual ack after the
//! handler ran, the payload `BenchMessage::new(seq, payload)` as JSON, a fresh durable queue per
//! phase, each message counted with [`crate::message::Tally::record`]. What differs is each framework's own
//! (stated in each scenario's description):
//!
//! - busway publishes to the message-type exchange (MassTransit's topology: type exchange →
//!   endpoint exchange → queue), runs up to `prefetch` handlers at once and acknowledges with
//!   batched `multiple` acks; raw JSON still carries busway's identity in transport headers.
//! - raw lapin (`rabbitmq-json`) uses busway's topology, one confirm channel, a sequential
//!   consumer loop and batched `multiple` acks (see [`super::rabbitmq`]).
//! - RustStream publishes through its confirms policy (confirms are off by default) on its one
//!   confirm channel to the default exchange (the routing key is the queue); it consumes with a
//!   `#[subscriber]` handler in its app runtime, mounted on the phase's queue with `.name(..)`,
//!   the broker's prefetch set (it is unlimited by default), sequential dispatch (its default),
//!   one ack per message. It declares nothing by default, so the bench declares the queue
//!   through lapin; it has no way to declare a queue without subscribing to it.
//! - Hexeract publishes typed messages to the default exchange with confirms and `mandatory`
//!   (its defaults), one publish in flight per pooled channel, so its pool has `window`
//!   channels; it consumes with a `RabbitMqWorker` (prefetch set, its default is 16), sequential
//!   dispatch, one ack per message, and the worker declares a `<queue>.retry` queue. The queue is
//!   declared with its own `declare_queue`.

mod hexeract_side;
mod ruststream_side;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway::BoxError;
use busway::rabbitmq::RabbitMq;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};

use super::rabbitmq::{LapinSide, reachable, redact};
use super::{BuswaySide, Encoding};
use crate::{Scenario, Settings, Side};

/// The framework a peer scenario compares busway with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Raw lapin with a plain JSON body (`rabbitmq-json`).
    Lapin,
    /// RustStream on `ruststream-lapin` (`ruststream`).
    RustStream,
    /// Hexeract's RabbitMQ bus (`hexeract`).
    Hexeract,
}

/// busway (raw JSON) against a peer on RabbitMQ.
#[derive(Debug)]
pub struct PeerScenario {
    url: String,
    peer: Peer,
}

impl PeerScenario {
    fn new(peer: Peer) -> Self {
        Self {
            url: RabbitMq::env_url(),
            peer,
        }
    }

    /// `rabbitmq-json`: busway raw JSON vs raw lapin with a plain JSON body, on
    /// `BUSWAY_RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub fn lapin_json() -> Self {
        Self::new(Peer::Lapin)
    }

    /// `ruststream`: busway raw JSON vs RustStream, on `BUSWAY_RABBITMQ_URL`.
    pub fn ruststream() -> Self {
        Self::new(Peer::RustStream)
    }

    /// `hexeract`: busway raw JSON vs Hexeract, on `BUSWAY_RABBITMQ_URL`.
    pub fn hexeract() -> Self {
        Self::new(Peer::Hexeract)
    }
}

/// What the busway side of every peer scenario does.
const BUSWAY: &str = "busway: RawJson serializer (body = the message; ids, type and host in \
    headers), publish to the message-type exchange (type exchange -> endpoint exchange -> queue), \
    one confirm channel with `window` (64) publishes in flight, `prefetch` (64) with up to \
    `prefetch` handlers at once, batched multiple acks";

/// What every side shares.
const SHARED: &str = "all: persistent, publisher confirms, `window` (64) in flight, \
    `prefetch` (64), ack after the handler, JSON BenchMessage, a fresh durable queue per phase";

#[async_trait]
impl Scenario for PeerScenario {
    fn name(&self) -> &'static str {
        match self.peer {
            Peer::Lapin => "rabbitmq-json",
            Peer::RustStream => "ruststream",
            Peer::Hexeract => "hexeract",
        }
    }

    fn description(&self) -> String {
        let peer = match self.peer {
            Peer::Lapin => {
                "lapin: plain JSON body (content type and message id only), the same topology \
                 as busway, one confirm channel, sequential consumer loop, batched multiple acks"
            }
            Peer::RustStream => {
                "ruststream 0.7 (ruststream-lapin): ConfirmsPublish (confirms are off by \
                 default) on its one confirm channel, default exchange straight to the queue; \
                 #[subscriber] in the app runtime, broker prefetch set (unlimited by default), \
                 sequential handler (its default), one ack per message; queue declared by the \
                 bench through lapin (it declares nothing by default)"
            }
            Peer::Hexeract => {
                "hexeract 0.6: typed publish to the default exchange, confirms + mandatory (its \
                 defaults), one publish per pooled channel, `window` (64) channels; \
                 RabbitMqWorker with prefetch set (16 by default), sequential handler, one ack \
                 per message, plus the `<queue>.retry` queue it declares"
            }
        };
        format!("busway (raw JSON) vs {peer}. {BUSWAY}. {SHARED}")
    }

    async fn available(&self) -> Result<(), String> {
        if reachable(&self.url, 5672) {
            Ok(())
        } else {
            Err(format!(
                "RabbitMQ is not reachable at {} (start it with scripts/services)",
                redact(&self.url)
            ))
        }
    }

    async fn busway(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        let url = self.url.clone();
        Ok(BuswaySide::boxed_with(
            Arc::new(move |_: &str| Ok(RabbitMq::new(&url)?)),
            settings,
            Encoding::RawJson,
        ))
    }

    async fn raw(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        Ok(match self.peer {
            Peer::Lapin => Box::new(LapinSide::connect(&self.url, settings, true).await?),
            Peer::RustStream => {
                Box::new(ruststream_side::RustStreamSide::connect(&self.url, settings).await?)
            }
            Peer::Hexeract => {
                Box::new(hexeract_side::HexeractSide::connect(&self.url, settings).await?)
            }
        })
    }

    fn sides(&self) -> (&'static str, &'static str) {
        match self.peer {
            Peer::Lapin => ("busway", "lapin"),
            Peer::RustStream => ("busway", "ruststream"),
            Peer::Hexeract => ("busway", "hexeract"),
        }
    }
}

/// A fresh queue name for a peer's phase.
fn queue_name(peer: &str, phase: &str) -> String {
    format!(
        "{peer}-{phase}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Declares the durable queue `name` (no arguments) on a channel of its own.
async fn declare_queue(connection: &lapin::Connection, name: &str) -> Result<(), BoxError> {
    let ch = connection.create_channel().await?;
    ch.queue_declare(
        ShortString::from(name),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, ShortString::from("declared")).await;
    Ok(())
}

/// Deletes the queues `names` (best effort) and closes the connection.
async fn delete_queues(connection: &lapin::Connection, names: impl IntoIterator<Item = String>) {
    if let Ok(ch) = connection.create_channel().await {
        for q in names {
            let _ = ch
                .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch.close(200, ShortString::from("deleted")).await;
    }
    let _ = connection.close(200, ShortString::from("bench done")).await;
}

/// Waits until the queue `name` has a consumer (for a peer whose consumer starts in the
/// background), at most `limit`.
async fn wait_for_consumer(
    connection: &lapin::Connection,
    name: &str,
    limit: Duration,
) -> Result<(), BoxError> {
    let ch = connection.create_channel().await?;
    let deadline = tokio::time::Instant::now() + limit;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ready = loop {
        let queue = ch
            .queue_declare(ShortString::from(name), passive, FieldTable::default())
            .await?;
        if queue.consumer_count() > 0 {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let _ = ch.close(200, ShortString::from("ready")).await;
    if ready {
        Ok(())
    } else {
        Err(format!("no consumer on {name} within {limit:?}").into())
    }
}
