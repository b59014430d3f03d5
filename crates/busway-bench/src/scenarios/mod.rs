//! The scenarios, and the busway side they share: any transport, publish → endpoint →
//! consumer through the full pipeline.

pub mod backlog;
pub mod inmemory;
pub mod kafka;
pub mod mediator;
pub mod outbox;
pub mod peers;
pub mod rabbitmq;
pub mod saga;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::prelude::*;
use busway::{BoxError, BusBuilder, RawJson, Transport};
use uuid::Uuid;

use crate::message::{BenchMessage, Tally, WAIT, send_all, send_open_loop};
use crate::{Settings, Side};

/// A transport the busway side can use, with a way to remove what a run created.
#[async_trait]
pub trait BenchTransport: Transport + Clone {
    /// Removes the endpoint `name` (queue, topics) after a run.
    async fn remove(&self, name: &str) {
        let _ = name;
    }
}

/// Makes a fresh transport for an endpoint name.
pub type Factory<T> = Arc<dyn Fn(&str) -> Result<T, BoxError> + Send + Sync>;

/// What the busway side's bus writes messages with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// MassTransit's JSON envelope, busway's default.
    #[default]
    Envelope,
    /// The message alone as JSON, its identity in transport headers ([`RawJson`]).
    RawJson,
}

/// busway on some transport: publish with a confirm window, consume on one endpoint.
pub struct BuswaySide<T: BenchTransport> {
    factory: Factory<T>,
    settings: Settings,
    encoding: Encoding,
    backlog: Option<(Bus, Arc<Tally>)>,
    created: Vec<(T, String)>,
}

impl<T: BenchTransport> std::fmt::Debug for BuswaySide<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuswaySide")
            .field("endpoints", &self.created.len())
            .finish_non_exhaustive()
    }
}

impl<T: BenchTransport> BuswaySide<T> {
    /// A side on transports from `factory`, writing MassTransit envelopes.
    pub fn boxed(factory: Factory<T>, settings: &Settings) -> Box<dyn Side> {
        Self::boxed_with(factory, settings, Encoding::Envelope)
    }

    /// A side on transports from `factory`, writing with `encoding`.
    pub fn boxed_with(
        factory: Factory<T>,
        settings: &Settings,
        encoding: Encoding,
    ) -> Box<dyn Side> {
        Box::new(Self {
            factory,
            settings: settings.clone(),
            encoding,
            backlog: None,
            created: Vec::new(),
        })
    }
}

/// A side that publishes with busway into an endpoint it builds per phase (the busway side
/// on any transport, the saga sides): the four phases are the same for all of them.
#[async_trait]
pub trait PublishingSide: Send {
    /// The run's settings.
    fn settings(&self) -> &Settings;

    /// Where the publish phase leaves its bus and tally for the consume phase.
    fn backlog(&mut self) -> &mut Option<(Bus, Arc<Tally>)>;

    /// A bus with the phase's endpoint (not started) and the tally its consumer counts in.
    async fn endpoint(
        &mut self,
        phase: &str,
        n: usize,
        latency: bool,
    ) -> Result<(Bus, Arc<Tally>), BoxError>;

    /// Removes the endpoints of a finished phase, so that no later phase's messages are
    /// copied into their queues (a RabbitMQ queue stays bound to the message type's
    /// exchange until it is deleted).
    async fn end_phase(&mut self) {}

    /// Removes what the side created.
    async fn teardown(&mut self) {}
}

async fn publish_all(settings: &Settings, bus: &Bus, n: usize) -> Result<(), BoxError> {
    send_all(n, settings.window, settings.payload, |m| async move {
        bus.publish(m).await.map_err(BoxError::from)
    })
    .await
}

