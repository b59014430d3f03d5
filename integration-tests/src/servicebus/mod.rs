//! **A local stand-in for Azure Service Bus — not Azure.** No Service Bus can run on this
//! machine (the official emulator needs Docker and speaks only AMQP), so the Service Bus
//! transport is tested against this HTTP server. It follows the documented REST protocol and
//! the Service Bus semantics the transport relies on:
//!
//! - SAS tokens (`SharedAccessSignature sr=..&sig=..&se=..&skn=..`) are checked: known key
//!   name, HMAC-SHA256 of the URL-encoded resource and expiry keyed with the key's text, the
//!   audience (`sb://`, `https://` or `http://`, any case, a signed query ignored) being the
//!   namespace or a prefix of the requested entity, not expired. The namespace is
//!   `busway-standin.servicebus.windows.net` or the stand-in's own `127.0.0.1:<port>`, which is
//!   what a client pointed at it signs. Anything else is `401`. Keys can be made without
//!   Manage rights (management operations are then `401`).
//! - `Messages`, `Head`, `Subscriptions` and `$DeadLetterQueue` are read without regard to
//!   case, as Service Bus does (Microsoft's clients write `Messages`); entity names are
//!   compared as written.
//! - Management (`PUT`/`DELETE`/`GET` `/{entity}?api-version=..` with Atom entries): queues,
//!   topics and subscriptions with `LockDuration`, `MaxDeliveryCount` and `ForwardTo`;
//!   creating an existing entity is `409`.
//! - Data plane: `POST /{entity}/messages` (with `BrokerProperties` JSON, custom properties as
//!   headers, `ScheduledEnqueueTimeUtc`), `POST /{entity}/messages/head?timeout=N` (peek-lock,
//!   long-polling up to N seconds, `201` with `BrokerProperties` and a `Location` to settle
//!   with, `204` when empty), `DELETE /{entity}/messages/head` (receive-and-delete) and, on
//!   the `Location`, `DELETE` (complete), `PUT` (unlock), `POST` (renew lock). The `Location`
//!   names the host the request was sent to, as Service Bus's does.
//! - Creating and reading an entity answer with an Atom entry (`id`, `title`, `updated`, and a
//!   `QueueDescription` / `TopicDescription` / `SubscriptionDescription` with the settings
//!   and counts).
//! - Microsoft's Node.js REST client, `azure-sb` 0.11.2, runs a create / send / peek-lock /
//!   renew / unlock / complete / fan-out / dead-letter / delete sequence against it in
//!   `tests/servicebus_azure_sb.rs`; every step passes.
//! - Topics fan out to their subscriptions; a subscription with `ForwardTo` delivers into the
//!   target entity, one without keeps its own queue (`{topic}/subscriptions/{name}`).
//! - Locks expire after the entity's lock duration; an expired or unlocked message returns
//!   with `DeliveryCount` + 1; once `DeliveryCount` reaches `MaxDeliveryCount` it moves to
//!   `{entity}/$DeadLetterQueue` with `DeadLetterReason: MaxDeliveryCountExceeded`.
//! - Messages past their `TimeToLive` are not delivered.
//!
//! What it does not do: sessions, transactions, duplicate detection, rules and filters,
//! partitioned entities, the AMQP protocol, quotas and throttling.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod auth;
mod data;
mod management;

use auth::*;
use data::*;
use management::*;

/// The namespace the stand-in pretends to be.
pub const NAMESPACE: &str = "busway-standin";

/// A shared access key the stand-in accepts.
#[derive(Debug, Clone)]
struct Key {
    secret: String,
    manage: bool,
}

/// Counts of messages in one entity of the stand-in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntityStats {
    /// Ready to be received.
    pub active: usize,
    /// Locked by a receiver.
    pub locked: usize,
    /// Waiting for their scheduled enqueue time.
    pub scheduled: usize,
}

