//! The conformance tests. Each is an `async fn` taking a fixture; [`crate::conformance_suite!`]
//! turns them into `#[tokio::test]`s for one transport.
//!
//! Every test uses its own message types and uniquely named endpoints, so the tests can run in
//! parallel on one broker without seeing each other's messages.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway::headers::names;
use busway::{
    Address, Bus, BusBuilder, ConsumeContext, ConsumeError, Envelope, Fault, Message, Retry,
    Transport, TransportMessage,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::TransportFixture;
use crate::support::{Counter, Gauge, header, init_tracing, take_queue, unique, wait_until};

const WAIT: Duration = Duration::from_secs(20);

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("Test contract `", stringify!($name), "`.")]
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// A number.
            pub n: u64,
        }
    )*};
}

contract!(
    FanOut,
    Competing,
    Prefetched,
    Retried,
    RetriedThenOk,
    Redelivered,
    RedeliveredExhausted,
    Faulty,
    Handled,
    NotHandled,
    Panicky,
    FaultSource,
    Slow,
    TimedOut,
    Draining,
    Stuck,
    ChainA,
    ChainB,
    ChainC,
    Traced,
    TracedNext,
    Question,
    Answer,
    FailingQuestion,
    Unanswered,
    Scheduled,
);

async fn build<F: TransportFixture>(t: &F::Transport, builder: BusBuilder) -> Bus {
    builder
        .transport(t.clone())
        .build()
        .await
        .expect("the bus builds and deploys its topology")
}

/// Deletes each endpoint's queue and its `_error` and `_skipped` queues.
async fn cleanup<F: TransportFixture>(fixture: &F, t: &F::Transport, endpoints: &[&String]) {
    let mut queues = Vec::new();
    for e in endpoints {
        queues.push((*e).clone());
        queues.push(format!("{e}_error"));
        queues.push(format!("{e}_skipped"));
    }
    fixture.delete_queues(t, &queues).await;
}

/// A handler that counts the messages it consumes.
fn counting<M: Message>(
    counter: &Counter,
) -> impl Fn(ConsumeContext<M>) -> std::future::Ready<Result<(), ConsumeError>> + Send + Sync + 'static
{
    let counter = counter.clone();
    move |_| {
        counter.incr();
        std::future::ready(Ok(()))
    }
}

/// Publishing reaches every endpoint that consumes the type, once each.
pub async fn fan_out_to_every_endpoint<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let counters: Vec<Counter> = (0..3).map(|_| Counter::default()).collect();
    let names: Vec<String> = (0..3).map(|i| unique(&format!("fan-out-{i}"))).collect();
    let mut builder = Bus::builder();
    for (name, counter) in names.iter().zip(&counters) {
        let counter = counter.clone();
        builder = builder.receive_endpoint(name.clone(), move |e| {
            e.temporary().handler(counting::<FanOut>(&counter))
        });
    }
    let bus = build::<F>(&t, builder).await;
    let running = bus.start().await.expect("start");
    for n in 0..10 {
        bus.publish(FanOut { n }).await.expect("publish");
    }
    wait_until(WAIT, "each endpoint consumed 10", || {
        counters.iter().all(|c| c.get() >= 10)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for c in &counters {
        assert_eq!(
            c.get(),
            10,
            "each endpoint gets each published message exactly once"
        );
    }
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &names.iter().collect::<Vec<_>>()).await;
}

/// Two buses on one endpoint compete: each message is consumed once, by one of them.
pub async fn competing_consumers_each_message_once<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("competing");
    let seen = Arc::new(Mutex::new(Vec::<(usize, u64)>::new()));
    let mut buses = Vec::new();
    let mut running = Vec::new();
    for instance in 0..2 {
        let seen = seen.clone();
        let bus = build::<F>(
            &t,
            Bus::builder().receive_endpoint(name.clone(), move |e| {
                e.prefetch(1)
                    .handler(move |ctx: ConsumeContext<Competing>| {
                        let seen = seen.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            seen.lock().expect("lock").push((instance, ctx.message().n));
                            Ok(())
                        }
                    })
            }),
        )
        .await;
        running.push(bus.start().await.expect("start"));
        buses.push(bus);
    }
    for n in 0..60 {
        buses[0]
            .send(format!("queue:{name}"), Competing { n })
            .await
            .expect("send");
    }
    wait_until(WAIT, "60 messages consumed", || {
        seen.lock().expect("lock").len() >= 60
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 60, "every message consumed exactly once");
    let mut ns: Vec<u64> = seen.iter().map(|(_, n)| *n).collect();
    ns.sort_unstable();
    ns.dedup();
    assert_eq!(ns.len(), 60, "no message consumed twice");
    for instance in 0..2 {
        assert!(
            seen.iter().any(|(i, _)| *i == instance),
            "instance {instance} consumed nothing: consumers do not compete"
        );
    }
    for r in running {
        r.shutdown().await.expect("shutdown");
    }
    cleanup(fixture, &t, &[&name]).await;
}

