//! Batched acks on the real RabbitMQ (127.0.0.1:5672, or `BUSWAY_RABBITMQ_URL`): a consumer
//! channel acks with `multiple` where it can, and nothing that follows from that may lose,
//! repeat or stall a message. Each test runs in a virtual host of its own and reads the
//! broker's own counts back with `rabbitmqctl`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use busway::prelude::*;
use busway::rabbitmq::RabbitMq;
use busway::transport::QueueAdmin;
use busway::{Retry, Transport};
use busway_integration_tests::rabbit::{TestVhost, transport_for};
use busway_integration_tests::support::{init_tracing, unique, wait_until};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Acks:Job")]
struct Job {
    n: u32,
}

/// `(messages ready, messages unacknowledged)` of `queue`, as the broker counts them.
fn broker_counts(vhost: &TestVhost, queue: &str) -> (u64, u64) {
    let rows = vhost.list(
        "list_queues",
        &["name", "messages_ready", "messages_unacknowledged"],
    );
    let row = rows
        .iter()
        .find(|r| r["name"] == queue)
        .unwrap_or_else(|| panic!("queue `{queue}` is not on the broker: {rows:?}"));
    let count = |k: &str| row[k].as_u64().unwrap_or_else(|| panic!("{k} in {row}"));
    (count("messages_ready"), count("messages_unacknowledged"))
}