/// Request counters of the stand-in.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    completed: AtomicU64,
    unlocked: AtomicU64,
    renewed: AtomicU64,
    expired_locks: AtomicU64,
    dead_lettered: AtomicU64,
    unauthorized: AtomicU64,
}

/// A snapshot of the stand-in's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages accepted by `POST /messages`.
    pub sent: u64,
    /// Messages handed out (peek-lock or receive-and-delete).
    pub received: u64,
    /// Locks completed.
    pub completed: u64,
    /// Locks given up by the receiver (unlock).
    pub unlocked: u64,
    /// Lock renewals.
    pub renewed: u64,
    /// Locks that ran out.
    pub expired_locks: u64,
    /// Messages moved to a `$DeadLetterQueue`.
    pub dead_lettered: u64,
    /// Requests refused with 401.
    pub unauthorized: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    sequence: i64,
    body: Bytes,
    content_type: Option<String>,
    /// Broker properties the sender set (MessageId, CorrelationId, Label, ReplyTo, ...).
    properties: Map<String, Value>,
    /// Custom properties, as the header values they came in.
    custom: Vec<(String, String)>,
    delivery_count: u32,
    enqueued: chrono::DateTime<chrono::Utc>,
    expires: Option<Instant>,
}

#[derive(Debug)]
struct Queue {
    lock_duration: Duration,
    max_delivery_count: u32,
    active: VecDeque<Stored>,
    scheduled: Vec<(Instant, Stored)>,
    locked: HashMap<Uuid, (Stored, Instant)>,
}

impl Queue {
    fn new(lock_duration: Duration, max_delivery_count: u32) -> Self {
        Self {
            lock_duration,
            max_delivery_count,
            active: VecDeque::new(),
            scheduled: Vec::new(),
            locked: HashMap::new(),
        }
    }
}

#[derive(Debug)]
struct Subscription {
    forward_to: Option<String>,
}

#[derive(Debug, Default)]
struct Entities {
    queues: HashMap<String, Queue>,
    topics: HashMap<String, HashMap<String, Subscription>>,
    next_sequence: i64,
}

