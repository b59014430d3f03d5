//! The Hexeract side: typed publishes through a `RabbitMqTransport` (default exchange, one
//! publish in flight per pooled channel), and a `RabbitMqWorker` with one typed handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::BoxError;
use hexeract::bus::{BusError, Handler, Queue, Transport};
use hexeract::bus_rabbitmq::{
    RabbitMqConnection, RabbitMqTransport, RabbitMqWorkerBuilder, declare_queue,
};
use hexeract::core::HandlerContext;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{delete_queues, queue_name, wait_for_consumer};
use crate::message::{BenchMessage, Tally, WAIT, send_all, send_open_loop};
use crate::{Settings, Side};

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
struct Worker {
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
pub(super) struct HexeractSide {
    settings: Settings,
    connection: RabbitMqConnection,
    transport: Arc<RabbitMqTransport>,
    backlog: Option<String>,
    queues: Vec<String>,
}

impl HexeractSide {
    /// Connects; the transport's pool has `window` channels (one publish in flight each).
    pub(super) async fn connect(url: &str, settings: &Settings) -> Result<Self, BoxError> {
        let connection = RabbitMqConnection::connect(url).await?;
        let transport = RabbitMqTransport::from_connection(connection.clone(), settings.window);
        Ok(Self {
            settings: settings.clone(),
            connection,
            transport: Arc::new(transport),
            backlog: None,
            queues: Vec::new(),
        })
    }

    async fn declare(&mut self, phase: &str) -> Result<String, BoxError> {
        let name = queue_name("hexeract", phase);
        declare_queue(&self.connection, &Queue::new(name.as_str())?).await?;
        self.queues.push(name.clone());
        Ok(name)
    }

    /// Starts a worker consuming `queue` into `tally` and waits until its consumer is
    /// registered.
    async fn worker(&self, queue: &str, tally: Arc<Tally>) -> Result<Worker, BoxError> {
        let worker = RabbitMqWorkerBuilder::new(self.connection.clone())
            .queue(queue)
            .prefetch(self.settings.prefetch)
            .register_handler::<BenchMessage, _>(Record(tally))
            .build()?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(worker.run(cancel.clone()));
        let worker = Worker { cancel, task };
        match wait_for_consumer(self.connection.inner(), queue, CONSUMER_READY).await {
            Ok(()) => Ok(worker),
            Err(e) => {
                let stopped = worker.stop().await;
                Err(match stopped {
                    Err(why) => format!("the hexeract worker stopped: {why}").into(),
                    Ok(()) => e,
                })
            }
        }
    }

    async fn publish_all(&self, queue: &str, n: usize) -> Result<(), BoxError> {
        let transport = &*self.transport;
        send_all(
            n,
            self.settings.window,
            self.settings.payload,
            |m| async move {
                transport.publish(queue, &m).await?;
                Ok(())
            },
        )
        .await
    }
}

/// Waits for the tally, then stops the worker either way.
async fn drain(worker: Worker, tally: &Tally) -> Result<(), BoxError> {
    let waited = tally.wait(WAIT).await;
    worker.stop().await?;
    waited
}

#[async_trait]
impl Side for HexeractSide {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let queue = self.declare("backlog").await?;
        self.publish_all(&queue, n).await?;
        self.backlog = Some(queue);
        Ok(())
    }

    async fn consume(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.backlog.take().ok_or("consume before publish")?;
        let tally = Tally::new(n, false);
        let worker = self.worker(&queue, tally.clone()).await?;
        drain(worker, &tally).await?;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let queue = self.declare("e2e").await?;
        let tally = Tally::new(n, false);
        let worker = self.worker(&queue, tally.clone()).await?;
        let started = Instant::now();
        let waited = match self.publish_all(&queue, n).await {
            Ok(()) => tally.wait(WAIT).await,
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        worker.stop().await?;
        waited?;
        Ok(took)
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let queue = self.declare("latency").await?;
        let tally = Tally::new(n, true);
        let worker = self.worker(&queue, tally.clone()).await?;
        let queue: Arc<str> = queue.into();
        let sent = send_open_loop(n, rate, self.settings.payload, |m| {
            let transport = self.transport.clone();
            let queue = queue.clone();
            async move {
                transport.publish(&queue, &m).await?;
                Ok(())
            }
        })
        .await;
        match sent {
            Ok(()) => drain(worker, &tally).await?,
            Err(e) => {
                let _ = worker.stop().await;
                return Err(e);
            }
        }
        Ok(tally.latencies())
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
