//! A test harness: run a bus on the in-memory transport and wait for "published / sent /
//! consumed / faulted a message of type T matching a predicate", like MassTransit's
//! `ITestHarness`.
//!
//! ```
//! use busway_core::testing::TestHarness;
//! use busway_core::{Bus, ConsumeContext, ConsumeError, Consumer, Message, Urn};
//! # #[derive(Debug, serde::Serialize, serde::Deserialize)] struct Ping { n: u32 }
//! # impl Message for Ping { fn message_type() -> &'static Urn { static U: Urn = Urn::from_static("urn:message:Tests:Ping"); &U } }
//! struct PingConsumer;
//! impl Consumer<Ping> for PingConsumer {
//!     async fn consume(&self, _: &ConsumeContext<Ping>) -> Result<(), ConsumeError> { Ok(()) }
//! }
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let harness = TestHarness::start(Bus::builder().consumer(PingConsumer)).await.unwrap();
//! harness.bus().publish(Ping { n: 7 }).await.unwrap();
//! let consumed = harness.wait_consumed::<Ping>(|p| p.n == 7).await.unwrap();
//! assert_eq!(consumed.endpoint.as_deref(), Some("ping"));
//! harness.stop().await.unwrap();
//! # });
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::bus::Bus;
use crate::bus::builder::BusBuilder;
use crate::bus::running::RunningBus;
use crate::context::ReceiveContext;
use crate::envelope::Envelope;
use crate::error::{ConsumeError, Error, ErrorKind, Result};
use crate::inmemory::InMemory;
use crate::message::Message;
use crate::observer::BusObserver;
use crate::outgoing::{OutgoingMessage, SendTarget};
use crate::serializer::decode_message;
use crate::transport::{MoveKind, TransportMessage};
use crate::urn::Urn;

/// What the harness saw happen to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Published,
    Sent,
    Consumed,
    Faulted,
}

#[derive(Clone)]
struct Record {
    kind: Kind,
    types: Vec<Urn>,
    body: Arc<str>,
    envelope: Envelope,
    endpoint: Option<String>,
    consumer: Option<String>,
    error: Option<String>,
}

#[derive(Default)]
struct Observations {
    records: Mutex<Vec<Record>>,
    moves: Mutex<Vec<(String, MoveKind, TransportMessage, String)>>,
    notify: Notify,
}

impl Observations {
    fn push(&self, record: Record) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
        self.notify.notify_waiters();
    }
}

struct HarnessObserver(Arc<Observations>);

impl BusObserver for HarnessObserver {
    fn on_send(&self, message: &OutgoingMessage, error: Option<&Error>) {
        if error.is_some() {
            return;
        }
        self.0.push(Record {
            kind: match message.target {
                SendTarget::Publish => Kind::Published,
                _ => Kind::Sent,
            },
            types: message.envelope.message_type.clone(),
            body: Arc::from(message.message.get()),
            envelope: message.envelope.clone(),
            endpoint: None,
            consumer: None,
            error: None,
        });
    }

    fn on_consume(
        &self,
        context: &ReceiveContext,
        consumer_type: &str,
        message_type: &Urn,
        error: Option<&ConsumeError>,
    ) {
        self.0.push(Record {
            kind: if error.is_some() {
                Kind::Faulted
            } else {
                Kind::Consumed
            },
            types: vec![message_type.clone()],
            body: Arc::from(context.message_json().get()),
            envelope: context.envelope().clone(),
            endpoint: Some(context.endpoint_name().to_string()),
            consumer: Some(consumer_type.to_string()),
            error: error.map(|e| e.to_string()),
        });
    }

    fn on_move(&self, endpoint: &str, kind: MoveKind, message: &TransportMessage, reason: &str) {
        self.0
            .moves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((
                endpoint.to_string(),
                kind,
                message.clone(),
                reason.to_string(),
            ));
        self.0.notify.notify_waiters();
    }
}

/// A message the harness observed, with its envelope.
#[derive(Debug, Clone)]
pub struct Observed<T> {
    /// The message.
    pub message: T,
    /// Its envelope (ids, addresses, headers).
    pub envelope: Envelope,
    /// For consumed and faulted messages: the endpoint.
    pub endpoint: Option<String>,
    /// For consumed and faulted messages: the consumer type.
    pub consumer: Option<String>,
    /// For faulted messages: the error.
    pub error: Option<String>,
}

/// Runs a bus on the in-memory transport and records what it does.
pub struct TestHarness {
    bus: Bus,
    running: Option<RunningBus>,
    transport: InMemory,
    observations: Arc<Observations>,
    timeout: Duration,
}

