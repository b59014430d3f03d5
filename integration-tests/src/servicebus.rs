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

/// Returns a message whose lock ended: back to the front of its queue, or to the dead-letter
/// queue when it has been delivered `MaxDeliveryCount` times.
fn release(e: &mut Entities, counters: &Counters, queue: &str, mut m: Stored) {
    let Some(q) = e.queues.get_mut(queue) else {
        return;
    };
    if m.delivery_count >= q.max_delivery_count {
        let (lock, max) = (q.lock_duration, q.max_delivery_count);
        m.custom.retain(|(k, _)| {
            !k.eq_ignore_ascii_case("DeadLetterReason")
                && !k.eq_ignore_ascii_case("DeadLetterErrorDescription")
        });
        m.custom.push((
            "DeadLetterReason".into(),
            "\"MaxDeliveryCountExceeded\"".into(),
        ));
        m.custom.push((
            "DeadLetterErrorDescription".into(),
            format!("\"Message could not be consumed after {max} delivery attempts.\""),
        ));
        counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        e.queues
            .entry(format!("{queue}/$DeadLetterQueue"))
            .or_insert_with(|| Queue::new(lock, u32::MAX))
            .active
            .push_back(m);
    } else {
        q.active.push_front(m);
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

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn service_url(path: &str) -> String {
    format!("https://{NAMESPACE}.servicebus.windows.net/{path}")
}

/// Checks the SAS token in `Authorization` against the requested entity path.
/// An error response, boxed to keep `Result`s small.
type Refused = Box<Response<Full<Bytes>>>;

fn authorize(state: &State, header: Option<&str>, path: &str, manage: bool) -> Result<(), Refused> {
    let deny = |detail: &str| {
        state.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
        Err(Box::new(error(StatusCode::UNAUTHORIZED, detail)))
    };
    let Some(token) = header.and_then(|h| h.strip_prefix("SharedAccessSignature ")) else {
        return deny(
            "MissingToken: the request has no SharedAccessSignature authorization header.",
        );
    };
    let mut raw: HashMap<&str, &str> = HashMap::new();
    for part in token.split('&') {
        if let Some((k, v)) = part.split_once('=') {
            raw.insert(k, v);
        }
    }
    let (Some(sr), Some(sig), Some(se), Some(skn)) =
        (raw.get("sr"), raw.get("sig"), raw.get("se"), raw.get("skn"))
    else {
        return deny("MalformedToken: the token needs sr, sig, se and skn.");
    };
    let Some(key) = state.keys.get(*skn) else {
        return deny("InvalidSignature: the token refers to an unknown shared access key.");
    };
    let Ok(expiry) = se.parse::<i64>() else {
        return deny("MalformedToken: se is not a number.");
    };
    if expiry < chrono::Utc::now().timestamp() {
        return deny("ExpiredToken: the token has expired.");
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.secret.as_bytes()) else {
        return deny("InvalidSignature: unusable key.");
    };
    mac.update(format!("{sr}\n{se}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if percent_decode(sig) != expected {
        return deny("InvalidSignature: The token has an invalid signature.");
    }
    // The audience is a URL (any of sb, http, https; the query, if signed, is not part of
    // it) that must be the namespace or a prefix of the entity, compared without case.
    let audience = percent_decode(sr).to_ascii_lowercase();
    let audience = audience.split('?').next().unwrap_or_default();
    let audience = ["sb://", "https://", "http://"]
        .iter()
        .find_map(|scheme| audience.strip_prefix(scheme))
        .unwrap_or(audience)
        .trim_end_matches('/');
    let path = path.to_ascii_lowercase();
    let covered = [
        format!("{NAMESPACE}.servicebus.windows.net"),
        state.addr.clone(),
    ]
    .iter()
    .any(|host| {
        let resource = format!("{host}/{path}");
        audience == host || resource == audience || resource.starts_with(&format!("{audience}/"))
    });
    if !covered {
        return deny("InvalidAudience: the token's audience does not cover this entity.");
    }
    if manage && !key.manage {
        return deny("Unauthorized: Manage,EntityRead claims are required for this operation.");
    }
    Ok(())
}

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

/// Request headers that are HTTP's, not custom message properties.
const NOT_CUSTOM: [&str; 17] = [
    "authorization",
    "content-type",
    "content-length",
    "brokerproperties",
    "host",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "user-agent",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "expect",
    "te",
    "cache-control",
    "pragma",
];

/// `path` with the protocol's own segments in one spelling: Service Bus reads `Messages`,
/// `Head`, `Subscriptions` and `$DeadLetterQueue` without regard to case (Microsoft's
/// clients write `Messages` and `Subscriptions`; busway writes them in lower case).
fn canonical(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let after_messages = i > 0 && segments[i - 1].eq_ignore_ascii_case("messages");
        out.push(if segment.eq_ignore_ascii_case("messages") && i > 0 {
            "messages"
        } else if segment.eq_ignore_ascii_case("subscriptions") && i > 0 {
            "subscriptions"
        } else if segment.eq_ignore_ascii_case("head") && after_messages {
            "head"
        } else if segment.eq_ignore_ascii_case("$deadletterqueue") && i > 0 {
            "$DeadLetterQueue"
        } else {
            segment
        });
    }
    out.join("/")
}

fn send(
    state: &State,
    entity: &str,
    headers: &hyper::HeaderMap,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let properties: Map<String, Value> = match headers.get("brokerproperties").map(|v| v.to_str()) {
        None => Map::new(),
        Some(Ok(text)) => match serde_json::from_str(text) {
            Ok(map) => map,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("BrokerProperties is not a JSON object: {e}"),
                );
            }
        },
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "BrokerProperties is not ASCII"),
    };
    let mut custom = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        if NOT_CUSTOM.contains(&name) || name.starts_with("x-ms-") {
            continue;
        }
        let Ok(value) = value.to_str() else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the value of custom property `{name}` is not ASCII"),
            );
        };
        custom.push((name.to_string(), value.to_string()));
    }
    let scheduled = match properties
        .get("ScheduledEnqueueTimeUtc")
        .and_then(Value::as_str)
    {
        None => None,
        Some(text) => match chrono::DateTime::parse_from_rfc2822(text) {
            Ok(at) => Some(at.with_timezone(&chrono::Utc)),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("ScheduledEnqueueTimeUtc `{text}`: {e}"),
                );
            }
        },
    };
    let ttl = properties.get("TimeToLive").and_then(Value::as_f64);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut e = state.lock();
    let targets = match targets(&e, entity, 0) {
        Ok(t) => t,
        Err(response) => return *response,
    };
    for target in targets {
        e.next_sequence += 1;
        let now = chrono::Utc::now();
        let stored = Stored {
            sequence: e.next_sequence,
            body: body.clone(),
            content_type: content_type.clone(),
            properties: properties.clone(),
            custom: custom.clone(),
            delivery_count: 0,
            enqueued: now,
            expires: ttl
                .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e9)
                .map(|t| Instant::now() + Duration::from_secs_f64(t)),
        };
        let Some(q) = e.queues.get_mut(&target) else {
            continue;
        };
        match scheduled {
            Some(at) if at > now => {
                let wait = (at - now).to_std().unwrap_or_default();
                q.scheduled.push((Instant::now() + wait, stored));
            }
            _ => q.active.push_back(stored),
        }
    }
    drop(e);
    state.counters.sent.fetch_add(1, Ordering::Relaxed);
    state.changed.notify_waiters();
    respond(StatusCode::CREATED, Bytes::new())
}

