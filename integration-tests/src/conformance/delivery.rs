//! Delivery: fan-out, competing consumers, prefetch.

use super::*;

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
    let seen = Recorder::<(usize, u64)>::default();
    let mut buses = Vec::new();
    let mut running = Vec::new();
    for instance in 0..2 {
        let handler = seen.record_then(
            move |ctx: &ConsumeContext<Competing>| (instance, ctx.message().n),
            |_| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            },
        );
        let bus = build::<F>(
            &t,
            Bus::builder().receive_endpoint(name.clone(), move |e| e.prefetch(1).handler(handler)),
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
    seen.wait_for(60, WAIT, "60 messages consumed").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.entries();
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