/// An endpoint never holds more than `prefetch` unsettled messages, even when its
/// concurrency limit is higher.
pub async fn prefetch_bound_is_respected<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("prefetch");
    let gauge = Gauge::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let done = Counter::default();
    let (g, r, d) = (gauge.clone(), release.clone(), done.clone());
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| {
            e.prefetch(4)
                .concurrency_limit(32)
                .handler(move |_: ConsumeContext<Prefetched>| {
                    let (g, r, d) = (g.clone(), r.clone(), d.clone());
                    async move {
                        g.enter();
                        r.notified().await;
                        g.exit();
                        d.incr();
                        Ok(())
                    }
                })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    for n in 0..20 {
        bus.send(format!("queue:{name}"), Prefetched { n })
            .await
            .expect("send");
    }
    wait_until(WAIT, "4 messages in flight", || gauge.current() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gauge.max(), 4, "at most `prefetch` messages in flight");
    while done.get() < 20 {
        release.notify_waiters();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(gauge.max(), 4, "the bound held to the end");
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&name]).await;
}

/// `Retry::immediate(3)` makes exactly 4 attempts, then the message faults with
/// `MT-Fault-RetryCount: 3`; a consumer that recovers is retried until it succeeds.
pub async fn retry_counts_are_exact<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let failing = unique("retry");
    let recovering = unique("retry-ok");
    let attempts = Counter::default();
    let recovered = Counter::default();
    let ok = Counter::default();
    let (a, r, o) = (attempts.clone(), recovered.clone(), ok.clone());
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(failing.clone(), move |e| {
                e.retry(Retry::immediate(3))
                    .handler(move |_: ConsumeContext<Retried>| {
                        let a = a.clone();
                        async move {
                            a.incr();
                            Err(ConsumeError::msg("always fails"))
                        }
                    })
            })
            .receive_endpoint(recovering.clone(), move |e| {
                e.retry(Retry::interval(5, Duration::from_millis(10)))
                    .handler(move |ctx: ConsumeContext<RetriedThenOk>| {
                        let (r, o) = (r.clone(), o.clone());
                        async move {
                            if r.incr() < 3 {
                                return Err(ConsumeError::msg("not yet"));
                            }
                            assert_eq!(ctx.retry_attempt(), 2, "the third attempt is retry 2");
                            o.incr();
                            Ok(())
                        }
                    })
            }),
    )
    .await;
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{failing}"), Retried { n: 1 })
        .await
        .expect("send");
    bus.send(format!("queue:{recovering}"), RetriedThenOk { n: 1 })
        .await
        .expect("send");
    let errors = take_queue(fixture, &t, &format!("{failing}_error"), 1, WAIT).await;
    assert_eq!(attempts.get(), 4, "1 attempt + 3 retries");
    assert_eq!(header(&errors[0], names::FAULT_RETRY_COUNT), "3");
    wait_until(WAIT, "the recovering consumer succeeded", || ok.get() == 1).await;
    assert_eq!(recovered.get(), 3);
    running.shutdown().await.expect("shutdown");
    assert_eq!(
        fixture
            .queue_depth(&t, &format!("{recovering}_error"))
            .await,
        0,
        "a recovered message does not fault"
    );
    cleanup(fixture, &t, &[&failing, &recovering]).await;
}

/// Delayed redelivery sends the message back after each interval with
/// `MT-Redelivery-Count` incremented; when the intervals run out it faults.
pub async fn delayed_redelivery<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    if !t.profile().capabilities.delayed_delivery {
        // A transport without delayed delivery must refuse the configuration up front.
        let err = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(unique("redeliver"), |e| {
                e.redelivery(Retry::intervals([Duration::from_millis(200)]))
                    .handler(|_: ConsumeContext<Redelivered>| async { Ok(()) })
            })
            .build()
            .await
            .expect_err("delayed redelivery needs delayed delivery");
        assert!(err.is_config(), "{err}");
        assert!(err.to_string().contains("no delayed delivery"), "{err}");
        return;
    }
    let name = unique("redeliver");
    let exhausted = unique("redeliver-x");
    let seen_counts = Arc::new(Mutex::new(Vec::<u32>::new()));
    let attempts_x = Counter::default();
    let s = seen_counts.clone();
    let ax = attempts_x.clone();
    let started = std::time::Instant::now();
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(name.clone(), move |e| {
                e.redelivery(Retry::intervals([
                    Duration::from_millis(200),
                    Duration::from_millis(200),
                ]))
                .handler(move |ctx: ConsumeContext<Redelivered>| {
                    let s = s.clone();
                    async move {
                        let count = ctx.redelivery_count();
                        s.lock().expect("lock").push(count);
                        if count < 2 {
                            return Err(ConsumeError::msg("try again later"));
                        }
                        Ok(())
                    }
                })
            })
            .receive_endpoint(exhausted.clone(), move |e| {
                e.redelivery(Retry::intervals([Duration::from_millis(50)]))
                    .retry(Retry::immediate(1))
                    .handler(move |_: ConsumeContext<RedeliveredExhausted>| {
                        let ax = ax.clone();
                        async move {
                            ax.incr();
                            Err(ConsumeError::msg("never works"))
                        }
                    })
            }),
    )
    .await;
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{name}"), Redelivered { n: 1 })
        .await
        .expect("send");
    bus.send(format!("queue:{exhausted}"), RedeliveredExhausted { n: 1 })
        .await
        .expect("send");
    wait_until(WAIT, "the third delivery", || {
        seen_counts.lock().expect("lock").len() >= 3
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "two redeliveries waited their intervals"
    );
    assert_eq!(*seen_counts.lock().expect("lock"), vec![0, 1, 2]);
    let errors = take_queue(fixture, &t, &format!("{exhausted}_error"), 1, WAIT).await;
    assert_eq!(attempts_x.get(), 4, "(1 + 1 retry) × (1 + 1 redelivery)");
    assert_eq!(header(&errors[0], names::REDELIVERY_COUNT), "1");
    assert_eq!(header(&errors[0], names::FAULT_REDELIVERY_COUNT), "1");
    assert_eq!(header(&errors[0], names::FAULT_RETRY_COUNT), "1");
    running.shutdown().await.expect("shutdown");
    assert_eq!(fixture.queue_depth(&t, &format!("{name}_error")).await, 0);
    cleanup(fixture, &t, &[&name, &exhausted]).await;
}