/// The queues a message sent to `entity` lands in (a queue itself; a topic's subscriptions,
/// following `ForwardTo`).
fn targets(e: &Entities, entity: &str, depth: u8) -> Result<Vec<String>, Refused> {
    if e.queues.contains_key(entity) {
        return Ok(vec![entity.to_string()]);
    }
    let Some(subs) = e.topics.get(entity) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            &format!(
                "MessagingEntityNotFound: entity `{entity}` does not exist in namespace `{NAMESPACE}`."
            ),
        )));
    };
    let mut out = Vec::new();
    for (name, sub) in subs {
        match &sub.forward_to {
            Some(to) if depth < 4 => {
                if let Ok(more) = targets(e, to, depth + 1) {
                    out.extend(more);
                }
            }
            Some(_) => {}
            None => out.push(format!("{entity}/subscriptions/{name}")),
        }
    }
    Ok(out)
}

fn rfc1123(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

async fn receive(
    state: &State,
    entity: &str,
    host: &str,
    wait: Duration,
    peek_lock: bool,
) -> Response<Full<Bytes>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let changed = state.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut e = state.lock();
            let Some(q) = e.queues.get_mut(entity) else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "MessagingEntityNotFound: `{entity}` does not exist in namespace `{NAMESPACE}`."
                    ),
                );
            };
            let now = Instant::now();
            while q
                .active
                .front()
                .is_some_and(|m| m.expires.is_some_and(|x| x <= now))
            {
                q.active.pop_front();
            }
            if let Some(mut m) = q.active.pop_front() {
                m.delivery_count += 1;
                state.counters.received.fetch_add(1, Ordering::Relaxed);
                let token = Uuid::new_v4();
                let until = chrono::Utc::now()
                    + chrono::Duration::from_std(q.lock_duration).unwrap_or_default();
                if peek_lock {
                    q.locked.insert(token, (m.clone(), now + q.lock_duration));
                }
                return delivered(entity, host, &m, token, until, peek_lock);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return respond(StatusCode::NO_CONTENT, Bytes::new()),
            _ = &mut changed => {}
        }
    }
}