#[async_trait]
impl<P: PublishingSide> Side for P {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let (bus, tally) = self.endpoint("backlog", n, false).await?;
        publish_all(self.settings(), &bus, n).await?;
        *self.backlog() = Some((bus, tally));
        Ok(())
    }

    async fn consume(&mut self, _n: usize) -> Result<Duration, BoxError> {
        let (bus, tally) = self.backlog().take().ok_or("consume before publish")?;
        let running = bus.start().await?;
        tally.wait(WAIT).await?;
        running.shutdown().await?;
        self.end_phase().await;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let (bus, tally) = self.endpoint("e2e", n, false).await?;
        let running = bus.start().await?;
        let started = Instant::now();
        publish_all(self.settings(), &bus, n).await?;
        tally.wait(WAIT).await?;
        let took = started.elapsed();
        running.shutdown().await?;
        self.end_phase().await;
        Ok(took)
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let (bus, tally) = self.endpoint("latency", n, true).await?;
        let running = bus.start().await?;
        send_open_loop(n, rate, self.settings().payload, |m| {
            let bus = bus.clone();
            async move { bus.publish(m).await.map_err(BoxError::from) }
        })
        .await?;
        tally.wait(WAIT).await?;
        running.shutdown().await?;
        self.end_phase().await;
        Ok(tally.latencies())
    }

    async fn cleanup(&mut self) {
        self.teardown().await;
    }
}

#[async_trait]
impl<T: BenchTransport> PublishingSide for BuswaySide<T> {
    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn backlog(&mut self) -> &mut Option<(Bus, Arc<Tally>)> {
        &mut self.backlog
    }

    async fn endpoint(
        &mut self,
        phase: &str,
        n: usize,
        latency: bool,
    ) -> Result<(Bus, Arc<Tally>), BoxError> {
        let name = endpoint_name(phase);
        let transport = (self.factory)(&name)?;
        let tally = Tally::new(n, latency);
        let builder = match self.encoding {
            Encoding::Envelope => Bus::builder(),
            Encoding::RawJson => Bus::builder().serializer(RawJson::new()),
        };
        let bus = endpoint_bus(
            builder.transport(transport.clone()),
            &name,
            self.settings.prefetch,
            tally.clone(),
        )
        .build()
        .await?;
        self.created.push((transport, name));
        Ok((bus, tally))
    }

    async fn end_phase(&mut self) {
        self.teardown().await;
    }

    async fn teardown(&mut self) {
        for (t, name) in self.created.drain(..) {
            t.remove(&name).await;
            let _ = t.close().await;
        }
    }
}

/// A unique endpoint name for a phase.
pub fn endpoint_name(phase: &str) -> String {
    format!(
        "bench-{phase}-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Adds the benchmark endpoint `name` to `builder`: a consumer of [`BenchMessage`] that
/// records each message in `tally`.
pub fn endpoint_bus(
    builder: BusBuilder,
    name: &str,
    prefetch: u16,
    tally: Arc<Tally>,
) -> BusBuilder {
    builder.receive_endpoint(name.to_string(), move |e| {
        e.prefetch(prefetch)
            .handler(move |ctx: ConsumeContext<BenchMessage>| {
                let t = tally.clone();
                async move {
                    t.record(ctx.message());
                    Ok(())
                }
            })
    })
}

/// Every broker-style scenario, in the order `all` runs them (the mediator, which has no
/// broker, runs through [`mediator::run`]; the memory test through [`backlog::run`]).
pub fn all() -> Vec<Box<dyn crate::Scenario>> {
    vec![
        Box::new(inmemory::InMemoryScenario),
        Box::new(rabbitmq::RabbitScenario::from_env()),
        Box::new(peers::PeerScenario::lapin_json()),
        Box::new(peers::PeerScenario::ruststream()),
        Box::new(peers::PeerScenario::hexeract()),
        Box::new(kafka::KafkaScenario::from_env()),
        Box::new(outbox::OutboxScenario::from_env()),
        Box::new(outbox::OutboxScenario::batched_from_env()),
        Box::new(saga::SagaScenario::postgres()),
        Box::new(saga::SagaScenario::memory()),
    ]
}
