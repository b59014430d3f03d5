//! `rabbitmq`: busway on RabbitMQ vs raw lapin with the same settings: persistent messages,
//! publisher confirms with the same window of publishes in flight, MassTransit's topology
//! (message-type exchange → endpoint exchange → queue), manual acks, the same prefetch and
//! payload, the same envelope encoded and decoded by hand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::BoxError;
use busway::rabbitmq::RabbitMq;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};

use super::{BenchTransport, BuswaySide};
use crate::message::{BenchMessage, RawEnvelope, Tally, WAIT, send_all, send_open_loop};
use crate::{Scenario, Settings, Side};
use busway::transport::QueueAdmin;

#[async_trait]
impl BenchTransport for RabbitMq {
    async fn remove(&self, name: &str) {
        let _ = self.delete_queues(&[name.to_string()]).await;
    }
}

/// The RabbitMQ scenario.
#[derive(Debug)]
pub struct RabbitScenario {
    url: String,
}

impl RabbitScenario {
    /// On `BUSWAY_RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub fn from_env() -> Self {
        Self {
            url: RabbitMq::env_url(),
        }
    }
}

/// `Err` with a reason (and how to start it) when no RabbitMQ answers at `url`.
pub(crate) fn broker_available(url: &str) -> Result<(), String> {
    if reachable(url, 5672) {
        Ok(())
    } else {
        Err(format!(
            "RabbitMQ is not reachable at {} (start it with scripts/services)",
            redact(url)
        ))
    }
}

/// Whether something listens at the host and port of an `amqp://` URL.
pub(crate) fn reachable(url: &str, default_port: u16) -> bool {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    let host_port = host_port.split(['/', '?']).next().unwrap_or(host_port);
    let addr = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok()
        })
}

#[async_trait]
impl Scenario for RabbitScenario {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn description(&self) -> String {
        "busway on RabbitMQ vs raw lapin: persistent, confirms (same window), manual acks, same prefetch".into()
    }

    async fn available(&self) -> Result<(), String> {
        broker_available(&self.url)
    }

    async fn busway(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        let url = self.url.clone();
        Ok(BuswaySide::boxed(
            Arc::new(move |_: &str| Ok(RabbitMq::new(&url)?)),
            settings,
        ))
    }

    async fn raw(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        Ok(Box::new(
            LapinSide::connect(&self.url, settings, false).await?,
        ))
    }

    fn sides(&self) -> (&'static str, &'static str) {
        ("busway", "lapin")
    }
}

/// `url` with its credentials replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// Raw lapin on MassTransit's topology: the baseline of the `rabbitmq` scenario (the envelope
/// encoded by hand) and of `rabbitmq-json` (`plain`: the message alone as JSON).
pub(crate) struct LapinSide {
    connection: Connection,
    settings: Settings,
    backlog: Option<String>,
    queues: Vec<String>,
    /// The body is the [`BenchMessage`] alone as JSON rather than a MassTransit envelope.
    plain: bool,
}

impl LapinSide {
    /// A side on a new connection to `url`; `plain`: bodies are the message alone as JSON.
    pub(crate) async fn connect(
        url: &str,
        settings: &Settings,
        plain: bool,
    ) -> Result<Self, BoxError> {
        Ok(Self {
            connection: Connection::connect(url, Default::default()).await?,
            settings: settings.clone(),
            backlog: None,
            queues: Vec::new(),
            plain,
        })
    }
}

const TYPE_EXCHANGE: &str = "Busway.Bench:RawBenchMessage";

