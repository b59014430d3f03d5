//! Retries and delayed redelivery.

use super::*;

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
        depth(fixture, &t, &format!("{recovering}_error")).await,
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
    let seen_counts = Recorder::<u32>::default();
    let attempts_x = Counter::default();
    let redelivered = seen_counts.record_then(
        |ctx: &ConsumeContext<Redelivered>| ctx.redelivery_count(),
        |ctx| async move {
            if ctx.redelivery_count() < 2 {
                return Err(ConsumeError::msg("try again later"));
            }
            Ok(())
        },
    );
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
                .handler(redelivered)
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
    seen_counts.wait_for(3, WAIT, "the third delivery").await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "two redeliveries waited their intervals"
    );
    assert_eq!(seen_counts.entries(), vec![0, 1, 2]);
    let errors = take_queue(fixture, &t, &format!("{exhausted}_error"), 1, WAIT).await;
    assert_eq!(attempts_x.get(), 4, "(1 + 1 retry) × (1 + 1 redelivery)");
    assert_eq!(header(&errors[0], names::REDELIVERY_COUNT), "1");
    assert_eq!(header(&errors[0], names::FAULT_REDELIVERY_COUNT), "1");
    assert_eq!(header(&errors[0], names::FAULT_RETRY_COUNT), "1");
    running.shutdown().await.expect("shutdown");
    assert_eq!(depth(fixture, &t, &format!("{name}_error")).await, 0);
    cleanup(fixture, &t, &[&name, &exhausted]).await;
}
