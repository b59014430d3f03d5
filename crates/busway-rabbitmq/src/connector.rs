//! The connection and its recovery.
//!
//! A supervisor task owns the connection: it connects (retrying with exponential back-off),
//! declares the deployed topology, publishes the connected [`Link`] to everyone waiting, and
//! when the connection is lost it starts over. Publishers wait for a link up to the publish
//! timeout; receivers wait until the bus stops. Each link carries a generation number so
//! stale channels are never reused.
//!
//! lapin's own recovery (`ConnectionProperties::enable_auto_recover`, off by default; read in
//! lapin 4.12.3, `src/connection_properties.rs` and `start_recovery` in `src/channel.rs`) is
//! not used. It replays, per channel, only what that channel declared, plus its consumers,
//! confirm mode and QoS, and stops after 16 reconnect attempts by default; publishes awaiting
//! a confirm fail and are not resent, and acks of older deliveries fail. busway needs more:
//! the whole deployed topology declared again (`_error`/`_skipped` on next use), publishes
//! retried until the publish timeout, queues deleted while connected brought back, reconnects
//! for as long as the bus runs, and fresh consumer channels on each link generation.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use busway_core::transport::Backoff;
use busway_core::{Error, ErrorKind, Result, Topology};
use futures_util::StreamExt;
use lapin::types::LongString;
use lapin::{ConnectionProperties, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::RabbitMqConfig;
pub(crate) use crate::link::{Link, Publisher, Token};
use crate::link::{lapin_error, open_channel};

/// What the connection is doing.
#[derive(Clone)]
pub(crate) enum State {
    /// Not connected yet, or reconnecting; the last error if any.
    Connecting(Option<String>),
    /// Connected.
    Connected(Arc<Link>),
    /// Closed by the application.
    Closed,
}

/// Owns the connection and brings it back when it is lost.
pub(crate) struct Connector {
    pub(crate) config: RabbitMqConfig,
    state: watch::Sender<State>,
    topology: Mutex<Topology>,
    declared: Mutex<(u64, HashSet<String>)>,
    closing: Token,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    generation: AtomicU64,
    declare_topology: DeclareFn,
}

/// Declares a topology on a link (set by the transport, which knows the topology rules).
pub(crate) type DeclareFn = Arc<
    dyn Fn(
            Arc<Connector>,
            Arc<Link>,
            Topology,
        ) -> futures_util::future::BoxFuture<'static, Result<()>>
        + Send
        + Sync,
>;

impl Connector {
    pub(crate) fn new(config: RabbitMqConfig, declare_topology: DeclareFn) -> Arc<Self> {
        let (state, _) = watch::channel(State::Connecting(None));
        Arc::new(Self {
            config,
            state,
            topology: Mutex::new(Topology::default()),
            declared: Mutex::new((0, HashSet::new())),
            closing: Token::default(),
            supervisor: Mutex::new(None),
            generation: AtomicU64::new(0),
            declare_topology,
        })
    }

    /// Starts the supervisor once.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        let mut slot = self.supervisor.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() && !self.closing.is_cancelled() {
            let this = self.clone();
            *slot = Some(tokio::spawn(async move { this.supervise().await }));
        }
    }

    /// Remembers the topology so it is declared again after every reconnect.
    pub(crate) fn set_topology(&self, topology: &Topology) {
        let mut t = self.topology.lock().unwrap_or_else(|e| e.into_inner());
        for e in &topology.endpoints {
            if !t.endpoints.iter().any(|x| x.name == e.name) {
                t.endpoints.push(e.clone());
            }
        }
    }

    fn topology(&self) -> Topology {
        self.topology
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True if `key` was declared on this link generation.
    pub(crate) fn is_declared(&self, generation: u64, key: &str) -> bool {
        let d = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        d.0 == generation && d.1.contains(key)
    }

    /// Records that `key` was declared on this link generation.
    pub(crate) fn mark_declared(&self, generation: u64, key: String) {
        let mut d = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        if d.0 != generation {
            *d = (generation, HashSet::new());
        }
        d.1.insert(key);
    }

    /// Forgets declarations (after a channel error that may mean an entity was deleted).
    pub(crate) fn forget_declarations(&self) {
        let mut d = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        d.1.clear();
    }

    async fn connect(&self) -> Result<Arc<Link>> {
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.config.connection_name.as_str()));
        let connect = crate::frame_guard::connect(self.config.uri.clone(), props);
        let connection = match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::transport(
                    format!("could not connect to RabbitMQ at {}", self.config.url()),
                    e,
                ));
            }
            Err(_) => {
                return Err(Error::timeout(format!(
                    "connecting to RabbitMQ at {} took longer than {:?}",
                    self.config.url(),
                    self.config.connect_timeout
                )));
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let confirms = self.config.publisher_confirms;
        let publisher = open_channel(&connection, confirms).await?;
        let topology = open_channel(&connection, false).await?;
        Ok(Arc::new(Link {
            connection,
            publisher: RwLock::new(Publisher::new(publisher, confirms)),
            publish_order: Mutex::new(()),
            topology: tokio::sync::Mutex::new(topology),
            generation,
            broken: Token::default(),
            confirms,
        }))
    }

    async fn supervise(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut last_error: Option<String> = None;
        let mut attempts = 0u32;
        loop {
            if self.closing.is_cancelled() {
                break;
            }
            self.state
                .send_replace(State::Connecting(last_error.clone()));
            let link = match self.connect().await {
                Ok(link) => link,
                Err(err) => {
                    attempts += 1;
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        tracing::warn!(url = %self.config.url(), attempt = attempts, error = %err, "RabbitMQ connection failed; retrying");
                    }
                    last_error = Some(busway_core::error::chain_text(&err));
                    // Jittered, so many processes do not reconnect in step.
                    let delay = backoff.next_delay();
                    let jitter = delay.mul_f64(fastrand::f64() * 0.2);
                    tokio::select! {
                        _ = self.closing.cancelled() => break,
                        _ = tokio::time::sleep(delay + jitter) => {}
                    }
                    continue;
                }
            };
            if let Err(err) =
                (self.declare_topology)(self.clone(), link.clone(), self.topology()).await
            {
                tracing::warn!(url = %self.config.url(), error = %err, "declaring the topology failed; reconnecting");
                last_error = Some(busway_core::error::chain_text(&err));
                let _ = link
                    .connection
                    .close(320, "busway: topology failed".into())
                    .await;
                if !backoff.wait(&self.closing).await {
                    break;
                }
                continue;
            }
            if attempts > 0 || link.generation > 1 {
                tracing::info!(url = %self.config.url(), generation = link.generation, "reconnected to RabbitMQ");
            } else {
                tracing::debug!(url = %self.config.url(), "connected to RabbitMQ");
            }
            attempts = 0;
            backoff.reset();
            self.state.send_replace(State::Connected(link.clone()));

            let mut events = link.connection.events_listener();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let closing = loop {
                tokio::select! {
                    _ = self.closing.cancelled() => break true,
                    _ = link.broken.cancelled() => break false,
                    _ = tick.tick() => {
                        if !link.connection.status().connected() {
                            break false;
                        }
                    }
                    event = events.next() => match event {
                        Some(Event::Error(err)) => {
                            if !link.connection.status().connected() {
                                last_error = Some(err.to_string());
                                break false;
                            }
                        }
                        Some(_) => {}
                        None => break false,
                    },
                }
            };
            link.broken.cancel();
            if closing {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    link.connection.close(200, "busway: closing".into()),
                )
                .await;
                break;
            }
            tracing::warn!(url = %self.config.url(), error = ?last_error, "lost the connection to RabbitMQ; reconnecting");
            self.state
                .send_replace(State::Connecting(last_error.clone()));
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                link.connection.close(320, "busway: reconnecting".into()),
            )
            .await;
        }
        self.state.send_replace(State::Closed);
    }

    /// The current link, waiting until `deadline` while (re)connecting.
    pub(crate) async fn link_until(self: &Arc<Self>, deadline: Instant) -> Result<Arc<Link>> {
        self.ensure_started();
        let mut rx = self.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            let last = match state {
                State::Connected(link) if link.healthy() => return Ok(link),
                State::Connected(_) => None,
                State::Closed => {
                    return Err(Error::closed(format!(
                        "the RabbitMQ transport for {} is closed",
                        self.config.url()
                    )));
                }
                State::Connecting(last) => last,
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::closed("the RabbitMQ transport is closed")),
                Err(_) => {
                    // The state may still say Connected with a link that just broke.
                    if let State::Connected(link) = &*rx.borrow()
                        && link.healthy()
                    {
                        return Ok(link.clone());
                    }
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "RabbitMQ at {} is unavailable{}",
                            self.config.url(),
                            last.map(|l| format!(" (last error: {l})"))
                                .unwrap_or_default()
                        ),
                    ));
                }
            }
        }
    }

    /// The current link, waiting as long as it takes (until the transport closes or
    /// `stop` fires, which return `None`).
    pub(crate) async fn link_wait(self: &Arc<Self>, stop: &Token) -> Option<Arc<Link>> {
        self.ensure_started();
        let mut rx = self.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                State::Connected(link) if link.healthy() => return Some(link),
                State::Closed => return None,
                _ => {}
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return None },
                _ = stop.cancelled() => return None,
                // A link that broke without a state change yet: look again shortly.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Runs `op` on a healthy link, retrying across reconnects and reopened channels until
    /// the publish timeout. `op` returns `Ok`, a fatal error, or a retryable one.
    pub(crate) async fn with_link<T, F, Fut>(self: &Arc<Self>, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Arc<Link>) -> Fut,
        Fut: Future<Output = std::result::Result<T, Attempt>>,
    {
        let deadline = Instant::now() + self.config.publish_timeout;
        let mut channel_failures = 0u32;
        loop {
            let link = self.link_until(deadline).await.map_err(|e| {
                let kind = if e.is_unavailable() {
                    ErrorKind::Unavailable
                } else {
                    e.kind()
                };
                Error::with_source(kind, format!("{what} failed"), e)
            })?;
            // An operation on a connection that just died can wait forever in the client;
            // the deadline bounds every attempt.
            let attempt = match tokio::time::timeout_at(deadline, op(link.clone())).await {
                Ok(result) => result,
                Err(_) => {
                    // Only a dead connection is torn down: one slow publish (thousands of
                    // declarations, a blocked broker) must not redeliver every endpoint's
                    // in-flight messages. Heartbeats find a half-open connection.
                    if !link.connection.status().connected() {
                        link.mark_broken();
                    }
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "{what} did not finish within {:?}: RabbitMQ at {} is not responding",
                            self.config.publish_timeout,
                            self.config.url()
                        ),
                    ));
                }
            };
            match attempt {
                Ok(value) => return Ok(value),
                Err(Attempt::Fatal(err)) => return Err(err),
                Err(Attempt::Retry(err)) => {
                    let connection_lost = !link.connection.status().connected();
                    if connection_lost {
                        link.mark_broken();
                        if Instant::now() >= deadline {
                            return Err(Error::with_source(
                                ErrorKind::Unavailable,
                                format!(
                                    "{what} failed: the connection to RabbitMQ at {} was lost",
                                    self.config.url()
                                ),
                                err,
                            ));
                        }
                    } else {
                        channel_failures += 1;
                        self.forget_declarations();
                        if channel_failures >= 3 {
                            return Err(err);
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(err);
                    }
                    tracing::debug!(error = %err, "{what} failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// True once `close` was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Closes the connection and stops reconnecting.
    pub(crate) async fn close(&self) {
        self.closing.cancel();
        let handle = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.await;
        } else {
            self.state.send_replace(State::Closed);
        }
    }
}

/// The outcome of one try of an operation in [`Connector::with_link`].
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Connection or channel trouble: try again on a fresh channel or link.
    Retry(Error),
    /// The broker refused (returned, nacked): report to the caller.
    Fatal(Error),
}

impl Attempt {
    /// Classifies a lapin error: every lapin error is retried (a closed channel is reopened,
    /// a lost connection is re-established); the retry budget decides when to give up.
    pub(crate) fn from_lapin(what: &str, err: lapin::Error) -> Self {
        Attempt::Retry(lapin_error(what, err))
    }
}