impl LapinSide {
    /// Declares MassTransit's shape for a fresh endpoint and returns its name.
    async fn declare(&mut self, phase: &str) -> Result<String, BoxError> {
        let name = format!(
            "raw-{phase}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let ch = self.connection.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for exchange in [TYPE_EXCHANGE, name.as_str()] {
            ch.exchange_declare(
                ShortString::from(exchange),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        }
        ch.queue_declare(
            ShortString::from(name.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.exchange_bind(
            ShortString::from(name.as_str()),
            ShortString::from(TYPE_EXCHANGE),
            ShortString::from(""),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            ShortString::from(name.as_str()),
            ShortString::from(name.as_str()),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, ShortString::from("declared")).await;
        self.queues.push(name.clone());
        Ok(name)
    }

    /// Deletes the queues (and their endpoint exchanges) of finished phases: a queue left
    /// bound to the message-type exchange would take a copy of every later phase's messages.
    async fn drop_queues(&mut self) {
        if let Ok(ch) = self.connection.create_channel().await {
            for q in self.queues.drain(..) {
                let _ = ch
                    .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                    .await;
                let _ = ch
                    .exchange_delete(ShortString::from(q.as_str()), Default::default())
                    .await;
            }
            let _ = ch.close(200, ShortString::from("phase done")).await;
        }
    }

    async fn publisher(&self) -> Result<Channel, BoxError> {
        let ch = self.connection.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    /// Consumes `n` messages from `queue` on a channel of its own.
    async fn consumer(
        &self,
        queue: String,
        tally: Arc<Tally>,
    ) -> Result<tokio::task::JoinHandle<Result<(), String>>, BoxError> {
        let ch = self.connection.create_channel().await?;
        let prefetch = self.settings.prefetch;
        let plain = self.plain;
        Ok(tokio::spawn(async move {
            consume(ch, queue, prefetch, plain, tally)
                .await
                .map_err(|e| e.to_string())
        }))
    }
}

async fn publish_one(ch: &Channel, plain: bool, m: BenchMessage) -> Result<(), BoxError> {
    let (body, content_type) = if plain {
        (serde_json::to_vec(&m)?, "application/json")
    } else {
        (
            RawEnvelope::encode(m, "rabbitmq://localhost/raw"),
            "application/vnd.masstransit+json",
        )
    };
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from(content_type))
        .with_message_id(ShortString::from(uuid::Uuid::new_v4().to_string()));
    let confirm = ch
        .basic_publish(
            ShortString::from(TYPE_EXCHANGE),
            ShortString::from(""),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        other => Err(format!("publish not confirmed: {other:?}").into()),
    }
}

async fn consume(
    ch: Channel,
    queue: String,
    prefetch: u16,
    plain: bool,
    tally: Arc<Tally>,
) -> Result<(), BoxError> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from(format!("raw-{}", uuid::Uuid::new_v4().simple())),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Acknowledged after handling, but not one by one: one `multiple` ack covers every
    // delivery handled so far, sent when half the prefetch is unacknowledged or when the
    // stream goes quiet for a moment (so a trickle is not held back), and at the end.
    let batch = usize::from(prefetch / 2).max(1);
    let mut unacked: Option<(lapin::Acker, usize)> = None;
    let multiple = BasicAckOptions { multiple: true };
    loop {
        let next = match tokio::time::timeout(ACK_IDLE, consumer.next()).await {
            Ok(next) => next,
            Err(_) => {
                if let Some((acker, _)) = unacked.take() {
                    acker.ack(multiple).await?;
                }
                continue;
            }
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        if plain {
            tally.record(&serde_json::from_slice::<BenchMessage>(&delivery.data)?);
        } else {
            tally.record(&RawEnvelope::decode(&delivery.data)?.message);
        }
        let count = unacked.as_ref().map_or(0, |(_, n)| *n) + 1;
        unacked = Some((delivery.acker, count));
        if (count >= batch || tally.is_complete())
            && let Some((acker, _)) = unacked.take()
        {
            acker.ack(multiple).await?;
        }
        if tally.is_complete() {
            break;
        }
    }
    let _ = ch.close(200, ShortString::from("done")).await;
    Ok(())
}

/// How long the raw consumer waits for the next delivery before it acknowledges what it has
/// handled.
const ACK_IDLE: std::time::Duration = std::time::Duration::from_millis(2);

#[async_trait]
impl Side for LapinSide {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let queue = self.declare("backlog").await?;
        let ch = self.publisher().await?;
        send_all(n, self.settings.window, self.settings.payload, |m| {
            publish_one(&ch, self.plain, m)
        })
        .await?;
        self.backlog = Some(queue);
        Ok(())
    }

    async fn consume(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.backlog.take().ok_or("consume before publish")?;
        let tally = Tally::new(n, false);
        self.consumer(queue, tally.clone()).await?.await??;
        tally.wait(WAIT).await?;
        self.drop_queues().await;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.declare("e2e").await?;
        let tally = Tally::new(n, false);
        let consumer = self.consumer(queue, tally.clone()).await?;
        let ch = self.publisher().await?;
        let started = Instant::now();
        send_all(n, self.settings.window, self.settings.payload, |m| {
            publish_one(&ch, self.plain, m)
        })
        .await?;
        tally.wait(WAIT).await?;
        let took = started.elapsed();
        consumer.await??;
        self.drop_queues().await;
        Ok(took)
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let queue = self.declare("latency").await?;
        let tally = Tally::new(n, true);
        let consumer = self.consumer(queue, tally.clone()).await?;
        let ch = self.publisher().await?;
        let plain = self.plain;
        send_open_loop(n, rate, self.settings.payload, |m| {
            let ch = ch.clone();
            async move { publish_one(&ch, plain, m).await }
        })
        .await?;
        tally.wait(WAIT).await?;
        consumer.await??;
        self.drop_queues().await;
        Ok(tally.latencies())
    }

    async fn cleanup(&mut self) {
        self.drop_queues().await;
        let _ = self
            .connection
            .close(200, ShortString::from("bench done"))
            .await;
    }
}
