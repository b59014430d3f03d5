//! Scheduled sends.

use super::*;

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
