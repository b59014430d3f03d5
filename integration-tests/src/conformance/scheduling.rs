//! Scheduled sends.

use super::*;

/// A scheduled send is delivered after its delay, not before.
pub async fn scheduled_send_waits<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let name = unique("scheduled");
    let at = Recorder::<std::time::Instant>::default();
    let handler = at.record(|_: &ConsumeContext<Scheduled>| std::time::Instant::now());
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(name.clone(), move |e| e.temporary().handler(handler)),
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
    let arrived = at.wait_for(1, WAIT, "the scheduled message arrives").await[0];
    assert!(
        arrived.duration_since(sent) >= Duration::from_millis(450),
        "delivered after the delay"
    );
    running.shutdown().await.expect("shutdown");
}