impl fmt::Debug for TestHarness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHarness")
            .field("bus", &self.bus)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl TestHarness {
    /// Default time to wait for an expected message (MassTransit's `TestTimeout`).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Builds and starts `builder` on a new in-memory transport.
    pub async fn start(builder: BusBuilder) -> Result<Self> {
        Self::start_on(builder, InMemory::new()).await
    }

    /// Builds and starts `builder` on `transport` (share it to inspect queues, or to run a
    /// second bus on the same broker).
    pub async fn start_on(builder: BusBuilder, transport: InMemory) -> Result<Self> {
        if builder.has_transport() {
            return Err(Error::config(
                "the test harness chooses the transport; build the bus without `.transport(..)`",
            ));
        }
        let observations = Arc::new(Observations::default());
        let bus = builder
            .transport(transport.clone())
            .observer(HarnessObserver(observations.clone()))
            .build()
            .await?;
        let running = bus.start().await?;
        Ok(Self {
            bus,
            running: Some(running),
            transport,
            observations,
            timeout: Self::DEFAULT_TIMEOUT,
        })
    }

    /// Waits at most `timeout` in the `wait_*` methods.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bus under test.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The in-memory broker (read error and skipped queues with it).
    pub fn transport(&self) -> &InMemory {
        &self.transport
    }

    fn snapshot<T: Message>(&self, kind: Kind) -> Vec<Observed<T>> {
        let records = self
            .observations
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        records
            .into_iter()
            .filter(|r| r.kind == kind && r.types.iter().any(|t| t == T::message_type()))
            .filter_map(|r| {
                let raw = serde_json::value::RawValue::from_string(r.body.to_string()).ok()?;
                let message = decode_message::<T>(&raw).ok()?;
                Some(Observed {
                    message,
                    envelope: r.envelope,
                    endpoint: r.endpoint,
                    consumer: r.consumer,
                    error: r.error,
                })
            })
            .collect()
    }

    async fn wait<T: Message>(
        &self,
        kind: Kind,
        what: &str,
        predicate: impl Fn(&T) -> bool,
    ) -> Result<Observed<T>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let notified = self.observations.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = self
                .snapshot::<T>(kind)
                .into_iter()
                .find(|o| predicate(&o.message))
            {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "no matching {} message was {what} within {:?}",
                        T::message_type(),
                        self.timeout
                    ),
                ));
            }
        }
    }

    /// Messages of type `T` published so far.
    pub fn published<T: Message>(&self) -> Vec<Observed<T>> {
        self.snapshot(Kind::Published)
    }

    /// Messages of type `T` sent so far.
    pub fn sent<T: Message>(&self) -> Vec<Observed<T>> {
        self.snapshot(Kind::Sent)
    }

    /// Successful consumes of `T` so far (one per consumer and attempt).
    pub fn consumed<T: Message>(&self) -> Vec<Observed<T>> {
        self.snapshot(Kind::Consumed)
    }

    /// Failed consume attempts of `T` so far (one per consumer and attempt).
    pub fn faulted<T: Message>(&self) -> Vec<Observed<T>> {
        self.snapshot(Kind::Faulted)
    }

    /// Waits until a `T` matching `predicate` is published.
    pub async fn wait_published<T: Message>(
        &self,
        predicate: impl Fn(&T) -> bool,
    ) -> Result<Observed<T>> {
        self.wait(Kind::Published, "published", predicate).await
    }

    /// Waits until a `T` matching `predicate` is sent.
    pub async fn wait_sent<T: Message>(
        &self,
        predicate: impl Fn(&T) -> bool,
    ) -> Result<Observed<T>> {
        self.wait(Kind::Sent, "sent", predicate).await
    }

    /// Waits until a consumer consumes a `T` matching `predicate` successfully.
    pub async fn wait_consumed<T: Message>(
        &self,
        predicate: impl Fn(&T) -> bool,
    ) -> Result<Observed<T>> {
        self.wait(Kind::Consumed, "consumed", predicate).await
    }

    /// Waits until a consumer fails on a `T` matching `predicate`.
    pub async fn wait_faulted<T: Message>(
        &self,
        predicate: impl Fn(&T) -> bool,
    ) -> Result<Observed<T>> {
        self.wait(Kind::Faulted, "faulted", predicate).await
    }

    /// Waits until a message is moved to `endpoint`'s error or skipped queue; returns it with
    /// the reason.
    pub async fn wait_moved(
        &self,
        endpoint: &str,
        kind: MoveKind,
    ) -> Result<(TransportMessage, String)> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let notified = self.observations.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found = self
                .observations
                .moves
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(e, k, _, _)| e == endpoint && *k == kind)
                .map(|(_, _, m, r)| (m.clone(), r.clone()));
            if let Some(found) = found {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::timeout(format!(
                    "nothing was moved to {} within {:?}",
                    kind.queue_name(endpoint),
                    self.timeout
                )));
            }
        }
    }

    /// Waits until nothing has been observed for `quiet` (or the harness timeout passes).
    pub async fn wait_idle(&self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let notified = self.observations.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let until = (tokio::time::Instant::now() + quiet).min(deadline);
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return;
            }
        }
    }

    /// Shuts the bus down gracefully.
    pub async fn stop(mut self) -> Result<()> {
        match self.running.take() {
            Some(running) => running.shutdown_within(Duration::from_secs(10)).await,
            None => Ok(()),
        }
    }
}