fn delivered(
    entity: &str,
    host: &str,
    m: &Stored,
    token: Uuid,
    until: chrono::DateTime<chrono::Utc>,
    peek_lock: bool,
) -> Response<Full<Bytes>> {
    let mut props = m.properties.clone();
    props.remove("ScheduledEnqueueTimeUtc");
    props
        .entry("MessageId")
        .or_insert_with(|| Value::String(Uuid::new_v4().simple().to_string()));
    props
        .entry("TimeToLive")
        .or_insert(Value::from(922_337_203_685.477_6_f64));
    props.insert("DeliveryCount".into(), Value::from(m.delivery_count));
    props.insert("EnqueuedSequenceNumber".into(), Value::from(0));
    props.insert("EnqueuedTimeUtc".into(), Value::String(rfc1123(m.enqueued)));
    props.insert("SequenceNumber".into(), Value::from(m.sequence));
    props.insert("State".into(), Value::String("Active".into()));
    if peek_lock {
        props.insert("LockToken".into(), Value::String(token.to_string()));
        props.insert("LockedUntilUtc".into(), Value::String(rfc1123(until)));
    } else {
        props.insert("LockToken".into(), Value::String(String::new()));
        props.insert(
            "LockedUntilUtc".into(),
            Value::String(rfc1123(chrono::Utc::now())),
        );
    }
    let mut r = respond(
        if peek_lock {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        m.body.clone(),
    );
    let h = r.headers_mut();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_str(value),
        ) {
            h.append(n, v);
        }
    };
    put("BrokerProperties", &Value::Object(props).to_string());
    if let Some(ct) = &m.content_type {
        put("Content-Type", ct);
    }
    if peek_lock {
        put(
            "Location",
            &format!("http://{host}/{entity}/messages/{}/{token}", m.sequence),
        );
    }
    for (k, v) in &m.custom {
        put(k, v);
    }
    r
}

fn settle(state: &State, entity: &str, method: &Method, lock: &str) -> Response<Full<Bytes>> {
    let mut parts = lock.trim_start_matches('/').split('/');
    let (Some(_sequence), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected /messages/{sequence}/{lock-token}",
        );
    };
    let Ok(token) = Uuid::parse_str(token) else {
        return error(StatusCode::BAD_REQUEST, "the lock token is not a GUID");
    };
    let mut e = state.lock();
    let Some(q) = e.queues.get_mut(entity) else {
        return error(
            StatusCode::GONE,
            &format!("MessagingEntityNotFound: `{entity}` does not exist."),
        );
    };
    let lost = || {
        error(
            StatusCode::NOT_FOUND,
            "MessageLockLost: the lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.",
        )
    };
    match *method {
        Method::DELETE => {
            if q.locked.remove(&token).is_none() {
                return lost();
            }
            state.counters.completed.fetch_add(1, Ordering::Relaxed);
            respond(StatusCode::OK, Bytes::new())
        }
        Method::POST => {
            let duration = q.lock_duration;
            let Some((_, until)) = q.locked.get_mut(&token) else {
                return lost();
            };
            *until = Instant::now() + duration;
            state.counters.renewed.fetch_add(1, Ordering::Relaxed);
            respond(StatusCode::OK, Bytes::new())
        }
        Method::PUT => {
            let Some((m, _)) = q.locked.remove(&token) else {
                return lost();
            };
            state.counters.unlocked.fetch_add(1, Ordering::Relaxed);
            release(&mut e, &state.counters, entity, m);
            drop(e);
            state.changed.notify_waiters();
            respond(StatusCode::OK, Bytes::new())
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "unsupported lock operation"),
    }
}

