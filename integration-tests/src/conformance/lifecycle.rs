//! Shutdown: draining and the deadline.

use super::*;

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
        depth(fixture, &t, &name).await,
        2,
        "the two messages not yet taken stay on the queue"
    );
    assert_eq!(depth(fixture, &t, &format!("{name}_error")).await, 0);
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
        async move { depth(fixture, &t2, &name).await == 1 }
    })
    .await;
    assert_eq!(
        depth(fixture, &t, &format!("{name}_error")).await,
        0,
        "not faulted"
    );
    cleanup(fixture, &t, &[&name]).await;
}
