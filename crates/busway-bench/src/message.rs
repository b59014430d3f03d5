//! The benchmark message, the envelope the raw baselines encode by hand, and helpers shared
//! by the scenarios (completion counting, open-loop sending).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use busway::BoxError;
use busway::prelude::*;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

/// The benchmark message: a sequence number, the time it was (meant to be) sent, a payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Busway.Bench:BenchMessage")]
pub struct BenchMessage {
    /// Sequence number.
    pub seq: u64,
    /// Nanoseconds since the process's benchmark epoch when it was scheduled to be sent.
    pub sent_ns: u64,
    /// Filler.
    pub payload: String,
}

impl BenchMessage {
    /// A message with `payload` filler bytes.
    pub fn new(seq: u64, payload: usize) -> Self {
        Self {
            seq,
            sent_ns: now_ns(),
            payload: "x".repeat(payload),
        }
    }
}

/// The instant all `sent_ns` values count from.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The host block of a MassTransit envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawHost {
    /// Machine.
    pub machine_name: String,
    /// Process.
    pub process_name: String,
    /// Process id.
    pub process_id: u32,
    /// Assembly.
    pub assembly: String,
    /// Assembly version.
    pub assembly_version: String,
    /// Framework.
    pub framework_version: String,
    /// MassTransit version.
    pub mass_transit_version: String,
    /// OS.
    pub operating_system_version: String,
}

/// A MassTransit JSON envelope around a [`BenchMessage`], written and read by hand: the work
/// a raw baseline does so that both sides move the same bytes. It has the fields busway's
/// envelope has, in the same order (nulls included), and the same two trace headers
/// (`traceparent` and MassTransit's `MT-Activity-Id`, one new trace per message).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawEnvelope {
    /// Message id.
    pub message_id: Uuid,
    /// Request id.
    pub request_id: Option<Uuid>,
    /// Correlation id.
    pub correlation_id: Option<Uuid>,
    /// Conversation id.
    pub conversation_id: Uuid,
    /// Initiator id.
    pub initiator_id: Option<Uuid>,
    /// Source address.
    pub source_address: String,
    /// Destination address.
    pub destination_address: String,
    /// Response address.
    pub response_address: Option<String>,
    /// Fault address.
    pub fault_address: Option<String>,
    /// Message types.
    pub message_type: Vec<String>,
    /// The message.
    pub message: BenchMessage,
    /// Expiration time.
    pub expiration_time: Option<DateTime<Utc>>,
    /// Sent time.
    pub sent_time: DateTime<Utc>,
    /// Headers.
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// Host.
    pub host: RawHost,
}