#[derive(Debug)]
struct PaymentDeclined;

impl std::fmt::Display for PaymentDeclined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the card was declined")
    }
}

impl std::error::Error for PaymentDeclined {}

/// A faulted message lands in `<endpoint>_error` with its original body and the
/// `MT-Reason`, `MT-Fault-*` and `MT-Host-*` headers.
pub async fn error_queue_has_fault_headers<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("faulty");
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), |e| {
            e.handler(|_: ConsumeContext<Faulty>| async { Err(PaymentDeclined.into()) })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let id = Uuid::now_v7();
    bus.send(format!("queue:{name}"), Faulty { n: 42 })
        .message_id(id)
        .header("Tenant", "acme")
        .await
        .expect("send");
    let errors = take_queue(fixture, &t, &format!("{name}_error"), 1, WAIT).await;
    let m = &errors[0];
    assert_eq!(header(m, names::REASON), "fault");
    assert!(header(m, names::FAULT_EXCEPTION_TYPE).ends_with("PaymentDeclined"));
    assert_eq!(header(m, names::FAULT_MESSAGE), "the card was declined");
    assert_eq!(
        header(m, names::FAULT_INPUT_ADDRESS),
        t.endpoint_address(&name)
    );
    assert!(header(m, names::FAULT_STACK_TRACE).contains("declined"));
    assert!(header(m, names::FAULT_CONSUMER_TYPE).starts_with("handler<"));
    assert_eq!(
        header(m, names::FAULT_MESSAGE_TYPE),
        Faulty::message_type().as_str()
    );
    assert!(busway::envelope::parse_time(&header(m, names::FAULT_TIMESTAMP)).is_some());
    assert!(!header(m, names::HOST_MACHINE_NAME).is_empty());
    assert!(!header(m, names::HOST_PROCESS_ID).is_empty());
    assert_eq!(header(m, "Tenant"), "acme");
    assert!(
        !m.headers.contains(names::FAULT_RETRY_COUNT),
        "no retry count without retries"
    );
    let original: serde_json::Value =
        serde_json::from_slice(&m.body).expect("the original body is JSON");
    let message = match original.get("messageType") {
        Some(_) => &original["message"],
        None => &original,
    };
    assert_eq!(message["n"], 42, "the original body is kept");
    let id_on_wire = original
        .get("messageId")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| m.headers.get_str(names::MESSAGE_ID).map(|v| v.into_owned()));
    assert_eq!(id_on_wire, Some(id.to_string()));
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&name]).await;
}

/// A message of a type no consumer at the endpoint handles goes to `<endpoint>_skipped`
/// with `MT-Reason: dead-letter`; the endpoint keeps consuming.
pub async fn unhandled_type_goes_to_skipped<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("skipping");
    let handled = Counter::default();
    let h = handled.clone();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| e.handler(counting::<Handled>(&h))),
    )
    .await;
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{name}"), NotHandled { n: 1 })
        .await
        .expect("send");
    bus.send(format!("queue:{name}"), Handled { n: 2 })
        .await
        .expect("send");
    let skipped = take_queue(fixture, &t, &format!("{name}_skipped"), 1, WAIT).await;
    assert_eq!(header(&skipped[0], names::REASON), "dead-letter");
    assert!(!header(&skipped[0], names::HOST_MACHINE_NAME).is_empty());
    let body: serde_json::Value = serde_json::from_slice(&skipped[0].body).expect("json");
    let skipped_type = body["messageType"][0]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            skipped[0]
                .headers
                .get_str(names::MESSAGE_TYPE)
                .map(|v| v.into_owned())
        });
    assert_eq!(
        skipped_type.as_deref(),
        Some(NotHandled::message_type().as_str())
    );
    wait_until(WAIT, "the handled message is consumed", || {
        handled.get() == 1
    })
    .await;
    running.shutdown().await.expect("shutdown");
    assert_eq!(fixture.queue_depth(&t, &format!("{name}_error")).await, 0);
    cleanup(fixture, &t, &[&name]).await;
}