/// The text of `<tag>..</tag>` in an Atom entry.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(&xml[start..end])
}

/// `PT300S`, `PT2.500S`, `PT5M`, `PT1H30M`, `P1D`.
fn iso_duration(text: &str) -> Option<Duration> {
    let rest = text.strip_prefix('P')?;
    let (days, time) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut secs = 0f64;
    if let Some(d) = days.strip_suffix('D') {
        secs += d.parse::<f64>().ok()? * 86_400.0;
    }
    let mut number = String::new();
    for c in time.chars() {
        match c {
            'H' | 'M' | 'S' => {
                let n: f64 = number.parse().ok()?;
                secs += n * match c {
                    'H' => 3600.0,
                    'M' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            _ => number.push(c),
        }
    }
    Some(Duration::from_secs_f64(secs))
}

fn create(state: &State, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let xml = String::from_utf8_lossy(body);
    let lock = element(&xml, "LockDuration")
        .and_then(iso_duration)
        .unwrap_or(Duration::from_secs(60));
    let max = element(&xml, "MaxDeliveryCount")
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let mut e = state.lock();
    let exists = e.queues.contains_key(path) || e.topics.contains_key(path);
    if xml.contains("<SubscriptionDescription") {
        let Some((topic, name)) = path.split_once("/subscriptions/") else {
            return error(
                StatusCode::BAD_REQUEST,
                "a subscription path is {topic}/subscriptions/{name}",
            );
        };
        if name.len() > 50 {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the subscription name `{name}` is longer than 50 characters"),
            );
        }
        let forward_to = element(&xml, "ForwardTo").map(|f| {
            let f = f
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            // ForwardTo may be given as a full URL.
            f.strip_prefix(&service_url(""))
                .map(str::to_string)
                .unwrap_or(f)
        });
        let Some(subs) = e.topics.get_mut(topic) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!("MessagingEntityNotFound: topic `{topic}` does not exist."),
            );
        };
        if subs.contains_key(name) {
            return error(
                StatusCode::CONFLICT,
                &format!("MessagingEntityAlreadyExists: subscription `{name}`."),
            );
        }
        subs.insert(name.to_string(), Subscription { forward_to });
        e.queues.insert(path.to_string(), Queue::new(lock, max));
    } else if exists {
        return error(
            StatusCode::CONFLICT,
            &format!("MessagingEntityAlreadyExists: `{path}`."),
        );
    } else if xml.contains("<QueueDescription") {
        if path.len() > 260 {
            return error(
                StatusCode::BAD_REQUEST,
                "an entity path is at most 260 characters",
            );
        }
        e.queues.insert(path.to_string(), Queue::new(lock, max));
    } else if xml.contains("<TopicDescription") {
        e.topics.insert(path.to_string(), HashMap::new());
    } else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a QueueDescription, TopicDescription or SubscriptionDescription entry",
        );
    }
    drop(e);
    describe(state, path, StatusCode::CREATED)
}

fn delete(state: &State, path: &str) -> Response<Full<Bytes>> {
    let mut e = state.lock();
    if let Some((topic, name)) = path.split_once("/subscriptions/") {
        let removed = e
            .topics
            .get_mut(topic)
            .and_then(|subs| subs.remove(name))
            .is_some();
        e.queues.remove(path);
        return if removed {
            respond(StatusCode::OK, Bytes::new())
        } else {
            error(StatusCode::NOT_FOUND, "MessagingEntityNotFound")
        };
    }
    if e.queues.remove(path).is_some() {
        e.queues.remove(&format!("{path}/$DeadLetterQueue"));
        return respond(StatusCode::OK, Bytes::new());
    }
    if let Some(subs) = e.topics.remove(path) {
        for name in subs.keys() {
            e.queues.remove(&format!("{path}/subscriptions/{name}"));
        }
        return respond(StatusCode::OK, Bytes::new());
    }
    error(StatusCode::NOT_FOUND, "MessagingEntityNotFound")
}

