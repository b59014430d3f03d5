//! Reliability on the real RabbitMQ (127.0.0.1:5672, or `BUSWAY_RABBITMQ_URL`): no silent
//! loss, no dead endpoints, no crash or hot loops under hostile input and broker refusals.
//! Each test reproduces one defect found by adversarial runs, with the counts it checks.
//! Every test runs in a virtual host of its own, so broker policies stay local to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use busway::prelude::*;
use busway::rabbitmq::RabbitMq;
use busway::transport::QueueAdmin;
use busway::{ConsumeErrorKind, Transport};
use busway_integration_tests::rabbit::{TestVhost, rabbitmqctl, raw, transport_for};
use busway_integration_tests::support::{init_tracing, unique, wait_until, wait_until_async};
use futures_util::StreamExt;
use lapin::types::ShortString;
use lapin::{Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Reliability:Ping")]
struct Ping {
    n: u32,
}

async fn raw_connection(url: &str) -> Connection {
    tokio::time::timeout(
        WAIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connecting to RabbitMQ timed out")
    .expect("a raw AMQP connection")
}

/// Makes the broker refuse (nack) every publish to queues whose names start with `prefix`.
fn refuse_publishes(vhost: &TestVhost, policy: &str, prefix: &str) {
    rabbitmqctl(&[
        "-q",
        "set_policy",
        "-p",
        vhost.name(),
        "--apply-to",
        "queues",
        policy,
        &format!("^{prefix}"),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    ]);
}

fn clear_policy(vhost: &TestVhost, policy: &str) {
    rabbitmqctl(&["-q", "clear_policy", "-p", vhost.name(), policy]);
}

async fn depth(transport: &RabbitMq, queue: &str) -> u32 {
    let n = transport.queue_depth(queue).await.expect("queue depth");
    u32::try_from(n).expect("a depth that fits u32")
}

/// A MassTransit-shaped envelope (System.Text.Json, camelCase, as
/// `MassTransit.Serialization.JsonMessageEnvelope` writes it) with the given message types,
/// fault address and headers.
fn envelope(message_types: &[String], fault_address: Option<&str>, headers: &str) -> String {
    let types = serde_json::to_string(message_types).expect("json");
    let fault = fault_address
        .map(|a| format!("\"{a}\""))
        .unwrap_or_else(|| "null".to_string());
    format!(
        r#"{{"messageId":"{}","requestId":null,"correlationId":null,"conversationId":"{}","initiatorId":null,"sourceAddress":"rabbitmq://localhost/DESKTOP_bus_abc","destinationAddress":"rabbitmq://localhost/Reliability:Ping","responseAddress":null,"faultAddress":{fault},"messageType":{types},"message":{{"n":7}},"expirationTime":null,"sentTime":"2026-12-01T10:00:00.1234567Z","headers":{headers},"host":{{"machineName":"DESKTOP","processName":"Svc","processId":42,"assembly":"Svc","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}}}"#,
        Uuid::new_v4(),
        Uuid::new_v4()
    )
}

async fn publish_raw(connection: &Connection, exchange: &str, body: &[u8]) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    raw::publish(&channel, exchange, body, raw::masstransit_properties()).await;
}

/// A queue bound to `exchange` (declared here), to count what is published to it.
async fn tap(connection: &Connection, exchange: &str, queue: &str) {
    let channel = connection.create_channel().await.expect("channel");
    raw::bind_queue(&channel, exchange, queue).await;
}

/// A started bus on `transport` with one endpoint, `queue`, handled by `handler`.
async fn one_endpoint<H, Fut>(
    transport: &RabbitMq,
    queue: &str,
    handler: H,
) -> (Bus, busway::RunningBus)
where
    H: Fn(ConsumeContext<Ping>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), ConsumeError>> + Send + 'static,
{
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint(queue.to_string(), move |e| e.handler(handler))
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    (bus, running)
}

/// A consumer that counts its calls and succeeds.
fn counting(
    calls: Arc<AtomicUsize>,
) -> impl Fn(ConsumeContext<Ping>) -> std::future::Ready<Result<(), ConsumeError>> + Send + Sync + 'static
{
    move |_ctx: ConsumeContext<Ping>| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
}

/// A consumer that counts its calls and always fails.
fn failing(
    calls: Arc<AtomicUsize>,
) -> impl Fn(ConsumeContext<Ping>) -> std::future::Ready<Result<(), ConsumeError>> + Send + Sync + 'static
{
    move |_ctx: ConsumeContext<Ping>| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(ConsumeError::msg("this consumer always fails")))
    }
}