fn raw(body: &'static [u8], content_type: Option<&str>) -> TransportMessage {
    let mut message = TransportMessage::new(bytes::Bytes::from_static(body))
        .with_message_id(Uuid::now_v7().to_string());
    message.content_type = content_type.map(str::to_string);
    message
}

/// Sends `body` as it is (no envelope written by busway) to `address`.
async fn send_raw(
    t: &impl Transport,
    address: &Address,
    body: &'static [u8],
    content_type: Option<&str>,
) {
    t.send(address, raw(body, content_type), &Default::default())
        .await
        .expect("raw send");
}

/// A MassTransit envelope cut short: not valid JSON.
const BROKEN_ENVELOPE: &[u8] = b"{\"messageId\": oops";

/// Malformed JSON, an unknown content type and a missing content type each end in
/// `<endpoint>_error` with a reason; the endpoint keeps consuming good messages.
pub async fn unreadable_messages_go_to_error<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("unreadable");
    let handled = Counter::default();
    let h = handled.clone();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| e.handler(counting::<Handled>(&h))),
    )
    .await;
    let running = bus.start().await.expect("start");
    let address = Address::queue(name.clone());
    let json = Some(busway::serializer::MASSTRANSIT_JSON);
    send_raw(&t, &address, BROKEN_ENVELOPE, json).await;
    send_raw(&t, &address, b"<order/>", Some("application/xml")).await;
    send_raw(&t, &address, b"{}", None).await;
    bus.send(format!("queue:{name}"), Handled { n: 1 })
        .await
        .expect("send");
    let errors = take_queue(fixture, &t, &format!("{name}_error"), 3, WAIT).await;
    let reasons: Vec<String> = errors
        .iter()
        .map(|m| header(m, names::FAULT_MESSAGE))
        .collect();
    for m in &errors {
        assert_eq!(header(m, names::REASON), "fault");
        assert_eq!(
            header(m, names::FAULT_EXCEPTION_TYPE),
            "busway::DeserializeError"
        );
    }
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("not a valid MassTransit JSON envelope")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("no deserializer for content type `application/xml`")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no content type")),
        "{reasons:?}"
    );
    assert!(
        errors.iter().any(|m| &m.body[..] == b"<order/>"),
        "bodies are kept as they were"
    );
    wait_until(WAIT, "the endpoint still consumes", || handled.get() == 1).await;
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&name]).await;
}

/// A body that is a valid envelope but not a valid message of the consumer's type faults
/// without retries (it would never parse).
pub async fn wrong_shape_is_not_retried<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("wrong-shape");
    let attempts = Counter::default();
    let a = attempts.clone();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| {
            e.retry(Retry::immediate(5))
                .handler(counting::<Handled>(&a))
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let body = format!(
        r#"{{"messageId":"{}","messageType":["{}"],"message":{{"n":"not a number"}}}}"#,
        Uuid::now_v7(),
        Handled::message_type()
    );
    let message = TransportMessage::new(body.into_bytes())
        .with_content_type(busway::serializer::MASSTRANSIT_JSON);
    t.send(&Address::queue(name.clone()), message, &Default::default())
        .await
        .expect("raw send");
    let errors = take_queue(fixture, &t, &format!("{name}_error"), 1, WAIT).await;
    assert_eq!(attempts.get(), 0, "the consumer never saw it");
    assert!(header(&errors[0], names::FAULT_MESSAGE).contains("not a valid"));
    assert!(
        !errors[0].headers.contains(names::FAULT_RETRY_COUNT),
        "not retried"
    );
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&name]).await;
}

/// A consumer that panics faults the message; the endpoint keeps running.
pub async fn panicking_consumer_faults_and_endpoint_survives<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("panicky");
    let ok = Counter::default();
    let o = ok.clone();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| {
            e.handler(move |ctx: ConsumeContext<Panicky>| {
                let o = o.clone();
                async move {
                    if ctx.message().n == 0 {
                        panic!("consumer bug");
                    }
                    o.incr();
                    Ok(())
                }
            })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{name}"), Panicky { n: 0 })
        .await
        .expect("send");
    for n in 1..=3 {
        bus.send(format!("queue:{name}"), Panicky { n })
            .await
            .expect("send");
    }
    let errors = take_queue(fixture, &t, &format!("{name}_error"), 1, WAIT).await;
    assert!(header(&errors[0], names::FAULT_MESSAGE).contains("panicked: consumer bug"));
    assert_eq!(header(&errors[0], names::FAULT_EXCEPTION_TYPE), "panic");
    wait_until(WAIT, "later messages are consumed", || ok.get() == 3).await;
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&name]).await;
}

