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
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::BoxError;
use busway::rabbitmq::RabbitMq;
use futures_util::future::BoxFuture;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};

use super::rabbitmq::{LapinSide, broker_available};
use super::{BuswaySide, Encoding};
use crate::message::{BenchMessage, Tally, WAIT, send_all, send_open_loop};
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
        broker_available(&self.url)
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
            Peer::RustStream => Box::new(PeerSide::new(
                ruststream_side::RustStreamClient::connect(&self.url, settings).await?,
                settings,
            )),
            Peer::Hexeract => Box::new(PeerSide::new(
                hexeract_side::HexeractClient::connect(&self.url, settings).await?,
                settings,
            )),
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

/// What a peer framework does for the benchmark; [`PeerSide`] runs the four phases on it
/// the same way for every peer.
#[async_trait]
trait PeerClient: Send + Sync {
    /// A running consumer.
    type Consumer: Send;

    /// Declares a fresh durable queue for `phase` and returns its name.
    async fn declare(&mut self, phase: &str) -> Result<String, BoxError>;

    /// Starts consuming `queue` into `tally`; returns once the consumer is registered.
    async fn start(&self, queue: &str, tally: Arc<Tally>) -> Result<Self::Consumer, BoxError>;

    /// Stops a consumer and reports how it ended.
    async fn stop(consumer: Self::Consumer) -> Result<(), BoxError>;

    /// Publishes `m` to `queue` and waits for its confirm (owned, for the open-loop sender).
    fn publish(&self, queue: Arc<str>, m: BenchMessage)
    -> BoxFuture<'static, Result<(), BoxError>>;

    /// Deletes the queues it declared and closes its connections.
    async fn cleanup(&mut self);
}

/// The four phases over a [`PeerClient`]: one fresh queue per phase, `window` publishes in
/// flight, the consumer stopped whether the phase succeeded or not.
struct PeerSide<P> {
    client: P,
    settings: Settings,
    backlog: Option<String>,
}

impl<P: PeerClient> PeerSide<P> {
    fn new(client: P, settings: &Settings) -> Self {
        Self {
            client,
            settings: settings.clone(),
            backlog: None,
        }
    }

    async fn publish_all(&self, queue: &str, n: usize) -> Result<(), BoxError> {
        let queue: Arc<str> = queue.into();
        send_all(n, self.settings.window, self.settings.payload, |m| {
            self.client.publish(queue.clone(), m)
        })
        .await
    }
}

/// `outcome` of a phase, after `consumer` is stopped (its error reported only when the
/// phase itself succeeded).
async fn stop_after<P: PeerClient, T>(
    consumer: P::Consumer,
    outcome: Result<T, BoxError>,
) -> Result<T, BoxError> {
    let stopped = P::stop(consumer).await;
    let value = outcome?;
    stopped?;
    Ok(value)
}

#[async_trait]
impl<P: PeerClient> Side for PeerSide<P> {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let queue = self.client.declare("backlog").await?;
        self.publish_all(&queue, n).await?;
        self.backlog = Some(queue);
        Ok(())
    }

    async fn consume(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.backlog.take().ok_or("consume before publish")?;
        let tally = Tally::new(n, false);
        let consumer = self.client.start(&queue, tally.clone()).await?;
        let waited = tally.wait(WAIT).await;
        stop_after::<P, _>(consumer, waited).await?;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.client.declare("e2e").await?;
        let tally = Tally::new(n, false);
        let consumer = self.client.start(&queue, tally.clone()).await?;
        let started = Instant::now();
        let waited = match self.publish_all(&queue, n).await {
            Ok(()) => tally.wait(WAIT).await.map(|()| started.elapsed()),
            Err(e) => Err(e),
        };
        stop_after::<P, _>(consumer, waited).await
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let queue = self.client.declare("latency").await?;
        let tally = Tally::new(n, true);
        let consumer = self.client.start(&queue, tally.clone()).await?;
        let queue: Arc<str> = queue.into();
        let client = &self.client;
        let sent = send_open_loop(n, rate, self.settings.payload, |m| {
            client.publish(queue.clone(), m)
        })
        .await;
        let waited = match sent {
            Ok(()) => tally.wait(WAIT).await,
            Err(e) => Err(e),
        };
        stop_after::<P, _>(consumer, waited).await?;
        Ok(tally.latencies())
    }

    async fn cleanup(&mut self) {
        self.client.cleanup().await;
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