/// Sends `SENDS` messages at 32 in flight, alternating between `failing` and `working`
/// addresses; returns how many sends to `failing` reported OK and how many to `working`
/// reported an error.
async fn send_alternating(bus: &Bus, failing: &str, working: &str) -> (usize, usize) {
    let results: Vec<(bool, bool)> = futures_util::stream::iter(0..SENDS)
        .map(|n| {
            let bus = bus.clone();
            let to_failing = n % 2 == 0;
            let address = if to_failing { failing } else { working }.to_string();
            async move { (to_failing, bus.send(address, Ping { n }).await.is_ok()) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let failing_ok = results.iter().filter(|(f, ok)| *f && *ok).count();
    let working_err = results.iter().filter(|(f, ok)| !*f && !*ok).count();
    (failing_ok, working_err)
}

const SENDS: u32 = 2_000;

/// Issue 12.1: with concurrent sends through one transport, every publish refused by the
/// broker (nack) is reported as an error and every accepted one as OK. Before the fix, 58 of
/// 2,000 refused sends were reported OK at 32 in flight: lapin could queue two publishes'
/// frames in the other order than it took their delivery tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_and_accepted_sends_are_told_apart_under_concurrency() {
    init_tracing();
    let vhost = TestVhost::create("confirms");
    refuse_publishes(&vhost, "refuse", "refused-");
    let transport = transport_for(&vhost.url());
    let bus = Bus::builder()
        .transport(transport.clone())
        .build()
        .await
        .expect("build");
    let refused = unique("refused-a");
    let accepted = unique("accepted-b");
    // The policy applies to queues declared after it: declare both first.
    bus.send(format!("queue:{accepted}"), Ping { n: 0 })
        .await
        .expect("the first accepted send");
    let first_refused = bus.send(format!("queue:{refused}"), Ping { n: 0 }).await;
    assert!(first_refused.is_err(), "the policy refuses publishes");

    let (refused_ok, accepted_err) = send_alternating(
        &bus,
        &format!("queue:{refused}"),
        &format!("queue:{accepted}"),
    )
    .await;
    assert_eq!(
        (refused_ok, accepted_err),
        (0, 0),
        "refused sends reported OK, accepted sends reported failed (of {SENDS} at 32 in flight)"
    );
    assert_eq!(depth(&transport, &accepted).await, SENDS / 2 + 1);
    assert_eq!(depth(&transport, &refused).await, 0);
    transport.close().await.expect("close");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Reliability:Refused")]
struct RefusedEvent {
    n: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Reliability:Accepted")]
struct AcceptedEvent {
    n: u32,
}

/// Publishes by message type share the confirm collector with sends but carry no identity
/// for returns (the broker cannot return them). Under concurrency every publish the broker
/// refuses (its only queue rejects) is still an error and every accepted one OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_and_accepted_publishes_are_told_apart_under_concurrency() {
    init_tracing();
    let vhost = TestVhost::create("publish-confirms");
    refuse_publishes(&vhost, "refuse", "refusing-");
    let transport = transport_for(&vhost.url());
    let refusing = unique("refusing-q");
    let accepting = unique("accepting-q");
    // Built, not started: the queues are declared and bound, nothing consumes.
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint(refusing.clone(), |e| {
            e.handler(|_: ConsumeContext<RefusedEvent>| async { Ok(()) })
        })
        .receive_endpoint(accepting.clone(), |e| {
            e.handler(|_: ConsumeContext<AcceptedEvent>| async { Ok(()) })
        })
        .build()
        .await
        .expect("build");
    let results: Vec<(bool, bool)> = futures_util::stream::iter(0..SENDS)
        .map(|n| {
            let bus = bus.clone();
            async move {
                if n % 2 == 0 {
                    (true, bus.publish(RefusedEvent { n }).await.is_ok())
                } else {
                    (false, bus.publish(AcceptedEvent { n }).await.is_ok())
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let refused_ok = results.iter().filter(|(r, ok)| *r && *ok).count();
    let accepted_err = results.iter().filter(|(r, ok)| !*r && !*ok).count();
    assert_eq!(
        (refused_ok, accepted_err),
        (0, 0),
        "refused publishes reported OK, accepted ones reported failed (of {SENDS} at 32 in flight)"
    );
    assert_eq!(depth(&transport, &accepting).await, SENDS / 2);
    assert_eq!(depth(&transport, &refusing).await, 0);
    transport.close().await.expect("close");
}

/// Issue 12.1, returns: with concurrent sends through one transport, every send the broker
/// returns (an exchange no queue is bound to) is an error and every routed one is OK. lapin
/// hands a `basic.return` to whichever confirm it completes next, and completes the tags of
/// one `multiple` ack in hash order, so a return could land on another task's publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn returned_and_routed_sends_are_told_apart_under_concurrency() {
    init_tracing();
    let vhost = TestVhost::create("returns");
    let transport = transport_for(&vhost.url());
    let bus = Bus::builder()
        .transport(transport.clone())
        .build()
        .await
        .expect("build");
    let nowhere = unique("nowhere");
    let routed = unique("routed");
    bus.send(format!("queue:{routed}"), Ping { n: 0 })
        .await
        .expect("the first routed send");

    let (returned_ok, routed_err) = send_alternating(
        &bus,
        &format!("exchange:{nowhere}"),
        &format!("queue:{routed}"),
    )
    .await;
    assert_eq!(
        (returned_ok, routed_err),
        (0, 0),
        "returned sends reported OK, routed sends reported failed (of {SENDS} at 32 in flight)"
    );
    assert_eq!(depth(&transport, &routed).await, SENDS / 2 + 1);
    transport.close().await.expect("close");
}

/// Issue 12.2: an endpoint whose queue is deleted under it (by an operator) declares the
/// queue and its bindings again and goes on consuming, for both sends and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_whose_queue_is_deleted_declares_it_again() {
    init_tracing();
    let vhost = TestVhost::create("deleted");
    let transport = transport_for(&vhost.url());
    let queue = unique("victim");
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let (bus, running) = one_endpoint(&transport, &queue, counting(s)).await;
    bus.publish(Ping { n: 1 }).await.expect("publish");
    wait_until(WAIT, "the first message was consumed", || {
        seen.load(Ordering::SeqCst) == 1
    })
    .await;

    rabbitmqctl(&["-q", "delete_queue", "-p", vhost.name(), &queue]);
    let listed = |vhost: &TestVhost, queue: &str| {
        vhost
            .list("list_queues", &["name"])
            .iter()
            .any(|q| q["name"] == queue)
    };
    wait_until_async(WAIT, "the endpoint declared its queue again", || async {
        listed(&vhost, &queue)
    })
    .await;
    // Both routes work again: the message type exchange is bound to the endpoint anew, and
    // a send to the queue reaches it.
    wait_until_async(WAIT, "a publish after the deletion was consumed", || {
        let bus = bus.clone();
        let seen = seen.clone();
        async move {
            let before = seen.load(Ordering::SeqCst);
            bus.publish(Ping { n: 2 }).await.expect("publish");
            tokio::time::sleep(Duration::from_millis(300)).await;
            seen.load(Ordering::SeqCst) > before
        }
    })
    .await;
    let before = seen.load(Ordering::SeqCst);
    bus.send(format!("queue:{queue}"), Ping { n: 3 })
        .await
        .expect("a send after the deletion");
    wait_until(WAIT, "the send after the deletion was consumed", || {
        seen.load(Ordering::SeqCst) == before + 1
    })
    .await;
    running.shutdown().await.expect("shutdown");
}

/// Issue 12.3 and 12.5: a message whose `messageType` nests 3,000 generic levels (21 KB),
/// and one whose message type and fault address are longer than an AMQP name can be, each
/// fault once and go to `_error` with the fault headers. Before the fix the first overflowed
/// the stack (the process aborted, and again after every restart) and the second panicked
/// inside lapin on every redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_message_types_and_addresses_fault_once_into_the_error_queue() {
    init_tracing();
    let vhost = TestVhost::create("hostile");
    let transport = transport_for(&vhost.url());
    let queue = unique("hostile");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (_bus, running) = one_endpoint(&transport, &queue, failing(c)).await;
    let connection = raw_connection(&vhost.url()).await;
    let faults = unique("fault-tap");
    tap(
        &connection,
        "MassTransit:Fault--Reliability:Ping--",
        &faults,
    )
    .await;

    let levels = 3_000;
    let deep = format!(
        "urn:message:{}A:B{}",
        "A:B[[".repeat(levels),
        "]]".repeat(levels)
    );
    let long_type = format!("urn:message:Reliability:{}", "X".repeat(300));
    let long_fault = format!("rabbitmq://127.0.0.1/{}/{}", vhost.name(), "f".repeat(300));
    let ping = "urn:message:Reliability:Ping".to_string();
    publish_raw(
        &connection,
        &queue,
        envelope(&[ping.clone(), deep], None, "{}").as_bytes(),
    )
    .await;
    publish_raw(
        &connection,
        &queue,
        envelope(&[ping, long_type], Some(&long_fault), "{}").as_bytes(),
    )
    .await;
    let error_queue = format!("{queue}_error");
    wait_until_async(WAIT, "both messages reached the error queue", || async {
        depth(&transport, &error_queue).await == 2
    })
    .await;
    // Nothing spins: one consume each, no redeliveries.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "each message consumed once"
    );
    assert_eq!(depth(&transport, &error_queue).await, 2);
    assert_eq!(depth(&transport, &queue).await, 0);
    let moved = transport
        .take_messages(&error_queue, 10)
        .await
        .expect("take");
    for m in &moved {
        assert_eq!(m.headers.get_str("MT-Reason").as_deref(), Some("fault"));
        assert!(m.headers.contains("MT-Fault-Message"));
    }
    // The first message's fault still reached the consumers of the readable type; the
    // second was sent to its fault address only, which cannot exist.
    assert_eq!(
        depth(&transport, &faults).await,
        1,
        "one Fault<Ping> published"
    );
    running.shutdown().await.expect("shutdown");
}

/// Issue 12.4: when the error queue refuses the move, the delivery is held and the move
/// tried again with back-off; the consumer is not run again and the fault event is
/// published once. Before the fix: 3,044 failed moves and 1,761 duplicate faults for two
/// messages in 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_move_to_the_error_queue_backs_off_and_faults_once() {
    init_tracing();
    let vhost = TestVhost::create("refused-move");
    let queue = unique("mover");
    let error_queue = format!("{queue}_error");
    let transport = transport_for(&vhost.url());
    let connection = raw_connection(&vhost.url()).await;
    let faults = unique("fault-tap");
    tap(
        &connection,
        "MassTransit:Fault--Reliability:Ping--",
        &faults,
    )
    .await;
    refuse_publishes(&vhost, "full-error", &error_queue);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (bus, running) = one_endpoint(&transport, &queue, failing(c)).await;
    bus.send(format!("queue:{queue}"), Ping { n: 1 })
        .await
        .expect("send");
    bus.send(format!("queue:{queue}"), Ping { n: 2 })
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "each message consumed once"
    );
    assert_eq!(depth(&transport, &faults).await, 2, "one fault per message");
    assert_eq!(depth(&transport, &error_queue).await, 0, "refused so far");
    // The error queue takes messages again: the held deliveries move within the back-off.
    clear_policy(&vhost, "full-error");
    wait_until_async(
        Duration::from_secs(40),
        "both moved to the error queue",
        || async { depth(&transport, &error_queue).await == 2 },
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(depth(&transport, &faults).await, 2);
    assert_eq!(depth(&transport, &queue).await, 0);
    running.shutdown().await.expect("shutdown");
}

/// Issue 12.9: a consumer that hands every message back ("cancelled") is not redelivered in
/// a hot loop, and the message is still on the queue after shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_back_message_is_requeued_with_back_off() {
    init_tracing();
    let vhost = TestVhost::create("hand-back");
    let transport = transport_for(&vhost.url());
    let queue = unique("hand-back");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint(queue.clone(), move |e| {
            e.handler(move |_ctx: ConsumeContext<Ping>| {
                c.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Err(ConsumeError::with_kind(
                    ConsumeErrorKind::Cancelled,
                    "Tests::NotNow",
                    "not now",
                )))
            })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{queue}"), Ping { n: 1 })
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = calls.load(Ordering::SeqCst);
    // 50, 100, 200, 400, 800, 1600 ms: at most 7 deliveries in 3 s (hundreds before).
    assert!((2..=8).contains(&n), "{n} deliveries in 3 s");
    running.shutdown().await.expect("shutdown");
    wait_until_async(WAIT, "the message is back on the queue", || async {
        depth(&transport, &queue).await == 1
    })
    .await;
}

/// Issue 12.7: an envelope with 40,000 headers is read in linear time: consumed once, and
/// the endpoint goes on consuming (before: 23 s per message on a runtime worker, missed
/// heartbeats and redeliveries forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_with_forty_thousand_headers_is_consumed_once() {
    init_tracing();
    let vhost = TestVhost::create("headers");
    let transport = transport_for(&vhost.url());
    let queue = unique("many-headers");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (bus, running) = one_endpoint(&transport, &queue, counting(c)).await;
    let mut headers = String::from("{");
    for i in 0..40_000 {
        if i > 0 {
            headers.push(',');
        }
        headers.push_str(&format!("\"h-{i}\":\"{i}\""));
    }
    headers.push('}');
    let connection = raw_connection(&vhost.url()).await;
    let ping = "urn:message:Reliability:Ping".to_string();
    let body = envelope(std::slice::from_ref(&ping), None, &headers);
    publish_raw(&connection, &queue, body.as_bytes()).await;
    publish_raw(&connection, &queue, body.as_bytes()).await;
    bus.send(format!("queue:{queue}"), Ping { n: 3 })
        .await
        .expect("send");
    wait_until(WAIT, "all three consumed", || {
        calls.load(Ordering::SeqCst) == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "no redeliveries");
    running.shutdown().await.expect("shutdown");
}

/// Issue 12.13: delayed delivery with many distinct delays (jittered redelivery) leaves no
/// exchange behind once the wait queues expire: each wait exchange is auto-delete and goes
/// with its queue. Before: one durable exchange per distinct delay, forever (97 after 40
/// messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exchanges_for_distinct_delays_go_with_their_queues() {
    init_tracing();
    let vhost = TestVhost::create("delays");
    let transport = transport_for(&vhost.url());
    let queue = unique("delayed");
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let (bus, running) = one_endpoint(&transport, &queue, counting(s)).await;
    for n in 0..40u32 {
        bus.send(format!("queue:{queue}"), Ping { n })
            .delay(Duration::from_millis(200 + u64::from(n) * 7))
            .await
            .expect("delayed send");
    }
    wait_until(WAIT, "all 40 delayed messages arrived", || {
        seen.load(Ordering::SeqCst) == 40
    })
    .await;
    let waits = |what: &str| {
        vhost
            .list(what, &["name"])
            .iter()
            .filter_map(|row| row["name"].as_str().map(str::to_string))
            .filter(|name| name.starts_with("busway.wait."))
            .collect::<Vec<_>>()
    };
    let queues = waits("list_queues");
    assert_eq!(queues.len(), 40, "one wait queue per distinct delay");
    assert_eq!(waits("list_exchanges").len(), 40);
    // What x-expires does a minute later, done now: the exchanges go with their queues.
    let connection = raw_connection(&vhost.url()).await;
    let channel = connection.create_channel().await.expect("channel");
    for q in &queues {
        channel
            .queue_delete(ShortString::from(q.as_str()), Default::default())
            .await
            .expect("delete a wait queue");
    }
    assert_eq!(waits("list_exchanges"), Vec::<String>::new());
    // A later delay of an expired length declares its wait queue and exchange again.
    bus.send(format!("queue:{queue}"), Ping { n: 99 })
        .delay(Duration::from_millis(200))
        .await
        .expect("delayed send after expiry");
    wait_until(WAIT, "the delayed send after expiry arrived", || {
        seen.load(Ordering::SeqCst) == 41
    })
    .await;
    running.shutdown().await.expect("shutdown");
}

/// Issue 12.8: what one message can make the endpoint declare is bounded. Fifty faulting
/// messages that each name a fault address of their own (`rabbitmq://host/vhost/fault-N`)
/// create no queue: a full address declares only its exchange, as MassTransit's
/// `RabbitMqEndpointAddress` (`bind=false` unless asked) and
/// `RabbitMqSendSettings.GetBrokerTopology` do. One faulting message listing 5,000 message
/// types binds at most 32 fault exchanges, and nothing is redelivered (the connection stays
/// up). Before the fix: 50 durable queues, and thousands of exchanges with connection losses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_chosen_fault_addresses_and_type_lists_declare_a_bounded_topology() {
    init_tracing();
    let vhost = TestVhost::create("amplify");
    let transport = transport_for(&vhost.url());
    let queue = unique("amplify");
    let calls = Arc::new(AtomicUsize::new(0));
    let (_bus, running) = one_endpoint(&transport, &queue, failing(calls.clone())).await;
    let connection = raw_connection(&vhost.url()).await;
    let ping = "urn:message:Reliability:Ping".to_string();
    const ADDRESSED: usize = 50;
    for n in 0..ADDRESSED {
        let fault = format!("rabbitmq://127.0.0.1/{}/fault-{n}", vhost.name());
        publish_raw(
            &connection,
            &queue,
            envelope(std::slice::from_ref(&ping), Some(&fault), "{}").as_bytes(),
        )
        .await;
    }
    let mut many: Vec<String> = vec![ping.clone()];
    many.extend((1..5_000).map(|n| format!("urn:message:Reliability:T{n}")));
    publish_raw(&connection, &queue, envelope(&many, None, "{}").as_bytes()).await;

    let error_queue = format!("{queue}_error");
    let total = ADDRESSED as u32 + 1;
    wait_until_async(
        Duration::from_secs(60),
        "every message reached the error queue",
        || async { depth(&transport, &error_queue).await == total },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        total as usize,
        "each message consumed once: no redelivery, no connection loss"
    );
    let queues: Vec<String> = vhost
        .list("list_queues", &["name"])
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .collect();
    let mut expected = vec![queue.clone(), error_queue.clone()];
    expected.sort();
    let mut found = queues.clone();
    found.sort();
    assert_eq!(found, expected, "no queue besides the endpoint's own");
    let exchanges: Vec<String> = vhost
        .list("list_exchanges", &["name"])
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .collect();
    let fault_exchanges = exchanges
        .iter()
        .filter(|e| e.starts_with("MassTransit:Fault--"))
        .count();
    assert!(
        fault_exchanges <= 32,
        "{fault_exchanges} fault exchanges declared for one message (bound 32)"
    );
    let addressed = exchanges.iter().filter(|e| e.starts_with("fault-")).count();
    assert_eq!(
        addressed, ADDRESSED,
        "each fault address is an exchange, not a queue"
    );
    running.shutdown().await.expect("shutdown");
}