/// A consume attempt past the endpoint timeout faults with a timeout error.
pub async fn consumer_timeout_faults<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("timeout");
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), |e| {
            e.timeout(Duration::from_millis(100))
                .handler(|_: ConsumeContext<TimedOut>| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(())
                })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{name}"), TimedOut { n: 1 })
        .await
        .expect("send");
    let errors = take_queue(fixture, &t, &format!("{name}_error"), 1, WAIT).await;
    assert_eq!(
        header(&errors[0], names::FAULT_EXCEPTION_TYPE),
        "busway::Timeout"
    );
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&name]).await;
}

/// When a message faults, `Fault<T>` is published with the error and the original message.
pub async fn fault_event_is_published<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let failing = unique("fault-source");
    let listener = unique("fault-listener");
    let faults = Arc::new(Mutex::new(Vec::<(Fault<FaultSource>, Envelope)>::new()));
    let f = faults.clone();
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(failing.clone(), |e| {
                e.handler(|_: ConsumeContext<FaultSource>| async { Err(PaymentDeclined.into()) })
            })
            .receive_endpoint(listener.clone(), move |e| {
                e.temporary()
                    .handler(move |ctx: ConsumeContext<Fault<FaultSource>>| {
                        let f = f.clone();
                        async move {
                            let envelope = ctx.receive_context().envelope().clone();
                            f.lock().expect("lock").push((ctx.into_message(), envelope));
                            Ok(())
                        }
                    })
            }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let id = Uuid::now_v7();
    let correlation = Uuid::now_v7();
    bus.send(format!("queue:{failing}"), FaultSource { n: 9 })
        .message_id(id)
        .correlation_id(correlation)
        .await
        .expect("send");
    wait_until(WAIT, "the fault is consumed", || {
        !faults.lock().expect("lock").is_empty()
    })
    .await;
    let (fault, envelope) = faults.lock().expect("lock")[0].clone();
    assert_eq!(fault.message, FaultSource { n: 9 });
    assert_eq!(fault.faulted_message_id, Some(id));
    assert_eq!(fault.exceptions[0].message, "the card was declined");
    assert!(
        fault.exceptions[0]
            .exception_type
            .ends_with("PaymentDeclined")
    );
    assert_eq!(
        fault.fault_message_types,
        vec![FaultSource::message_type().clone()]
    );
    assert!(
        fault
            .host
            .as_ref()
            .and_then(|h| h.machine_name.clone())
            .is_some()
    );
    assert_eq!(envelope.correlation_id, Some(correlation));
    assert_eq!(
        envelope
            .message_type
            .first()
            .map(|u| u.as_str().to_string()),
        Some(FaultSource::message_type().fault().as_str().to_string())
    );
    assert!(
        envelope
            .message_type
            .iter()
            .any(|u| u.as_str() == "urn:message:MassTransit:Fault")
    );
    take_queue(fixture, &t, &format!("{failing}_error"), 1, WAIT).await;
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&failing]).await;
}

/// Shutdown stops intake and lets in-flight messages finish; none is lost or faulted.
pub async fn shutdown_drains_in_flight<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("draining");
    let gauge = Gauge::default();
    let finished = Counter::default();
    let (g, f) = (gauge.clone(), finished.clone());
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| {
            e.prefetch(3).handler(move |_: ConsumeContext<Draining>| {
                let (g, f) = (g.clone(), f.clone());
                async move {
                    g.enter();
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    g.exit();
                    f.incr();
                    Ok(())
                }
            })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    for n in 0..5 {
        bus.send(format!("queue:{name}"), Draining { n })
            .await
            .expect("send");
    }
    wait_until(WAIT, "3 in flight", || gauge.current() == 3).await;
    running
        .shutdown_within(Duration::from_secs(10))
        .await
        .expect("shutdown");
    assert_eq!(
        finished.get(),
        3,
        "the in-flight messages finished before shutdown returned"
    );
    assert_eq!(gauge.current(), 0);
    assert_eq!(
        fixture.queue_depth(&t, &name).await,
        2,
        "the two messages not yet taken stay on the queue"
    );
    assert_eq!(fixture.queue_depth(&t, &format!("{name}_error")).await, 0);
    cleanup(fixture, &t, &[&name]).await;
}

