//! Helpers for tests: unique names, counters, polling with a deadline.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway::transport::QueueAdmin;
use busway::{ConsumeContext, ConsumeError, Message, TransportMessage};

use crate::TransportFixture;

/// `name-<8 hex digits>`: endpoint names that do not collide between tests or runs.
pub fn unique(name: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{name}-{}", &id[..8])
}

/// How long one test binary may run before its watchdog ends it: a hung test is a failed
/// test, not a hung suite. `BUSWAY_TEST_BINARY_DEADLINE_SECS` overrides it.
pub const BINARY_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// Starts, once per test binary, a watchdog thread that ends the process with a clear
/// message when the binary runs past [`BINARY_DEADLINE`]. Called by [`init_tracing`] and by
/// each service's `require_*` check, so every test binary that talks to a service has one.
pub fn start_watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let limit = std::env::var("BUSWAY_TEST_BINARY_DEADLINE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(BINARY_DEADLINE);
        let binary = std::env::args().next().unwrap_or_default();
        let spawned = std::thread::Builder::new()
            .name("busway-test-watchdog".into())
            .spawn(move || {
                std::thread::sleep(limit);
                eprintln!(
                    "\nbusway test watchdog: `{binary}` ran for more than {limit:?}; a test is hung \
                     (a wait without a bound, or a broker call that never returned). Failing the run."
                );
                std::process::exit(101);
            });
        if let Err(err) = spawned {
            eprintln!("busway test watchdog could not start: {err}");
        }
    });
}

/// Installs a test tracing subscriber once (`RUST_LOG` picks the level; default warn), and
/// starts the binary's [watchdog](start_watchdog).
pub fn init_tracing() {
    start_watchdog();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A shared counter.
#[derive(Clone, Default, Debug)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    /// Adds one and returns the new value.
    pub fn incr(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Subtracts one.
    pub fn decr(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }

    /// The value.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// What handlers saw, in arrival order: clones share one log, which the test reads back.
///
/// ```ignore
/// let seen = Recorder::default();
/// e.handler(seen.record(|ctx: &ConsumeContext<Work>| ctx.message().n));
/// let ns = seen.wait_for(3, WAIT, "three messages").await;
/// ```
#[derive(Debug)]
pub struct Recorder<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for Recorder<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T: Clone + Send + 'static> Recorder<T> {
    /// Adds an entry.
    pub fn push(&self, entry: T) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the entries so far.
    pub fn entries(&self) -> Vec<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (bounded by `timeout`) until there are at least `count` entries; returns them.
    pub async fn wait_for(&self, count: usize, timeout: Duration, what: &str) -> Vec<T> {
        wait_until(timeout, what, || self.len() >= count).await;
        self.entries()
    }

    /// A handler that records `entry(&ctx)` for each message and succeeds.
    pub fn record<M: Message>(
        &self,
        entry: impl Fn(&ConsumeContext<M>) -> T + Send + Sync + 'static,
    ) -> impl Fn(ConsumeContext<M>) -> std::future::Ready<Result<(), ConsumeError>> + Send + Sync + 'static
    {
        self.record_then(entry, |_| std::future::ready(Ok(())))
    }

    /// A handler that records `entry(&ctx)` for each message, then runs `then` (which may
    /// publish, respond or fail).
    pub fn record_then<M: Message, Fut>(
        &self,
        entry: impl Fn(&ConsumeContext<M>) -> T + Send + Sync + 'static,
        then: impl Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
    ) -> impl Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static
    where
        Fut: Future<Output = Result<(), ConsumeError>> + Send + 'static,
    {
        let log = self.clone();
        move |ctx| {
            log.push(entry(&ctx));
            then(ctx)
        }
    }
}

/// Tracks how many things run at once and the most seen.
#[derive(Clone, Default, Debug)]
pub struct Gauge {
    now: Counter,
    max: Arc<AtomicUsize>,
}

impl Gauge {
    /// Enters; returns the current count.
    pub fn enter(&self) -> usize {
        let n = self.now.incr();
        self.max.fetch_max(n, Ordering::SeqCst);
        n
    }

    /// Leaves.
    pub fn exit(&self) {
        self.now.decr();
    }

    /// Running now.
    pub fn current(&self) -> usize {
        self.now.get()
    }

    /// The most that ran at once.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

/// Polls `condition` every 10 ms until it is true; panics with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`] with an async condition.
pub async fn wait_until_async<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes messages from `queue` until `count` have arrived; panics after `timeout`.
pub async fn take_queue<F: TransportFixture>(
    fixture: &F,
    transport: &F::Transport,
    queue: &str,
    count: usize,
    timeout: Duration,
) -> Vec<TransportMessage> {
    take_from(fixture.name(), transport, queue, count, timeout).await
}

/// Takes messages from `queue` through `admin` until `count` have arrived; panics naming
/// `service` after `timeout`.
pub async fn take_from(
    service: &str,
    admin: &(impl QueueAdmin + ?Sized),
    queue: &str,
    count: usize,
    timeout: Duration,
) -> Vec<TransportMessage> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let taken = admin
            .take_messages(queue, 1000)
            .await
            .unwrap_or_else(|e| panic!("{service}: reading `{queue}` failed: {e}"));
        out.extend(taken);
        if out.len() >= count {
            return out;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{service}: expected {count} message(s) in `{queue}` within {timeout:?}, found {}",
                out.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages ready in `queue`, through the transport's [`QueueAdmin`]; panics naming the
/// queue when the broker cannot say.
pub async fn depth<F: TransportFixture>(
    fixture: &F,
    transport: &F::Transport,
    queue: &str,
) -> usize {
    let n = transport
        .queue_depth(queue)
        .await
        .unwrap_or_else(|e| panic!("{}: the depth of `{queue}` is unknown: {e}", fixture.name()));
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A header as text, or a panic naming the missing header.
pub fn header(message: &TransportMessage, name: &str) -> String {
    message
        .headers
        .get_str(name)
        .unwrap_or_else(|| panic!("header `{name}` missing; headers: {:?}", message.headers))
        .into_owned()
}

/// A TCP proxy on 127.0.0.1 in front of a service, that a test can switch off (dropping
/// every open connection and refusing new ones) and on again: a broker outage for this
/// client only, without stopping the shared broker.
#[derive(Debug, Clone)]
pub struct ToggleProxy {
    port: u16,
    state: Arc<ProxyState>,
}

#[derive(Debug)]
struct ProxyState {
    up: std::sync::atomic::AtomicBool,
    generation: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl ToggleProxy {
    /// Starts a proxy to `target` (`host:port`) on a free local port.
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let port = listener.local_addr().expect("local address").port();
        let state = Arc::new(ProxyState {
            up: std::sync::atomic::AtomicBool::new(true),
            generation: AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
        });
        let target = target.to_string();
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !s.up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let s = s.clone();
                let generation = s.generation.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pipe = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    let cut = async {
                        loop {
                            let notified = s.changed.notified();
                            if s.generation.load(Ordering::SeqCst) != generation {
                                return;
                            }
                            notified.await;
                        }
                    };
                    tokio::select! {
                        _ = pipe => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Self { port, state }
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.changed.notify_waiters();
    }

    /// Accepts connections again.
    pub fn up(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }
}