/// A hand-written AMQP 0-9-1 client that publishes one message frame by frame: lapin cannot
/// write the header tables the test needs (its serialiser recurses on its io thread, as its
/// parser does), and the bytes should not come from the client under test anyway.
mod raw_amqp {
    use std::time::Duration;

    use lapin::uri::AMQPUri;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const STEP: Duration = Duration::from_secs(10);

    fn short(out: &mut Vec<u8>, s: &str) {
        out.push(u8::try_from(s.len()).expect("a short string"));
        out.extend_from_slice(s.as_bytes());
    }

    fn long(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u32::try_from(b.len()).expect("a long string").to_be_bytes());
        out.extend_from_slice(b);
    }

    fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(args);
        p
    }

    async fn send(stream: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).expect("a frame").to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        tokio::time::timeout(STEP, stream.write_all(&f))
            .await
            .expect("writing to RabbitMQ timed out")
            .expect("write a frame");
    }

    /// Reads frames until method `class.id` arrives (heartbeats skipped); returns its
    /// arguments. A `connection.close` or `channel.close` from the broker fails the test with
    /// the broker's reason.
    async fn expect(stream: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
        loop {
            let mut head = [0u8; 7];
            tokio::time::timeout(STEP, stream.read_exact(&mut head))
                .await
                .expect("RabbitMQ did not answer in time")
                .expect("read a frame header");
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            tokio::time::timeout(STEP, stream.read_exact(&mut payload))
                .await
                .expect("RabbitMQ did not answer in time")
                .expect("read a frame");
            if head[0] != 1 {
                continue;
            }
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            if got == (class, id) {
                payload.truncate(size);
                return payload.split_off(4);
            }
            if matches!(got, (10, 50) | (20, 40)) {
                let code = u16::from_be_bytes([payload[4], payload[5]]);
                let text = String::from_utf8_lossy(&payload[7..7 + usize::from(payload[6])]);
                panic!("RabbitMQ closed on the raw publisher: {code} {text}");
            }
        }
    }

    /// Publishes `body` to the default exchange with routing key `queue`, its `headers`
    /// property being `table` (an encoded field table, length prefix included), persistent,
    /// and waits for the broker's confirm.
    pub(crate) async fn publish(url: &str, queue: &str, table: &[u8], body: &[u8]) {
        let uri: AMQPUri = url.parse().expect("an AMQP URL");
        let mut stream = tokio::time::timeout(
            STEP,
            TcpStream::connect((uri.authority.host.as_str(), uri.authority.port)),
        )
        .await
        .expect("connecting to RabbitMQ timed out")
        .expect("connect to RabbitMQ");
        stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("write");
        expect(&mut stream, 10, 10).await; // connection.start
        let mut args = 0u32.to_be_bytes().to_vec(); // no client properties
        short(&mut args, "PLAIN");
        let user = &uri.authority.userinfo;
        long(
            &mut args,
            format!("\0{}\0{}", user.username, user.password).as_bytes(),
        );
        short(&mut args, "en_US");
        send(&mut stream, 1, 0, &method(10, 11, &args)).await;
        let tune = expect(&mut stream, 10, 30).await;
        let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
        let mut args = tune[..2].to_vec(); // channel max as offered
        args.extend_from_slice(&frame_max.to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        send(&mut stream, 1, 0, &method(10, 31, &args)).await;
        let mut args = Vec::new();
        short(&mut args, &uri.vhost);
        short(&mut args, "");
        args.push(0);
        send(&mut stream, 1, 0, &method(10, 40, &args)).await;
        expect(&mut stream, 10, 41).await;
        send(&mut stream, 1, 1, &method(20, 10, &[0])).await; // channel.open
        expect(&mut stream, 20, 11).await;
        send(&mut stream, 1, 1, &method(85, 10, &[0])).await; // confirm.select
        expect(&mut stream, 85, 11).await;
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, "");
        short(&mut args, queue);
        args.push(0);
        send(&mut stream, 1, 1, &method(60, 40, &args)).await; // basic.publish
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        // content-type, headers, delivery-mode
        header.extend_from_slice(&(0x8000u16 | 0x2000 | 0x1000).to_be_bytes());
        short(&mut header, "application/vnd.masstransit+json");
        header.extend_from_slice(table);
        header.push(2);
        assert!(
            header.len() + 8 <= frame_max as usize,
            "the header frame fits the broker's frame_max"
        );
        send(&mut stream, 2, 1, &header).await;
        send(&mut stream, 3, 1, body).await;
        expect(&mut stream, 60, 80).await; // basic.ack (a nack is 60.120 and times out here)
        let mut args = 200u16.to_be_bytes().to_vec();
        short(&mut args, "done");
        args.extend_from_slice(&[0, 0, 0, 0]);
        send(&mut stream, 1, 0, &method(10, 50, &args)).await;
        expect(&mut stream, 10, 51).await;
    }

    /// A header table (length prefix included): `kept` = "yes", and `deep` nesting `levels`
    /// tables (`F`) or arrays (`A`).
    pub(crate) fn deep_table(levels: usize, kind: u8) -> Vec<u8> {
        let mut value: Vec<u8> = vec![kind, 0, 0, 0, 0];
        for _ in 1..levels {
            let mut inner = Vec::new();
            if kind == b'F' {
                short(&mut inner, "k");
            }
            inner.extend_from_slice(&value);
            value = vec![kind];
            long(&mut value, &inner);
        }
        let mut entries = Vec::new();
        short(&mut entries, "kept");
        entries.push(b'S');
        long(&mut entries, b"yes");
        short(&mut entries, "deep");
        entries.extend_from_slice(&value);
        let mut table = Vec::new();
        long(&mut table, &entries);
        table
    }
}