/// A consumer still running at the shutdown deadline is cancelled and its message goes
/// back to the queue.
pub async fn shutdown_deadline_requeues<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("stuck");
    let started = Counter::default();
    let s = started.clone();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| {
            e.handler(move |_: ConsumeContext<Stuck>| {
                let s = s.clone();
                async move {
                    s.incr();
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(())
                }
            })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{name}"), Stuck { n: 1 })
        .await
        .expect("send");
    wait_until(WAIT, "the consumer started", || started.get() == 1).await;
    let begun = std::time::Instant::now();
    running
        .shutdown_within(Duration::from_millis(200))
        .await
        .expect("shutdown");
    assert!(
        begun.elapsed() < Duration::from_secs(10),
        "shutdown respects its deadline"
    );
    let t2 = t.clone();
    crate::support::wait_until_async(WAIT, "the message is back on the queue", || {
        let t2 = t2.clone();
        let name = name.clone();
        async move { fixture.queue_depth(&t2, &name).await == 1 }
    })
    .await;
    assert_eq!(
        fixture.queue_depth(&t, &format!("{name}_error")).await,
        0,
        "not faulted"
    );
    cleanup(fixture, &t, &[&name]).await;
}

#[derive(Debug, Clone)]
struct Seen {
    envelope: Envelope,
    input_address: String,
}

/// Correlation and conversation ids flow through a publish chain A → B → C; initiator ids
/// point at the cause; non-`MT-` headers are carried; source addresses are the endpoints.
pub async fn ids_propagate_through_publish_chains<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let (a, b, c) = (unique("chain-a"), unique("chain-b"), unique("chain-c"));
    let seen = Arc::new(Mutex::new(Vec::<(char, Seen)>::new()));
    let (sa, sb, sc) = (seen.clone(), seen.clone(), seen.clone());
    let record = |ctx_env: Envelope, input: &str| Seen {
        envelope: ctx_env,
        input_address: input.to_string(),
    };
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(a.clone(), move |e| {
                e.temporary().handler(move |ctx: ConsumeContext<ChainA>| {
                    let sa = sa.clone();
                    async move {
                        sa.lock().expect("lock").push((
                            'a',
                            record(
                                ctx.receive_context().envelope().clone(),
                                ctx.input_address(),
                            ),
                        ));
                        ctx.publish(ChainB { n: 2 }).await?;
                        Ok(())
                    }
                })
            })
            .receive_endpoint(b.clone(), move |e| {
                e.temporary().handler(move |ctx: ConsumeContext<ChainB>| {
                    let sb = sb.clone();
                    async move {
                        sb.lock().expect("lock").push((
                            'b',
                            record(
                                ctx.receive_context().envelope().clone(),
                                ctx.input_address(),
                            ),
                        ));
                        ctx.publish(ChainC { n: 3 }).await?;
                        Ok(())
                    }
                })
            })
            .receive_endpoint(c.clone(), move |e| {
                e.temporary().handler(move |ctx: ConsumeContext<ChainC>| {
                    let sc = sc.clone();
                    async move {
                        sc.lock().expect("lock").push((
                            'c',
                            record(
                                ctx.receive_context().envelope().clone(),
                                ctx.input_address(),
                            ),
                        ));
                        Ok(())
                    }
                })
            }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let correlation = Uuid::now_v7();
    bus.publish(ChainA { n: 1 })
        .correlation_id(correlation)
        .header("Tenant", "acme")
        .header("MT-Custom", "not carried")
        .await
        .expect("publish");
    wait_until(WAIT, "the chain completes", || {
        seen.lock().expect("lock").len() == 3
    })
    .await;
    let seen = seen.lock().expect("lock").clone();
    let get = |k: char| {
        seen.iter()
            .find(|(x, _)| *x == k)
            .map(|(_, s)| s.clone())
            .expect("seen")
    };
    let (sa, sb, sc) = (get('a'), get('b'), get('c'));
    let conversation = sa
        .envelope
        .conversation_id
        .expect("a conversation id is always set");
    assert_eq!(sa.envelope.correlation_id, Some(correlation));
    assert_eq!(sa.envelope.source_address.as_deref(), Some(bus.address()));
    for s in [&sb, &sc] {
        assert_eq!(
            s.envelope.conversation_id,
            Some(conversation),
            "conversation carried"
        );
        assert_eq!(
            s.envelope.correlation_id,
            Some(correlation),
            "correlation carried"
        );
        assert_eq!(
            s.envelope.initiator_id,
            Some(correlation),
            "initiator = the cause's correlation id"
        );
        assert_eq!(
            s.envelope.headers.get_str("Tenant").as_deref(),
            Some("acme")
        );
        assert!(
            !s.envelope.headers.contains("MT-Custom"),
            "MT- headers are not carried"
        );
    }
    assert_eq!(
        sb.envelope.source_address.as_deref(),
        Some(sa.input_address.as_str())
    );
    assert_eq!(
        sc.envelope.source_address.as_deref(),
        Some(sb.input_address.as_str())
    );
    assert_ne!(sb.envelope.message_id, sa.envelope.message_id);
    running.shutdown().await.expect("shutdown");
}

