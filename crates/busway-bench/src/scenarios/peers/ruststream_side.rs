//! The RustStream side: a confirms publisher on the default exchange, and a `#[subscriber]`
//! handler in RustStream's app runtime, mounted on each phase's queue at run time with
//! `.name(..)`.

use std::convert::Infallible;
use std::num::NonZeroU16;
use std::sync::Arc;

use async_trait::async_trait;
use busway::BoxError;
use futures_util::future::BoxFuture;
use ruststream::ConnectedBroker;
use ruststream_lapin::prelude::*;
use ruststream_lapin::{ConfirmsPublisher, ConnectedLapinBroker};
use serde::Serialize;

use super::{PeerClient, declare_queue, delete_queues, queue_name};
use crate::Settings;
use crate::message::{BenchMessage, Tally};

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
pub(super) struct RustStreamClient {
    url: String,
    prefetch: u16,
    /// Declares and deletes the queues (RustStream declares only while subscribing).
    admin: lapin::Connection,
    /// The publishing connection; kept for its shutdown.
    broker: Option<ConnectedLapinBroker>,
    publisher: ConfirmsPublisher,
    queues: Vec<String>,
}

impl RustStreamClient {
    /// Connects the publisher and the admin connection.
    pub(super) async fn connect(url: &str, settings: &Settings) -> Result<Self, BoxError> {
        let admin = lapin::Connection::connect(url, Default::default()).await?;
        let broker = LapinBroker::new(url).connect().await?;
        let publisher = broker.publisher(LapinPublish::default().confirms());
        Ok(Self {
            url: url.to_string(),
            prefetch: settings.prefetch,
            admin,
            broker: Some(broker),
            publisher,
            queues: Vec::new(),
        })
    }
}

#[async_trait]
impl PeerClient for RustStreamClient {
    type Consumer = RunningApp;

    async fn declare(&mut self, phase: &str) -> Result<String, BoxError> {
        let name = queue_name("ruststream", phase);
        declare_queue(&self.admin, &name).await?;
        self.queues.push(name.clone());
        Ok(name)
    }

    /// Starts an app consuming `queue`; it returns once the subscription is open.
    async fn start(&self, queue: &str, tally: Arc<Tally>) -> Result<RunningApp, BoxError> {
        let prefetch = NonZeroU16::new(self.prefetch).ok_or("prefetch 0")?;
        let broker = LapinBroker::new(self.url.as_str()).prefetch(prefetch);
        let queue = queue.to_string();
        let app = RustStream::new(AppInfo::new("busway-bench", env!("CARGO_PKG_VERSION")))
            .on_startup(async move |()| Ok::<_, Infallible>(Consuming { tally }))
            .with_broker(broker, move |b| {
                b.include(record.name(queue));
            });
        Ok(app.start().await?)
    }

    async fn stop(running: RunningApp) -> Result<(), BoxError> {
        running.shutdown().await?;
        Ok(())
    }

    fn publish(
        &self,
        queue: Arc<str>,
        m: BenchMessage,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let publisher = self.publisher.clone();
        Box::pin(async move {
            publisher.message(&Bench(m)).to(&*queue).publish().await?;
            Ok(())
        })
    }

    async fn cleanup(&mut self) {
        if let Some(broker) = self.broker.take() {
            let _ = broker.shutdown().await;
        }
        delete_queues(&self.admin, self.queues.drain(..)).await;
    }
}