#[derive(Debug)]
struct State {
    keys: HashMap<String, Key>,
    /// `127.0.0.1:<port>`: the stand-in is the namespace at this address too, so tokens for
    /// it (what a client pointed at it signs) are accepted like tokens for the namespace.
    addr: String,
    entities: Mutex<Entities>,
    changed: Notify,
    counters: Counters,
    /// Peek-lock answers still to send without `BrokerProperties` (a fault to inject).
    garble: AtomicU64,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Entities> {
        self.entities
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Builds a [`StandIn`].
#[derive(Debug, Default)]
pub struct StandInBuilder {
    keys: Vec<(String, String, bool)>,
}

impl StandInBuilder {
    /// Accepts a key (`manage`: whether it may create and delete entities).
    pub fn key(mut self, name: &str, secret: &str, manage: bool) -> Self {
        self.keys
            .push((name.to_string(), secret.to_string(), manage));
        self
    }

    /// Starts the server on 127.0.0.1 (a free port) on a thread and runtime of its own, so
    /// it outlives the runtime of any one test.
    pub fn start(self) -> StandIn {
        let mut keys: HashMap<String, Key> = HashMap::new();
        for (name, secret, manage) in self.keys {
            keys.insert(name, Key { secret, manage });
        }
        let root_secret =
            base64::engine::general_purpose::STANDARD.encode(Uuid::new_v4().as_bytes());
        keys.entry("RootManageSharedAccessKey".to_string())
            .or_insert(Key {
                secret: root_secret,
                manage: true,
            });
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("the stand-in binds a local port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local address").port();
        let state = Arc::new(State {
            keys,
            addr: format!("127.0.0.1:{port}"),
            entities: Mutex::new(Entities::default()),
            changed: Notify::new(),
            counters: Counters::default(),
            garble: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let (s, st) = (state.clone(), stop.clone());
        std::thread::Builder::new()
            .name("servicebus-standin".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the stand-in");
                runtime.block_on(serve(listener, s, st));
            })
            .expect("the stand-in thread starts");
        StandIn { state, port, stop }
    }
}

/// A running local stand-in for Azure Service Bus (see the module docs). Stops when dropped.
#[derive(Debug)]
pub struct StandIn {
    state: Arc<State>,
    port: u16,
    stop: CancellationToken,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl StandIn {
    /// A builder (extra keys).
    pub fn builder() -> StandInBuilder {
        StandInBuilder::default()
    }

    /// A stand-in with only the `RootManageSharedAccessKey` key.
    pub fn start() -> StandIn {
        Self::builder().start()
    }

    /// `http://127.0.0.1:<port>`: what `ServiceBusBuilder::base_url` takes.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A connection string with the root key.
    pub fn connection_string(&self) -> String {
        let secret = &self.state.keys["RootManageSharedAccessKey"].secret;
        self.connection_string_for("RootManageSharedAccessKey", secret)
    }

    /// A connection string for any key name and secret (accepted or not).
    pub fn connection_string_for(&self, key_name: &str, secret: &str) -> String {
        format!(
            "Endpoint=sb://{NAMESPACE}.servicebus.windows.net/;SharedAccessKeyName={key_name};SharedAccessKey={secret}"
        )
    }

    /// Message counts of a queue (or `{topic}/subscriptions/{name}`, or
    /// `{entity}/$DeadLetterQueue`); `None` if it does not exist.
    pub fn stats(&self, entity: &str) -> Option<EntityStats> {
        let e = self.state.lock();
        e.queues.get(entity).map(|q| EntityStats {
            active: q.active.len(),
            locked: q.locked.len(),
            scheduled: q.scheduled.len(),
        })
    }

    /// Whether a queue exists.
    pub fn has_queue(&self, name: &str) -> bool {
        self.state.lock().queues.contains_key(name)
    }

    /// Whether a topic exists.
    pub fn has_topic(&self, name: &str) -> bool {
        self.state.lock().topics.contains_key(name)
    }

    /// The lock duration and max delivery count of a queue.
    pub fn queue_settings(&self, name: &str) -> Option<(Duration, u32)> {
        self.state
            .lock()
            .queues
            .get(name)
            .map(|q| (q.lock_duration, q.max_delivery_count))
    }

    /// A topic's subscriptions: `(name, forward_to)`, sorted by name.
    pub fn subscriptions(&self, topic: &str) -> Vec<(String, Option<String>)> {
        let mut out: Vec<_> = self
            .state
            .lock()
            .topics
            .get(topic)
            .map(|subs| {
                subs.iter()
                    .map(|(n, s)| (n.clone(), s.forward_to.clone()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Answers the next `n` peek-lock receives without the `BrokerProperties` header (the
    /// message is locked all the same), to test a transport against a broken answer.
    pub fn garble_next_receives(&self, n: u64) {
        self.state.garble.store(n, Ordering::SeqCst);
    }

    /// The counters so far.
    pub fn counts(&self) -> Counts {
        let c = &self.state.counters;
        Counts {
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            unlocked: c.unlocked.load(Ordering::Relaxed),
            renewed: c.renewed.load(Ordering::Relaxed),
            expired_locks: c.expired_locks.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            unauthorized: c.unauthorized.load(Ordering::Relaxed),
        }
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<State>, stop: CancellationToken) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
    tokio::spawn(sweep(state.clone(), stop.clone()));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (state, stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

/// Moves due scheduled messages in and expired locks out, every 20 ms.
async fn sweep(state: Arc<State>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let now = Instant::now();
        let mut changed = false;
        let mut e = state.lock();
        let names: Vec<String> = e.queues.keys().cloned().collect();
        for name in names {
            let Some(q) = e.queues.get_mut(&name) else {
                continue;
            };
            let mut due = Vec::new();
            q.scheduled.retain(|(at, m)| {
                if *at <= now {
                    due.push(m.clone());
                    false
                } else {
                    true
                }
            });
            due.sort_by_key(|m| m.sequence);
            changed |= !due.is_empty();
            q.active.extend(due);
            let expired: Vec<Uuid> = q
                .locked
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(t, _)| *t)
                .collect();
            let mut released: Vec<Stored> = expired
                .iter()
                .filter_map(|t| q.locked.remove(t).map(|(m, _)| m))
                .collect();
            // Released messages go back to the front; the oldest ends up first.
            released.sort_by_key(|m| std::cmp::Reverse(m.sequence));
            for m in released {
                state.counters.expired_locks.fetch_add(1, Ordering::Relaxed);
                release(&mut e, &state.counters, &name, m);
                changed = true;
            }
        }
        drop(e);
        if changed {
            state.changed.notify_waiters();
        }
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn error(status: StatusCode, detail: &str) -> Response<Full<Bytes>> {
    let mut r = respond(
        status,
        format!(
            "<Error><Code>{}</Code><Detail>{}</Detail></Error>",
            status.as_u16(),
            detail.replace('&', "&amp;").replace('<', "&lt;")
        ),
    );
    r.headers_mut().insert(
        "content-type",
        "application/xml; charset=utf-8"
            .parse()
            .expect("a header value"),
    );
    r
}

/// Checks the SAS token in `Authorization` against the requested entity path.
/// An error response, boxed to keep `Result`s small.
type Refused = Box<Response<Full<Bytes>>>;

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "could not read the request body");
    };
    let path = canonical(&percent_decode(parts.uri.path().trim_start_matches('/')));
    // Lock locations name the host the client asked for, as Service Bus's do.
    let host = parts
        .headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(&state.addr)
        .to_string();
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if let Some(i) = path.rfind("/messages") {
        let entity = path[..i].to_string();
        let rest = &path[i + "/messages".len()..];
        if let Err(denied) = authorize(state, auth, &path, false) {
            return *denied;
        }
        return match (parts.method.clone(), rest) {
            (Method::POST, "") => send(state, &entity, &parts.headers, body),
            (Method::POST, "/head") => {
                let wait = query
                    .get("timeout")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(60)
                    .min(60);
                receive(state, &entity, &host, Duration::from_secs(wait), true).await
            }
            (Method::DELETE, "/head") => {
                let wait = query
                    .get("timeout")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(0)
                    .min(60);
                receive(state, &entity, &host, Duration::from_secs(wait), false).await
            }
            (method, lock) => settle(state, &entity, &method, lock),
        };
    }
    if let Err(denied) = authorize(state, auth, &path, parts.method != Method::GET) {
        return *denied;
    }
    match parts.method {
        Method::PUT => create(state, &path, &body),
        Method::DELETE => delete(state, &path),
        Method::GET => describe(state, &path, StatusCode::OK),
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "unsupported operation"),
    }
}

/// The text of `<tag>..</tag>` in an Atom entry.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(&xml[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iso_durations() {
        assert_eq!(iso_duration("PT300S"), Some(Duration::from_secs(300)));
        assert_eq!(iso_duration("PT2.500S"), Some(Duration::from_millis(2500)));
        assert_eq!(iso_duration("PT1H30M"), Some(Duration::from_secs(5400)));
        assert_eq!(iso_duration("P1D"), Some(Duration::from_secs(86_400)));
        assert_eq!(iso_duration("5m"), None);
    }

    #[test]
    fn reads_atom_elements() {
        let xml = "<entry><content><QueueDescription><LockDuration>PT5S</LockDuration><MaxDeliveryCount>3</MaxDeliveryCount></QueueDescription></content></entry>";
        assert_eq!(element(xml, "LockDuration"), Some("PT5S"));
        assert_eq!(element(xml, "MaxDeliveryCount"), Some("3"));
        assert_eq!(element(xml, "ForwardTo"), None);
    }
}