impl RawEnvelope {
    /// Encodes `message` the way busway's default serializer lays it out.
    pub fn encode(message: BenchMessage, destination: &str) -> Vec<u8> {
        static HOST: OnceLock<RawHost> = OnceLock::new();
        let host = HOST
            .get_or_init(|| RawHost {
                machine_name: "bench".into(),
                process_name: "busway-bench".into(),
                process_id: std::process::id(),
                assembly: "busway-bench".into(),
                assembly_version: env!("CARGO_PKG_VERSION").into(),
                framework_version: "rust".into(),
                mass_transit_version: "busway".into(),
                operating_system_version: std::env::consts::OS.into(),
            })
            .clone();
        let id = Uuid::new_v4();
        let trace = format!(
            "00-{:032x}-{:016x}-01",
            Uuid::new_v4().as_u128(),
            Uuid::new_v4().as_u64_pair().0
        );
        let mut headers = serde_json::Map::new();
        headers.insert("MT-Activity-Id".into(), trace.clone().into());
        headers.insert("traceparent".into(), trace.into());
        let envelope = Self {
            message_id: id,
            request_id: None,
            correlation_id: None,
            conversation_id: id,
            initiator_id: None,
            source_address: "loopback://localhost/bench".into(),
            destination_address: destination.to_string(),
            response_address: None,
            fault_address: None,
            message_type: vec!["urn:message:Busway.Bench:BenchMessage".into()],
            message,
            expiration_time: None,
            sent_time: Utc::now(),
            headers,
            host,
        };
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// Decodes an envelope.
    pub fn decode(bytes: &[u8]) -> Result<Self, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Counts consumed messages and latencies; wakes a waiter at a target count.
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicUsize,
    target: AtomicUsize,
    done: Notify,
    latencies: Mutex<Option<Vec<u64>>>,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

impl Tally {
    /// A tally waiting for `target` messages; `record_latency` keeps each latency.
    pub fn new(target: usize, record_latency: bool) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            target: AtomicUsize::new(target),
            done: Notify::new(),
            latencies: Mutex::new(record_latency.then(|| Vec::with_capacity(target))),
            first_ns: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
        })
    }

    /// Records one consumed message.
    pub fn record(&self, message: &BenchMessage) {
        let now = now_ns().max(1);
        let _ = self
            .first_ns
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        self.last_ns.fetch_max(now, Ordering::AcqRel);
        if let Ok(mut l) = self.latencies.lock()
            && let Some(l) = l.as_mut()
        {
            l.push(now.saturating_sub(message.sent_ns));
        }
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.target.load(Ordering::Acquire) {
            self.done.notify_one();
        }
    }

    /// Time from the first to the last message consumed (what a drain took once the first
    /// message arrived, without start-up).
    pub fn span(&self) -> Duration {
        let first = self.first_ns.load(Ordering::Acquire);
        let last = self.last_ns.load(Ordering::Acquire);
        Duration::from_nanos(last.saturating_sub(first).max(1))
    }

    /// Whether the target was reached.
    pub fn is_complete(&self) -> bool {
        self.count() >= self.target.load(Ordering::Acquire)
    }

    /// Messages consumed so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until the target was reached (errors after `timeout` with the count).
    pub async fn wait(&self, timeout: Duration) -> Result<(), BoxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = (self.count(), tokio::time::Instant::now());
        loop {
            let notified = self.done.notified();
            let count = self.count();
            let target = self.target.load(Ordering::Acquire);
            if count >= target {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if count != last.0 {
                last = (count, now);
            }
            let stalled = now.duration_since(last.1) >= STALL;
            if stalled || now >= deadline {
                let why = if stalled {
                    format!("no message arrived for {STALL:?}")
                } else {
                    format!("the {timeout:?} limit passed")
                };
                return Err(format!("only {count} of {target} messages consumed: {why}").into());
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// The latencies recorded (nanoseconds).
    pub fn latencies(&self) -> Vec<u64> {
        self.latencies
            .lock()
            .ok()
            .and_then(|mut l| l.take())
            .unwrap_or_default()
    }
}

/// How long a phase may wait for its messages.
pub const WAIT: Duration = Duration::from_secs(600);

/// How long [`Tally::wait`] waits without any message arriving before it gives up (a lost
/// message would otherwise hold a run until [`WAIT`]).
pub const STALL: Duration = Duration::from_secs(60);

/// Runs `send(seq, message)` for `n` messages, at most `window` at once.
pub async fn send_all<F, Fut>(
    n: usize,
    window: usize,
    payload: usize,
    send: F,
) -> Result<(), BoxError>
where
    F: Fn(BenchMessage) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    use futures_util::StreamExt;
    let mut stream = futures_util::stream::iter(0..n)
        .map(|i| send(BenchMessage::new(i as u64, payload)))
        .buffer_unordered(window.max(1));
    while let Some(r) = stream.next().await {
        r?;
    }
    Ok(())
}

/// Sends `n` messages at `rate` per second, each at its scheduled time (open loop: a slow
/// send does not delay the next), with `sent_ns` set to the scheduled time.
pub async fn send_open_loop<F, Fut>(
    n: usize,
    rate: f64,
    payload: usize,
    send: F,
) -> Result<(), BoxError>
where
    F: Fn(BenchMessage) -> Fut,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let start = tokio::time::Instant::now();
    let start_ns = now_ns();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let offset = interval.mul_f64(i as f64);
        tokio::time::sleep_until(start + offset).await;
        let mut m = BenchMessage::new(i as u64, payload);
        m.sent_ns = start_ns + u64::try_from(offset.as_nanos()).unwrap_or(0);
        tasks.spawn(send(m));
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
