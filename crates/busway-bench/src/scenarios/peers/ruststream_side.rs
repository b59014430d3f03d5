//! The RustStream side: a confirms publisher on the default exchange, and a `#[subscriber]`
//! handler in RustStream's app runtime, mounted on each phase's queue at run time with
//! `.name(..)`.

use std::convert::Infallible;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::BoxError;
use ruststream::ConnectedBroker;
use ruststream_lapin::prelude::*;
use ruststream_lapin::{ConfirmsPublisher, ConnectedLapinBroker};
use serde::Serialize;

use super::{declare_queue, delete_queues, queue_name};
use crate::message::{BenchMessage, Tally, WAIT, send_all, send_open_loop};
use crate::{Settings, Side};

/// The benchmark message as RustStream publishes it: `#[derive(Outgoing)]` with no fixed
/// destination (the call site names the queue), serialized as the message itself.
#[derive(Serialize, Outgoing)]
#[serde(transparent)]
struct Bench(BenchMessage);

/// The application state the handler reads its tally from.
#[derive(FromRef)]
struct Consuming {
    tally: Arc<Tally>,
}

/// Counts each message; the runtime acks it once this returns.
#[subscriber]
async fn record(message: &BenchMessage, State(tally): State<Arc<Tally>>) -> HandlerOutcome {
    tally.record(message);
    HandlerOutcome::ack()
}

/// RustStream with the benchmark's settings.
pub(super) struct RustStreamSide {
    url: String,
    settings: Settings,
    /// Declares and deletes the queues (RustStream declares only while subscribing).
    admin: lapin::Connection,
    /// The publishing connection; kept for its shutdown.
    broker: Option<ConnectedLapinBroker>,
    publisher: ConfirmsPublisher,
    backlog: Option<String>,
    queues: Vec<String>,
}

impl RustStreamSide {
    /// Connects the publisher and the admin connection.
    pub(super) async fn connect(url: &str, settings: &Settings) -> Result<Self, BoxError> {
        let admin = lapin::Connection::connect(url, Default::default()).await?;
        let broker = LapinBroker::new(url).connect().await?;
        let publisher = broker.publisher(LapinPublish::default().confirms());
        Ok(Self {
            url: url.to_string(),
            settings: settings.clone(),
            admin,
            broker: Some(broker),
            publisher,
            backlog: None,
            queues: Vec::new(),
        })
    }

    async fn declare(&mut self, phase: &str) -> Result<String, BoxError> {
        let name = queue_name("ruststream", phase);
        declare_queue(&self.admin, &name).await?;
        self.queues.push(name.clone());
        Ok(name)
    }

    /// Starts an app consuming `queue` into `tally`; it returns once the subscription is open.
    async fn consumer(&self, queue: String, tally: Arc<Tally>) -> Result<RunningApp, BoxError> {
        let prefetch = NonZeroU16::new(self.settings.prefetch).ok_or("prefetch 0")?;
        let broker = LapinBroker::new(self.url.as_str()).prefetch(prefetch);
        let app = RustStream::new(AppInfo::new("busway-bench", env!("CARGO_PKG_VERSION")))
            .on_startup(async move |()| Ok::<_, Infallible>(Consuming { tally }))
            .with_broker(broker, move |b| {
                b.include(record.name(queue));
            });
        Ok(app.start().await?)
    }

    async fn publish_all(&self, queue: &str, n: usize) -> Result<(), BoxError> {
        let publisher = &self.publisher;
        send_all(
            n,
            self.settings.window,
            self.settings.payload,
            |m| async move { publish_one(publisher, queue, m).await },
        )
        .await
    }
}

async fn publish_one(
    publisher: &ConfirmsPublisher,
    queue: &str,
    m: BenchMessage,
) -> Result<(), BoxError> {
    publisher.message(&Bench(m)).to(queue).publish().await?;
    Ok(())
}

/// Waits for the tally, then stops the app either way.
async fn drain(running: RunningApp, tally: &Tally) -> Result<(), BoxError> {
    let waited = tally.wait(WAIT).await;
    running.shutdown().await?;
    waited
}

#[async_trait]
impl Side for RustStreamSide {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let queue = self.declare("backlog").await?;
        self.publish_all(&queue, n).await?;
        self.backlog = Some(queue);
        Ok(())
    }

    async fn consume(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.backlog.take().ok_or("consume before publish")?;
        let tally = Tally::new(n, false);
        let running = self.consumer(queue, tally.clone()).await?;
        drain(running, &tally).await?;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.declare("e2e").await?;
        let tally = Tally::new(n, false);
        let running = self.consumer(queue.clone(), tally.clone()).await?;
        let started = Instant::now();
        let published = self.publish_all(&queue, n).await;
        let waited = match published {
            Ok(()) => tally.wait(WAIT).await,
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        running.shutdown().await?;
        waited?;
        Ok(took)
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let queue = self.declare("latency").await?;
        let tally = Tally::new(n, true);
        let running = self.consumer(queue.clone(), tally.clone()).await?;
        let queue: Arc<str> = queue.into();
        let sent = send_open_loop(n, rate, self.settings.payload, |m| {
            let publisher = self.publisher.clone();
            let queue = queue.clone();
            async move { publish_one(&publisher, &queue, m).await }
        })
        .await;
        match sent {
            Ok(()) => drain(running, &tally).await?,
            Err(e) => {
                let _ = running.shutdown().await;
                return Err(e);
            }
        }
        Ok(tally.latencies())
    }

    async fn cleanup(&mut self) {
        if let Some(broker) = self.broker.take() {
            let _ = broker.shutdown().await;
        }
        delete_queues(&self.admin, self.queues.drain(..)).await;
    }
}