/// The Atom entry describing the queue, topic or subscription at `path` (`status` on
/// success), as Service Bus writes it: `id`, `title`, `updated` and the description with the
/// entity's settings and counts.
fn describe(state: &State, path: &str, status: StatusCode) -> Response<Full<Bytes>> {
    let e = state.lock();
    let (kind, name, inner) = if let Some(q) = e.queues.get(path) {
        let dead = e
            .queues
            .get(&format!("{path}/$DeadLetterQueue"))
            .map(|d| d.active.len())
            .unwrap_or(0);
        let counts = format!(
            "<MessageCount>{}</MessageCount><CountDetails xmlns:d2p1=\"http://schemas.microsoft.com/netservices/2011/06/servicebus\"><d2p1:ActiveMessageCount>{}</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>{dead}</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>{}</d2p1:ScheduledMessageCount><d2p1:TransferMessageCount>0</d2p1:TransferMessageCount><d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount></CountDetails>",
            q.active.len() + q.locked.len() + q.scheduled.len(),
            q.active.len(),
            q.scheduled.len(),
        );
        let lock = format!(
            "<LockDuration>PT{}S</LockDuration>",
            q.lock_duration.as_secs_f64()
        );
        let expiry = "<DefaultMessageTimeToLive>P10675199DT2H48M5.4775807S</DefaultMessageTimeToLive><DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration>";
        let delivery = format!(
            "<MaxDeliveryCount>{}</MaxDeliveryCount><EnableBatchedOperations>true</EnableBatchedOperations>",
            q.max_delivery_count
        );
        match path.split_once("/subscriptions/") {
            Some((topic, name)) => {
                let forward = e
                    .topics
                    .get(topic)
                    .and_then(|subs| subs.get(name))
                    .and_then(|s| s.forward_to.clone())
                    .map(|f| format!("<ForwardTo>{}</ForwardTo>", service_url(&f)))
                    .unwrap_or_default();
                (
                    "SubscriptionDescription",
                    name.to_string(),
                    format!(
                        "{lock}<RequiresSession>false</RequiresSession>{expiry}{delivery}{counts}<Status>Active</Status>{forward}"
                    ),
                )
            }
            None => (
                "QueueDescription",
                path.to_string(),
                format!(
                    "{lock}<MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><RequiresSession>false</RequiresSession>{expiry}{delivery}<SizeInBytes>0</SizeInBytes>{counts}<Status>Active</Status>"
                ),
            ),
        }
    } else if let Some(subs) = e.topics.get(path) {
        (
            "TopicDescription",
            path.to_string(),
            format!(
                "<DefaultMessageTimeToLive>P10675199DT2H48M5.4775807S</DefaultMessageTimeToLive><MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><EnableBatchedOperations>true</EnableBatchedOperations><SizeInBytes>0</SizeInBytes><Status>Active</Status><SubscriptionCount>{}</SubscriptionCount>",
                subs.len()
            ),
        )
    } else {
        return error(StatusCode::NOT_FOUND, "MessagingEntityNotFound");
    };
    let updated = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut r = respond(
        status,
        format!(
            "<entry xmlns=\"http://www.w3.org/2005/Atom\"><id>{}</id><title type=\"text\">{name}</title><published>{updated}</published><updated>{updated}</updated><link rel=\"self\" href=\"{}\"/><content type=\"application/xml\"><{kind} xmlns=\"http://schemas.microsoft.com/netservices/2010/10/servicebus/connect\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">{inner}</{kind}></content></entry>",
            service_url(path),
            service_url(path),
        ),
    );
    r.headers_mut().insert(
        "content-type",
        "application/atom+xml;type=entry;charset=utf-8"
            .parse()
            .expect("a header value"),
    );
    r
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