/// The W3C `traceparent` travels with messages: a consume continues the producer's trace,
/// and messages published while consuming stay in the same trace.
pub async fn traceparent_propagates<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let (a, b) = (unique("traced"), unique("traced-next"));
    type Traces = Arc<Mutex<Vec<(char, busway::TraceContext, Option<busway::TraceContext>)>>>;
    let traces: Traces = Arc::default();
    let (ta, tb) = (traces.clone(), traces.clone());
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(a.clone(), move |e| {
                e.temporary().handler(move |ctx: ConsumeContext<Traced>| {
                    let ta = ta.clone();
                    async move {
                        let rc = ctx.receive_context();
                        ta.lock().expect("lock").push((
                            'a',
                            rc.trace_context(),
                            rc.parent_trace_context(),
                        ));
                        // Published through the bus handle, not the context: the task-local
                        // trace context still links it.
                        ctx.bus().publish(TracedNext { n: 2 }).await?;
                        Ok(())
                    }
                })
            })
            .receive_endpoint(b.clone(), move |e| {
                e.temporary()
                    .handler(move |ctx: ConsumeContext<TracedNext>| {
                        let tb = tb.clone();
                        async move {
                            let rc = ctx.receive_context();
                            tb.lock().expect("lock").push((
                                'b',
                                rc.trace_context(),
                                rc.parent_trace_context(),
                            ));
                            Ok(())
                        }
                    })
            }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let root = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    bus.publish(Traced { n: 1 })
        .header(names::TRACEPARENT, root)
        .await
        .expect("publish");
    wait_until(WAIT, "both consumed", || {
        traces.lock().expect("lock").len() == 2
    })
    .await;
    let traces = traces.lock().expect("lock").clone();
    let (_, a_trace, a_parent) = traces
        .iter()
        .find(|(k, _, _)| *k == 'a')
        .cloned()
        .expect("a");
    let (_, b_trace, b_parent) = traces
        .iter()
        .find(|(k, _, _)| *k == 'b')
        .cloned()
        .expect("b");
    assert_eq!(
        a_parent.map(|p| p.span_id()),
        Some("00f067aa0ba902b7".to_string())
    );
    assert_eq!(
        a_trace.trace_id(),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "the consume continues the trace"
    );
    assert_eq!(
        b_trace.trace_id(),
        a_trace.trace_id(),
        "the next hop stays in the trace"
    );
    let b_parent = b_parent.expect("b carries a traceparent");
    assert_ne!(
        b_parent.span_id(),
        a_trace.span_id(),
        "the publish has its own producer span"
    );
    running.shutdown().await.expect("shutdown");
}

/// A request gets its typed response; a faulting responder surfaces as a request fault; a
/// silent responder times out.
pub async fn request_response<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let (answering, failing, silent) = (unique("answering"), unique("failing-q"), unique("silent"));
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(answering.clone(), |e| {
                e.temporary()
                    .handler(|ctx: ConsumeContext<Question>| async move {
                        assert!(ctx.request_id().is_some());
                        assert!(ctx.response_address().is_some());
                        ctx.respond(Answer {
                            n: ctx.message().n * 2,
                        })
                        .await?;
                        Ok(())
                    })
            })
            .receive_endpoint(failing.clone(), |e| {
                e.handler(|_: ConsumeContext<FailingQuestion>| async {
                    Err(ConsumeError::msg("cannot answer that"))
                })
            })
            .receive_endpoint(silent.clone(), |e| {
                e.temporary()
                    .handler(|_: ConsumeContext<Unanswered>| async { Ok(()) })
            }),
    )
    .await;
    let running = bus.start().await.expect("start");

    let response = bus
        .request_client::<Question>()
        .get_response::<Answer>(Question { n: 21 })
        .await
        .expect("a response");
    assert_eq!(response.n, 42);
    assert!(response.envelope().request_id.is_some());

    let to_queue = bus
        .request_client_to::<Question>(format!("queue:{answering}"))
        .expect("address")
        .get_response::<Answer>(Question { n: 5 })
        .await
        .expect("a response to a sent request");
    assert_eq!(to_queue.n, 10);

    let err = bus
        .request_client::<FailingQuestion>()
        .get_response::<Answer>(FailingQuestion { n: 1 })
        .await
        .expect_err("a fault");
    assert!(err.is_request_fault(), "{err}");
    assert_eq!(err.fault().map(|f| f.message()), Some("cannot answer that"));

    let begun = std::time::Instant::now();
    let err = bus
        .request_client::<Unanswered>()
        .with_timeout(Duration::from_millis(300))
        .get_response::<Answer>(Unanswered { n: 1 })
        .await
        .expect_err("a timeout");
    assert!(err.is_timeout(), "{err}");
    assert!(begun.elapsed() >= Duration::from_millis(300));
    assert!(begun.elapsed() < Duration::from_secs(5));

    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
    });
    let err = bus
        .request_client::<Unanswered>()
        .request(Unanswered { n: 2 })
        .cancellation(token)
        .get_response::<Answer>()
        .await
        .expect_err("cancelled");
    assert!(err.is_cancelled(), "{err}");

    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&failing]).await;
}

