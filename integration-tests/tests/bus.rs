//! Bus features beyond the transport conformance suite, on the in-memory transport:
//! registration, endpoint naming, layers, concurrency, topology, addresses, lifecycle and the
//! test harness.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use busway::prelude::*;
use busway::testing::TestHarness;
use busway::transport::MoveKind;
use busway::{ConsumeErrorKind, OutgoingMessage, ReceiveContext, Transport, TransportMessage};
use busway_integration_tests::support::{Counter, Gauge, init_tracing, wait_until};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct OrderPlaced {
    n: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct OrderCancelled {
    n: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct Work {
    n: u32,
}

struct SubmitOrderConsumer(Counter);

impl Consumer<OrderPlaced> for SubmitOrderConsumer {
    async fn consume(&self, _: &ConsumeContext<OrderPlaced>) -> Result<(), ConsumeError> {
        self.0.incr();
        Ok(())
    }
}

/// One consumer type for two message types.
struct OrderHistory(Arc<Mutex<Vec<String>>>);

impl Consumer<OrderPlaced> for OrderHistory {
    async fn consume(&self, ctx: &ConsumeContext<OrderPlaced>) -> Result<(), ConsumeError> {
        self.0
            .lock()
            .expect("lock")
            .push(format!("placed {}", ctx.message().n));
        Ok(())
    }
}

impl Consumer<OrderCancelled> for OrderHistory {
    async fn consume(&self, ctx: &ConsumeContext<OrderCancelled>) -> Result<(), ConsumeError> {
        self.0
            .lock()
            .expect("lock")
            .push(format!("cancelled {}", ctx.message().n));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_get_kebab_case_endpoints_and_multi_type_consumers_get_both_types() {
    init_tracing();
    let placed = Counter::default();
    let history = Arc::new(Mutex::new(Vec::new()));
    let h = TestHarness::start(
        Bus::builder()
            .consumer(SubmitOrderConsumer(placed.clone()))
            .consumer_for::<(OrderPlaced, OrderCancelled)>(OrderHistory(history.clone())),
    )
    .await
    .expect("start");
    let names: Vec<&str> = h
        .bus()
        .topology()
        .endpoints
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, vec!["submit-order", "order-history"]);
    let history_endpoint = h
        .bus()
        .topology()
        .endpoint("order-history")
        .expect("endpoint");
    assert_eq!(history_endpoint.message_types.len(), 2);

    h.bus()
        .publish(OrderPlaced { n: 1 })
        .await
        .expect("publish");
    h.bus()
        .publish(OrderCancelled { n: 1 })
        .await
        .expect("publish");
    wait_until(WAIT, "both types consumed", || {
        history.lock().expect("lock").len() == 2
    })
    .await;
    wait_until(WAIT, "submit-order consumed", || placed.get() == 1).await;
    let mut seen = history.lock().expect("lock").clone();
    seen.sort();
    assert_eq!(seen, vec!["cancelled 1", "placed 1"]);
    h.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_consumers_on_one_endpoint_and_retry_does_not_rerun_the_ones_that_succeeded() {
    init_tracing();
    let ok_runs = Counter::default();
    let flaky_runs = Counter::default();
    let (o, f) = (ok_runs.clone(), flaky_runs.clone());
    let h = TestHarness::start(Bus::builder().receive_endpoint("orders", move |e| {
        e.retry(Retry::immediate(3))
            .handler(move |_: ConsumeContext<OrderPlaced>| {
                let o = o.clone();
                async move {
                    o.incr();
                    Ok(())
                }
            })
            .handler(move |_: ConsumeContext<OrderPlaced>| {
                let f = f.clone();
                async move {
                    if f.incr() < 3 {
                        return Err(ConsumeError::msg("flaky"));
                    }
                    Ok(())
                }
            })
    }))
    .await
    .expect("start");
    h.bus()
        .publish(OrderPlaced { n: 1 })
        .await
        .expect("publish");
    wait_until(WAIT, "the flaky consumer succeeded", || {
        flaky_runs.get() == 3
    })
    .await;
    h.wait_idle(Duration::from_millis(100)).await;
    assert_eq!(ok_runs.get(), 1, "the consumer that succeeded ran once");
    assert_eq!(
        h.consumed::<OrderPlaced>().len(),
        2,
        "two successful consumes"
    );
    assert_eq!(h.faulted::<OrderPlaced>().len(), 2, "two failed attempts");
    assert_eq!(h.transport().queue_len("orders_error"), 0);
    h.stop().await.expect("stop");
}

/// A tower layer that records its name when called.
#[derive(Clone)]
struct Mark {
    name: &'static str,
    log: Arc<Mutex<Vec<&'static str>>>,
}

impl<S> tower::Layer<S> for Mark {
    type Service = MarkService<S>;
    fn layer(&self, inner: S) -> MarkService<S> {
        MarkService {
            inner,
            mark: self.clone(),
        }
    }
}

#[derive(Clone)]
struct MarkService<S> {
    inner: S,
    mark: Mark,
}

impl<S> tower::Service<ReceiveContext> for MarkService<S>
where
    S: tower::Service<ReceiveContext, Response = (), Error = ConsumeError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = ConsumeError;
    type Future = BoxFuture<'static, Result<(), ConsumeError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConsumeError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, rc: ReceiveContext) -> Self::Future {
        self.mark.log.lock().expect("lock").push(self.mark.name);
        Box::pin(self.inner.call(rc))
    }
}

/// A send layer that stamps a header on every outgoing message.
#[derive(Clone)]
struct Stamp;

impl<S> tower::Layer<S> for Stamp {
    type Service = StampService<S>;
    fn layer(&self, inner: S) -> StampService<S> {
        StampService(inner)
    }
}

#[derive(Clone)]
struct StampService<S>(S);

impl<S> tower::Service<OutgoingMessage> for StampService<S>
where
    S: tower::Service<OutgoingMessage, Response = (), Error = busway::Error>,
{
    type Response = ();
    type Error = busway::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), busway::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut m: OutgoingMessage) -> Self::Future {
        m.envelope.headers.insert("X-Stamped", "yes");
        self.0.call(m)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_layers_run_at_bus_endpoint_and_consumer_level_in_order() {
    init_tracing();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stamped = Arc::new(Mutex::new(None::<String>));
    let mark = |name| Mark {
        name,
        log: log.clone(),
    };
    let s = stamped.clone();
    struct Stamped(Arc<Mutex<Option<String>>>);
    impl Consumer<Work> for Stamped {
        async fn consume(&self, ctx: &ConsumeContext<Work>) -> Result<(), ConsumeError> {
            *self.0.lock().expect("lock") =
                ctx.headers().get_str("X-Stamped").map(|s| s.into_owned());
            Ok(())
        }
    }
    let h = TestHarness::start(
        Bus::builder()
            .layer(mark("bus"))
            .send_layer(Stamp)
            .receive_endpoint("layered", |e| {
                e.layer(mark("endpoint-1"))
                    .layer(mark("endpoint-2"))
                    .consumer_with(Stamped(s), |c| c.layer(mark("consumer")))
            }),
    )
    .await
    .expect("start");
    h.bus()
        .send("queue:layered", Work { n: 1 })
        .await
        .expect("send");
    h.wait_consumed::<Work>(|w| w.n == 1)
        .await
        .expect("consumed");
    assert_eq!(
        *log.lock().expect("lock"),
        vec!["bus", "endpoint-1", "endpoint-2", "consumer"]
    );
    assert_eq!(
        stamped.lock().expect("lock").as_deref(),
        Some("yes"),
        "send layers change outgoing messages"
    );
    h.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_hold_at_endpoint_and_consumer_level() {
    init_tracing();
    let endpoint_gauge = Gauge::default();
    let consumer_gauge = Gauge::default();
    let done = Counter::default();
    let (eg, cg, d1, d2) = (
        endpoint_gauge.clone(),
        consumer_gauge.clone(),
        done.clone(),
        done.clone(),
    );
    struct Slow(Gauge, Counter);
    impl Consumer<OrderCancelled> for Slow {
        async fn consume(&self, _: &ConsumeContext<OrderCancelled>) -> Result<(), ConsumeError> {
            self.0.enter();
            tokio::time::sleep(Duration::from_millis(30)).await;
            self.0.exit();
            self.1.incr();
            Ok(())
        }
    }
    let h = TestHarness::start(
        Bus::builder()
            .receive_endpoint("limited", move |e| {
                e.prefetch(16)
                    .concurrency_limit(2)
                    .handler(move |_: ConsumeContext<Work>| {
                        let (eg, d1) = (eg.clone(), d1.clone());
                        async move {
                            eg.enter();
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            eg.exit();
                            d1.incr();
                            Ok(())
                        }
                    })
            })
            .receive_endpoint("consumer-limited", move |e| {
                e.prefetch(16)
                    .consumer_with(Slow(cg, d2), |c| c.concurrency_limit(3))
            }),
    )
    .await
    .expect("start");
    for n in 0..12 {
        h.bus()
            .send("queue:limited", Work { n })
            .await
            .expect("send");
        h.bus()
            .send("queue:consumer-limited", OrderCancelled { n })
            .await
            .expect("send");
    }
    wait_until(WAIT, "all consumed", || done.get() == 24).await;
    assert_eq!(endpoint_gauge.max(), 2, "endpoint concurrency limit");
    assert_eq!(consumer_gauge.max(), 3, "consumer concurrency limit");
    h.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_prints_as_text_and_mermaid() {
    let bus = Bus::builder()
        .consumer(SubmitOrderConsumer(Counter::default()))
        .receive_endpoint("billing", |e| {
            e.prefetch(32)
                .concurrency_limit(8)
                .handler(|_: ConsumeContext<Work>| async { Ok(()) })
        })
        .build()
        .await
        .expect("build");
    let text = bus.topology_text();
    assert!(
        text.contains("endpoint billing (loopback://localhost/billing)"),
        "{text}"
    );
    assert!(text.contains("prefetch 32, concurrency 8"), "{text}");
    // The view is in the in-memory transport's own terms: MassTransit's exchanges and queues.
    let view = text;
    assert!(view.contains("  reads queue billing\n"), "{view}");
    assert!(
        view.contains(&format!(
            "  {} <- exchange {}\n",
            OrderPlaced::message_type(),
            OrderPlaced::message_type().entity_name(&busway::inmemory::ENTITY_NAMES)
        )),
        "{view}"
    );
    assert!(
        view.contains("  faults -> queue billing_error, skipped -> queue billing_skipped\n"),
        "{view}"
    );
    let mermaid = bus.topology_mermaid();
    assert!(
        mermaid.contains("n_queue_billing[(\"queue billing\")]")
            && mermaid.contains("n_queue_billing -. fault .-> n_queue_billing_error"),
        "{mermaid}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_short_forms_and_uris() {
    init_tracing();
    let transport = InMemory::new();
    let h = TestHarness::start_on(
        Bus::builder().receive_endpoint("inbox", |e| {
            e.handler(|_: ConsumeContext<Work>| async { Ok(()) })
        }),
        transport.clone(),
    )
    .await
    .expect("start");
    h.bus()
        .send("loopback://localhost/inbox", Work { n: 1 })
        .await
        .expect("uri send");
    h.bus()
        .send("exchange:inbox", Work { n: 2 })
        .await
        .expect("exchange send");
    h.bus()
        .send("queue:inbox", Work { n: 3 })
        .await
        .expect("queue send");
    for n in 1..=3 {
        h.wait_consumed::<Work>(move |w| w.n == n)
            .await
            .expect("consumed");
    }
    let sent = h.sent::<Work>();
    assert_eq!(sent.len(), 3);
    assert!(
        sent.iter().all(
            |s| s.envelope.destination_address.as_deref() == Some("loopback://localhost/inbox")
        )
    );

    let err = h
        .bus()
        .send("inbox", Work { n: 4 })
        .await
        .expect_err("no kind");
    assert!(err.is_address(), "{err}");
    let err = h
        .bus()
        .send("rabbitmq://host/inbox", Work { n: 5 })
        .await
        .expect_err("wrong scheme");
    assert!(err.is_address(), "{err}");
    assert!(err.to_string().contains("scheme `rabbitmq`"), "{err}");
    h.stop().await.expect("stop");
    assert!(transport.has_binding("inbox", "inbox"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_before_start_wait_for_the_consumers() {
    init_tracing();
    let count = Counter::default();
    let bus = Bus::builder()
        .consumer(SubmitOrderConsumer(count.clone()))
        .build()
        .await
        .expect("build");
    bus.publish(OrderPlaced { n: 1 })
        .await
        .expect("publish before start");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(count.get(), 0);
    let running = bus.start().await.expect("start");
    wait_until(WAIT, "consumed after start", || count.get() == 1).await;
    let err = bus.start().await.expect_err("second start");
    assert!(err.is_config(), "{err}");
    running.shutdown().await.expect("shutdown");
}

/// A transport without delayed delivery (wraps the in-memory one and hides it).
#[derive(Debug, Clone)]
struct NoDelay(InMemory);

#[busway::async_trait]
impl Transport for NoDelay {
    fn profile(&self) -> busway::transport::TransportProfile {
        busway::transport::TransportProfile::new("no-delay")
    }
    fn endpoint_address(&self, name: &str) -> String {
        self.0.endpoint_address(name)
    }
    async fn deploy(&self, t: &busway::Topology) -> busway::Result<()> {
        self.0.deploy(t).await
    }
    async fn publish(
        &self,
        types: &[busway::Urn],
        m: TransportMessage,
        o: &busway::transport::DeliveryOptions,
    ) -> busway::Result<()> {
        self.0.publish(types, m, o).await
    }
    async fn send(
        &self,
        a: &busway::Address,
        m: TransportMessage,
        o: &busway::transport::DeliveryOptions,
    ) -> busway::Result<()> {
        self.0.send(a, m, o).await
    }
    async fn receive(
        &self,
        e: &busway::topology::EndpointTopology,
    ) -> busway::Result<Box<dyn busway::transport::Receiver>> {
        self.0.receive(e).await
    }
    async fn close(&self) -> busway::Result<()> {
        self.0.close().await
    }
}

#[tokio::test]
async fn configuration_mistakes_are_reported_at_build() {
    let err = Bus::builder()
        .transport(NoDelay(InMemory::new()))
        .receive_endpoint("x", |e| {
            e.redelivery(Retry::intervals([Duration::from_secs(1)]))
                .handler(|_: ConsumeContext<Work>| async { Ok(()) })
        })
        .build()
        .await
        .expect_err("redelivery needs delayed delivery");
    assert!(err.is_config());
    assert!(
        err.to_string()
            .contains("no-delay transport has no delayed delivery"),
        "{err}"
    );

    let err = Bus::builder()
        .receive_endpoint("dup", |e| e)
        .receive_endpoint("dup", |e| e)
        .build()
        .await
        .expect_err("duplicate endpoint");
    assert!(err.to_string().contains("configured twice"), "{err}");

    // An endpoint nobody consumes on would take messages off its queue and skip them all.
    let err = Bus::builder()
        .receive_endpoint("forgotten", |e| e.prefetch(4))
        .build()
        .await
        .expect_err("an endpoint without consumers");
    assert!(err.is_config());
    assert!(
        err.to_string()
            .contains("the endpoint `forgotten` has no consumers"),
        "{err}"
    );

    let err = TestHarness::start(Bus::builder().transport(InMemory::new()))
        .await
        .expect_err("the harness picks the transport");
    assert!(err.is_config());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_waits_for_published_sent_consumed_faulted_and_moved() {
    init_tracing();
    let h = TestHarness::start(Bus::builder().receive_endpoint("picky", |e| {
        e.handler(|ctx: ConsumeContext<Work>| async move {
            if ctx.message().n % 2 == 1 {
                return Err(ConsumeError::msg("odd numbers are refused"));
            }
            ctx.publish(OrderPlaced { n: ctx.message().n }).await?;
            Ok(())
        })
    }))
    .await
    .expect("start")
    .with_timeout(Duration::from_secs(5));
    h.bus()
        .send("queue:picky", Work { n: 2 })
        .await
        .expect("send");
    h.bus()
        .send("queue:picky", Work { n: 3 })
        .await
        .expect("send");
    let sent = h.wait_sent::<Work>(|w| w.n == 2).await.expect("sent");
    assert!(sent.envelope.message_id.is_some());
    let consumed = h
        .wait_consumed::<Work>(|w| w.n == 2)
        .await
        .expect("consumed");
    assert_eq!(consumed.endpoint.as_deref(), Some("picky"));
    let published = h
        .wait_published::<OrderPlaced>(|o| o.n == 2)
        .await
        .expect("published");
    assert_eq!(
        published.envelope.conversation_id,
        consumed.envelope.conversation_id
    );
    let faulted = h.wait_faulted::<Work>(|w| w.n == 3).await.expect("faulted");
    assert_eq!(faulted.error.as_deref(), Some("odd numbers are refused"));
    let (moved, reason) = h.wait_moved("picky", MoveKind::Error).await.expect("moved");
    assert_eq!(reason, "odd numbers are refused");
    assert_eq!(moved.headers.get_str("MT-Reason").as_deref(), Some("fault"));

    let quick = h.with_timeout(Duration::from_millis(200));
    let err = quick
        .wait_consumed::<Work>(|w| w.n == 99)
        .await
        .expect_err("never consumed");
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("no matching"), "{err}");
    quick.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_filters_pick_errors_by_kind_and_type() {
    init_tracing();
    #[derive(Debug)]
    struct Permanent;
    impl std::fmt::Display for Permanent {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("permanent")
        }
    }
    impl std::error::Error for Permanent {}

    let attempts = Counter::default();
    let a = attempts.clone();
    let h = TestHarness::start(Bus::builder().receive_endpoint("filtered", move |e| {
        e.retry(Retry::immediate(5).ignore_error::<Permanent>())
            .handler(move |ctx: ConsumeContext<Work>| {
                let a = a.clone();
                async move {
                    a.incr();
                    if ctx.message().n == 1 {
                        return Err(Permanent.into());
                    }
                    Err(ConsumeError::msg("transient"))
                }
            })
    }))
    .await
    .expect("start");
    h.bus()
        .send("queue:filtered", Work { n: 1 })
        .await
        .expect("send");
    h.wait_moved("filtered", MoveKind::Error)
        .await
        .expect("moved");
    assert_eq!(attempts.get(), 1, "an ignored error is not retried");
    h.bus()
        .send("queue:filtered", Work { n: 2 })
        .await
        .expect("send");
    wait_until(WAIT, "second message faulted", || {
        h.transport().queue_len("filtered_error") == 2
    })
    .await;
    assert_eq!(attempts.get(), 1 + 6, "a handled error is retried 5 times");
    h.stop().await.expect("stop");

    let r = Retry::exponential(4)
        .min_interval(Duration::from_millis(100))
        .max_interval(Duration::from_millis(250))
        .jitter(false);
    let delays: Vec<_> = (1..=5).map(|i| r.delay_for(i)).collect();
    assert_eq!(
        delays,
        vec![
            Some(Duration::from_millis(100)),
            Some(Duration::from_millis(200)),
            Some(Duration::from_millis(250)),
            Some(Duration::from_millis(250)),
            None
        ]
    );
    let jittered = Retry::exponential(3).min_interval(Duration::from_millis(100));
    for _ in 0..50 {
        let d = jittered.delay_for(2).expect("delay");
        assert!(
            d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
            "{d:?}"
        );
    }
    let inc = Retry::incremental(3, Duration::from_millis(10), Duration::from_millis(5));
    assert_eq!(inc.delay_for(3), Some(Duration::from_millis(20)));
    assert!(!Retry::immediate(2).should_retry(&ConsumeError::with_kind(
        ConsumeErrorKind::Deserialize,
        "x",
        "bad body"
    )));
    assert!(
        Retry::immediate(2)
            .handle(ConsumeErrorKind::Timeout)
            .should_retry(&ConsumeError::timeout(Duration::from_secs(1)))
    );
    assert!(
        !Retry::immediate(2)
            .handle(ConsumeErrorKind::Timeout)
            .should_retry(&ConsumeError::msg("other"))
    );
    assert_eq!(Retry::none().delay_for(1), None);
}

/// Records every span's name and fields.
type SpanFields = std::collections::HashMap<String, String>;

#[derive(Clone, Default)]
struct SpanRecorder(Arc<Mutex<Vec<(String, SpanFields)>>>);

struct FieldVisitor<'a>(&'a mut std::collections::HashMap<String, String>);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanRecorder {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = std::collections::HashMap::new();
        attrs.record(&mut FieldVisitor(&mut fields));
        self.0
            .lock()
            .expect("lock")
            .push((attrs.metadata().name().to_string(), fields));
    }
}

#[test]
fn spans_carry_opentelemetry_messaging_attributes() {
    use tracing_subscriber::layer::SubscriberExt;
    let recorder = SpanRecorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let h = TestHarness::start(Bus::builder().receive_endpoint("traced", |e| {
            e.handler(|ctx: ConsumeContext<Work>| async move {
                ctx.publish(OrderPlaced { n: ctx.message().n }).await?;
                Ok(())
            })
        }))
        .await
        .expect("start");
        h.bus()
            .send("queue:traced", Work { n: 1 })
            .await
            .expect("send");
        h.wait_published::<OrderPlaced>(|o| o.n == 1)
            .await
            .expect("published");
        h.stop().await.expect("stop");
    });
    let spans = recorder.0.lock().expect("lock").clone();
    let find = |name: &str, op: &str| {
        spans
            .iter()
            .find(|(n, f)| {
                n == name && f.get("messaging.operation").map(String::as_str) == Some(op)
            })
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no {name} span with operation {op}: {spans:?}"))
    };
    let send = find("send", "send");
    let consume = find("consume", "process");
    let publish = find("send", "publish");
    assert_eq!(send["messaging.system"], "loopback");
    assert_eq!(send["messaging.destination.name"], "queue:traced");
    assert_eq!(send["otel.kind"], "producer");
    assert!(!send["messaging.message.id"].is_empty());
    assert_eq!(consume["messaging.system"], "loopback");
    assert_eq!(consume["messaging.destination.name"], "traced");
    assert_eq!(consume["otel.kind"], "consumer");
    assert_eq!(
        consume["messaging.message.id"], send["messaging.message.id"],
        "the consume span names the sent message"
    );
    assert_eq!(
        consume["trace_id"], send["trace_id"],
        "one trace from send to consume"
    );
    assert_eq!(
        consume["parent_span_id"], send["span_id"],
        "the consume span's parent is the producer span"
    );
    assert_eq!(
        publish["trace_id"], send["trace_id"],
        "a publish inside the consumer stays in the trace"
    );
    assert_eq!(publish["parent_span_id"], consume["span_id"]);
    assert_eq!(
        publish["messaging.destination.name"],
        OrderPlaced::message_type().as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_outbox_publishes_only_what_the_successful_attempt_published() {
    init_tracing();
    let attempts = Counter::default();
    let a = attempts.clone();
    let h = TestHarness::start(Bus::builder().receive_endpoint("held", move |e| {
        e.retry(Retry::immediate(2))
            .attempt_layer(busway::pipeline::InMemoryOutboxLayer)
            .handler(move |ctx: ConsumeContext<Work>| {
                let a = a.clone();
                async move {
                    let attempt = a.incr() as u32;
                    ctx.publish(OrderPlaced { n: attempt }).await?;
                    if attempt < 3 {
                        return Err(ConsumeError::msg("not yet"));
                    }
                    Ok(())
                }
            })
    }))
    .await
    .expect("start");
    h.bus()
        .send("queue:held", Work { n: 1 })
        .await
        .expect("send");
    h.wait_published::<OrderPlaced>(|o| o.n == 3)
        .await
        .expect("the last attempt's message");
    h.wait_idle(Duration::from_millis(200)).await;
    let published: Vec<u32> = h
        .published::<OrderPlaced>()
        .iter()
        .map(|o| o.message.n)
        .collect();
    assert_eq!(
        published,
        vec![3],
        "messages of failed attempts were discarded"
    );
    assert_eq!(attempts.get(), 3);
    h.stop().await.expect("stop");
}
