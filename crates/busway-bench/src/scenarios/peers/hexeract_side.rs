//! The Hexeract side: typed publishes through a `RabbitMqTransport` (default exchange, one
//! publish in flight per pooled channel), and a `RabbitMqWorker` with one typed handler.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway::BoxError;
use futures_util::future::BoxFuture;
use hexeract::bus::{BusError, Handler, Queue, Transport};
use hexeract::bus_rabbitmq::{
    RabbitMqConnection, RabbitMqTransport, RabbitMqWorkerBuilder, declare_queue,
};
use hexeract::core::HandlerContext;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{PeerClient, delete_queues, queue_name, wait_for_consumer};
use crate::Settings;
use crate::message::{BenchMessage, Tally};

impl hexeract::bus::Message for BenchMessage {
    const MESSAGE_TYPE: &'static str = "busway.bench.BenchMessage";
}

/// Counts each message; the worker acks it once this returns `Ok`.
struct Record(Arc<Tally>);

impl Handler<BenchMessage> for Record {
    type Error = BusError;

    async fn handle(&self, message: BenchMessage, _: &HandlerContext) -> Result<(), BusError> {
        self.0.record(&message);
        Ok(())
    }
}

/// How long a started worker may take to register its consumer.
const CONSUMER_READY: Duration = Duration::from_secs(30);

/// A running worker and the token that stops it.
pub(super) struct Worker {
    cancel: CancellationToken,
    task: JoinHandle<Result<(), BusError>>,
}

impl Worker {
    /// Stops the worker and reports how its loop ended.
    async fn stop(self) -> Result<(), BoxError> {
        self.cancel.cancel();
        Ok(self.task.await??)
    }
}

/// Hexeract with the benchmark's settings.
pub(super) struct HexeractClient {
    prefetch: u16,
    connection: RabbitMqConnection,
    transport: Arc<RabbitMqTransport>,
    queues: Vec<String>,
}

impl HexeractClient {
    /// Connects; the transport's pool has `window` channels (one publish in flight each).
    pub(super) async fn connect(url: &str, settings: &Settings) -> Result<Self, BoxError> {
        let connection = RabbitMqConnection::connect(url).await?;
        let transport = RabbitMqTransport::from_connection(connection.clone(), settings.window);
        Ok(Self {
            prefetch: settings.prefetch,
            connection,
            transport: Arc::new(transport),
            queues: Vec::new(),
        })
    }
}

#[async_trait]
impl PeerClient for HexeractClient {
    type Consumer = Worker;

    async fn declare(&mut self, phase: &str) -> Result<String, BoxError> {
        let name = queue_name("hexeract", phase);
        declare_queue(&self.connection, &Queue::new(name.as_str())?).await?;
        self.queues.push(name.clone());
        Ok(name)
    }

    /// Starts a worker and waits until its consumer is registered (it starts in the
    /// background).
    async fn start(&self, queue: &str, tally: Arc<Tally>) -> Result<Worker, BoxError> {
        let worker = RabbitMqWorkerBuilder::new(self.connection.clone())
            .queue(queue)
            .prefetch(self.prefetch)
            .register_handler::<BenchMessage, _>(Record(tally))
            .build()?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(worker.run(cancel.clone()));
        let worker = Worker { cancel, task };
        match wait_for_consumer(self.connection.inner(), queue, CONSUMER_READY).await {
            Ok(()) => Ok(worker),
            Err(e) => Err(match worker.stop().await {
                Err(why) => format!("the hexeract worker stopped: {why}").into(),
                Ok(()) => e,
            }),
        }
    }

    async fn stop(worker: Worker) -> Result<(), BoxError> {
        worker.stop().await
    }

    fn publish(
        &self,
        queue: Arc<str>,
        m: BenchMessage,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let transport = self.transport.clone();
        Box::pin(async move {
            transport.publish(&queue, &m).await?;
            Ok(())
        })
    }

    async fn cleanup(&mut self) {
        // The worker declared a `<queue>.retry` wait queue next to each queue.
        let queues: Vec<String> = self
            .queues
            .drain(..)
            .flat_map(|q| [format!("{q}.retry"), q])
            .collect();
        delete_queues(self.connection.inner(), queues).await;
    }
}