/// A message the bus's response endpoint cannot read goes to that endpoint's `_error`
/// queue with the reason, like on any endpoint (it used to be acked and dropped), a late
/// response is dropped without going there, and requests still get their responses
/// afterwards.
pub async fn unreadable_responses_go_to_error<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let answering = unique("answering");
    let response_address = Arc::new(Mutex::new(None::<String>));
    let seen = response_address.clone();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(answering.clone(), move |e| {
            let seen = seen.clone();
            e.temporary().handler(move |ctx: ConsumeContext<Question>| {
                *seen.lock().expect("lock") = ctx.response_address().map(str::to_string);
                async move {
                    ctx.respond(Answer {
                        n: ctx.message().n * 2,
                    })
                    .await?;
                    Ok(())
                }
            })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let first = bus
        .request_client::<Question>()
        .get_response::<Answer>(Question { n: 1 })
        .await
        .expect("a response");
    assert_eq!(first.n, 2);
    let address = response_address
        .lock()
        .expect("lock")
        .clone()
        .expect("the request carried a response address");
    let address = Address::parse(&address).expect("a response address");
    let json = Some(busway::serializer::MASSTRANSIT_JSON);
    send_raw(&t, &address, BROKEN_ENVELOPE, json).await;
    let error_queue = format!("{}_error", bus.response_endpoint_name());
    let errors = take_queue(fixture, &t, &error_queue, 1, WAIT).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(header(&errors[0], names::REASON), "fault");
    assert_eq!(
        header(&errors[0], names::FAULT_EXCEPTION_TYPE),
        "busway::DeserializeError"
    );
    // A response nobody waits for any more (its request timed out) is read, acked and
    // dropped: it does not reach `_error`.
    bus.send(address.clone(), Answer { n: 7 })
        .request_id(busway::new_id())
        .await
        .expect("send a late response");
    let second = bus
        .request_client::<Question>()
        .get_response::<Answer>(Question { n: 21 })
        .await
        .expect("a response after the unreadable one");
    assert_eq!(second.n, 42);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fixture.queue_depth(&t, &error_queue).await,
        0,
        "a late response went to {error_queue}"
    );
    running.shutdown().await.expect("shutdown");
}

/// A scheduled send is delivered after its delay, not before.
pub async fn scheduled_send_waits<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("scheduled");
    let at = Arc::new(Mutex::new(None::<std::time::Instant>));
    let a = at.clone();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| {
            e.temporary().handler(move |_: ConsumeContext<Scheduled>| {
                let a = a.clone();
                async move {
                    *a.lock().expect("lock") = Some(std::time::Instant::now());
                    Ok(())
                }
            })
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    if !t.profile().capabilities.delayed_delivery {
        let err = bus
            .send(format!("queue:{name}"), Scheduled { n: 1 })
            .delay(Duration::from_millis(500))
            .await
            .expect_err("a transport without delayed delivery refuses scheduled sends");
        assert!(err.is_unsupported(), "{err}");
        running.shutdown().await.expect("shutdown");
        return;
    }
    let sent = std::time::Instant::now();
    bus.send(format!("queue:{name}"), Scheduled { n: 1 })
        .delay(Duration::from_millis(500))
        .await
        .expect("scheduled send");
    wait_until(WAIT, "the scheduled message arrives", || {
        at.lock().expect("lock").is_some()
    })
    .await;
    let arrived = at.lock().expect("lock").expect("set");
    assert!(
        arrived.duration_since(sent) >= Duration::from_millis(450),
        "delivered after the delay"
    );
    running.shutdown().await.expect("shutdown");
}

/// Expands the conformance suite into `#[tokio::test]`s for one fixture;
/// `conformance_suite!(ignore = "reason", fixture)` marks every test `#[ignore]` with the reason.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance_suite!(@all []; $fixture);
    };
    (ignore = $reason:literal, $fixture:expr) => {
        $crate::conformance_suite!(@all [ignore = $reason]; $fixture);
    };
    (@all $attrs:tt; $fixture:expr) => {
        $crate::conformance_suite!(@tests $attrs; $fixture;
            fan_out_to_every_endpoint,
            competing_consumers_each_message_once,
            prefetch_bound_is_respected,
            retry_counts_are_exact,
            delayed_redelivery,
            error_queue_has_fault_headers,
            unhandled_type_goes_to_skipped,
            unreadable_messages_go_to_error,
            wrong_shape_is_not_retried,
            panicking_consumer_faults_and_endpoint_survives,
            consumer_timeout_faults,
            fault_event_is_published,
            shutdown_drains_in_flight,
            shutdown_deadline_requeues,
            ids_propagate_through_publish_chains,
            traceparent_propagates,
            request_response,
            unreadable_responses_go_to_error,
            scheduled_send_waits,
        );
    };
    (@tests $attrs:tt; $fixture:expr; $($name:ident),* $(,)?) => {$(
        $crate::conformance_suite!(@one $attrs; $fixture; $name);
    )*};
    (@one [$($attr:meta)*]; $fixture:expr; $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            $crate::conformance::$name(&$fixture).await;
        }
    };
}