/// Issue 12.3: a delivery whose AMQP header table nests 3,000 levels (21 KB; tables, then
/// arrays) is consumed like any other, and the endpoint keeps consuming. Before the fix
/// lapin's recursive parser overflowed its io thread's stack at about 300 levels and aborted
/// the process, and every restart aborted again on the redelivery. The guard under lapin
/// (`frame_guard.rs`) replaces the too-deep value with a marker and keeps the other headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_thousands_deep_are_consumed_without_a_crash() {
    init_tracing();
    let vhost = TestVhost::create("deep");
    let transport = transport_for(&vhost.url());
    let queue = unique("deep-headers");
    // (the `deep` header, the `kept` header) of each consumed message
    type Seen = Vec<(Option<String>, Option<String>)>;
    let seen: Arc<std::sync::Mutex<Seen>> = Arc::default();
    let s = seen.clone();
    let (bus, running) = one_endpoint(&transport, &queue, move |ctx: ConsumeContext<Ping>| {
        let text = |name: &str| {
            ctx.headers()
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        s.lock().expect("lock").push((text("deep"), text("kept")));
        std::future::ready(Ok(()))
    })
    .await;
    let ping = "urn:message:Reliability:Ping".to_string();
    let body = envelope(std::slice::from_ref(&ping), None, "{}");
    let tables = raw_amqp::deep_table(3_000, b'F');
    assert!(tables.len() > 20_000, "{} bytes of headers", tables.len());
    raw_amqp::publish(&vhost.url(), &queue, &tables, body.as_bytes()).await;
    raw_amqp::publish(
        &vhost.url(),
        &queue,
        &raw_amqp::deep_table(3_000, b'A'),
        body.as_bytes(),
    )
    .await;
    bus.send(format!("queue:{queue}"), Ping { n: 3 })
        .await
        .expect("send");
    wait_until(WAIT, "all three consumed", || {
        seen.lock().expect("lock").len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 3, "each consumed once: {seen:?}");
    let marker = "[removed by busway: nested deeper than 32 levels]";
    let deep: Vec<&(Option<String>, Option<String>)> = seen
        .iter()
        .filter(|(deep, _)| deep.as_deref() == Some(marker))
        .collect();
    assert_eq!(deep.len(), 2, "both deep values replaced: {seen:?}");
    assert!(
        deep.iter().all(|(_, kept)| kept.as_deref() == Some("yes")),
        "the other headers kept: {seen:?}"
    );
    assert_eq!(depth(&transport, &queue).await, 0);
    let queues = vhost.list("list_queues", &["name"]);
    assert!(
        !queues.iter().any(|q| q["name"] == format!("{queue}_error")),
        "nothing faulted: {queues:?}"
    );
    running.shutdown().await.expect("shutdown");
}