async fn send_all(bus: &Bus, queue: &str, jobs: std::ops::Range<u32>) {
    let address = format!("queue:{queue}");
    let sent: Vec<_> = futures_util::stream::iter(jobs)
        .map(|n| {
            let (bus, address) = (bus.clone(), address.clone());
            async move { bus.send(address, Job { n }).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(sent.iter().all(Result::is_ok), "every send confirmed");
}

/// A delivery still being handled holds back the `multiple` ack of those behind it; the
/// finished ones must still be acked on their own, or they keep the prefetch window full
/// and the endpoint stalls behind one slow message. Here prefetch is 4: without those acks
/// the endpoint would take three fast jobs and wait for the slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_delivery_does_not_hold_back_the_acks_of_the_others() {
    init_tracing();
    let vhost = TestVhost::create("acks-slow");
    let transport = transport_for(&vhost.url());
    let queue = unique("acks-slow");
    let fast = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let bus = {
        let (fast, release) = (fast.clone(), release.clone());
        Bus::builder()
            .transport(transport.clone())
            .receive_endpoint(queue.clone(), move |e| {
                e.prefetch(4)
                    .concurrency_limit(4)
                    .handler(move |ctx: ConsumeContext<Job>| {
                        let (fast, release) = (fast.clone(), release.clone());
                        async move {
                            if ctx.message().n == 0 {
                                // Bounded: the test releases it once the fast ones are through.
                                let _ = tokio::time::timeout(WAIT, release.notified()).await;
                            } else {
                                fast.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(())
                        }
                    })
            })
            .build()
            .await
            .expect("build")
    };
    let running = bus.start().await.expect("start");
    bus.send(format!("queue:{queue}"), Job { n: 0 })
        .await
        .expect("send the slow job");
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_all(&bus, &queue, 1..41).await;
    wait_until(WAIT, "the 40 fast jobs behind the slow one", || {
        fast.load(Ordering::SeqCst) == 40
    })
    .await;
    // The last fast acks leave within the linger; then only the slow job is unacknowledged.
    wait_until(
        Duration::from_secs(5),
        "only the slow job unacknowledged while it runs",
        || broker_counts(&vhost, &queue) == (0, 1),
    )
    .await;
    release.notify_one();
    running.shutdown().await.expect("shutdown");
    assert_eq!(broker_counts(&vhost, &queue), (0, 0), "every job acked");
    transport.close().await.expect("close");
}

/// Acks still owed when an endpoint stops go out before its channel closes: a clean
/// shutdown right after the last message was handled leaves nothing to redeliver. Ten
/// messages at prefetch 64 never fill a `multiple` ack (32), so each waits for the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_owed_at_shutdown_reach_the_broker() {
    init_tracing();
    let vhost = TestVhost::create("acks-stop");
    for round in 0..5 {
        // A bus closes its transport when it shuts down: one per round.
        let transport = transport_for(&vhost.url());
        let queue = unique(&format!("acks-stop-{round}"));
        let calls = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let bus = {
            let (calls, done) = (calls.clone(), done.clone());
            Bus::builder()
                .transport(transport.clone())
                .receive_endpoint(queue.clone(), move |e| {
                    e.prefetch(64).handler(move |_ctx: ConsumeContext<Job>| {
                        let (calls, done) = (calls.clone(), done.clone());
                        async move {
                            if calls.fetch_add(1, Ordering::SeqCst) + 1 == 10 {
                                done.notify_one();
                            }
                            Ok(())
                        }
                    })
                })
                .build()
                .await
                .expect("build")
        };
        let running = bus.start().await.expect("start");
        send_all(&bus, &queue, 0..10).await;
        tokio::time::timeout(WAIT, done.notified())
            .await
            .expect("ten jobs handled");
        running.shutdown().await.expect("shutdown");
        assert_eq!(calls.load(Ordering::SeqCst), 10);
        assert_eq!(
            broker_counts(&vhost, &queue),
            (0, 0),
            "round {round}: every handled job acked before the channel closed"
        );
    }
}

/// Faults moved to `_error` (a confirmed publish, then the ack) interleave with plain acks
/// at concurrency 8: a `multiple` ack that covered a delivery still on its way to `_error`,
/// or an ack the broker no longer knows, would close the channel and redeliver. Counted
/// exactly: each job handled once, every fifth in `_error`, nothing left unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_and_acks_interleaved_are_each_settled_once() {
    init_tracing();
    let vhost = TestVhost::create("acks-mixed");
    let transport: RabbitMq = transport_for(&vhost.url());
    let queue = unique("acks-mixed");
    let calls = Arc::new(AtomicUsize::new(0));
    let redelivered = Arc::new(AtomicUsize::new(0));
    let bus = {
        let (calls, redelivered) = (calls.clone(), redelivered.clone());
        Bus::builder()
            .transport(transport.clone())
            .receive_endpoint(queue.clone(), move |e| {
                e.prefetch(16)
                    .concurrency_limit(8)
                    .retry(Retry::none())
                    .handler(move |ctx: ConsumeContext<Job>| {
                        let (calls, redelivered) = (calls.clone(), redelivered.clone());
                        async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            if ctx.redelivered() {
                                redelivered.fetch_add(1, Ordering::SeqCst);
                            }
                            let n = ctx.message().n;
                            // Uneven handling times so deliveries finish out of order.
                            tokio::time::sleep(Duration::from_micros(u64::from(n % 7) * 300)).await;
                            if n.is_multiple_of(5) {
                                Err(ConsumeError::msg("every fifth job fails"))
                            } else {
                                Ok(())
                            }
                        }
                    })
            })
            .build()
            .await
            .expect("build")
    };
    let running = bus.start().await.expect("start");
    send_all(&bus, &queue, 0..500).await;
    let error_queue = format!("{queue}_error");
    wait_until(WAIT, "500 jobs handled", || {
        calls.load(Ordering::SeqCst) >= 500
    })
    .await;
    // Settling lags the handler a little; the counts must come out exact.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let errors = transport.queue_depth(&error_queue).await.unwrap_or(0);
        if errors == 100 && broker_counts(&vhost, &queue) == (0, 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 20 s: {errors} in `_error`, broker counts {:?}",
            broker_counts(&vhost, &queue)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await.expect("shutdown");
    assert_eq!(calls.load(Ordering::SeqCst), 500, "each job handled once");
    assert_eq!(redelivered.load(Ordering::SeqCst), 0, "nothing redelivered");
    assert_eq!(
        transport.queue_depth(&error_queue).await.expect("depth"),
        100
    );
    assert_eq!(broker_counts(&vhost, &queue), (0, 0));
    transport.close().await.expect("close");
}
