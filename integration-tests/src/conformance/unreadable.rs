//! Messages that cannot be read.

use super::*;

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
