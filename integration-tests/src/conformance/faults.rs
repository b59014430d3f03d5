//! Faults: error and skipped queues, fault headers, panics, timeouts, fault events.

use super::*;

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
    assert_eq!(depth(fixture, &t, &format!("{name}_error")).await, 0);
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
    let faults = Recorder::<(Fault<FaultSource>, Envelope)>::default();
    let listen = faults.record(|ctx: &ConsumeContext<Fault<FaultSource>>| {
        (
            ctx.message().clone(),
            ctx.receive_context().envelope().clone(),
        )
    });
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(failing.clone(), |e| {
                e.handler(|_: ConsumeContext<FaultSource>| async { Err(PaymentDeclined.into()) })
            })
            .receive_endpoint(listener.clone(), move |e| e.temporary().handler(listen)),
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
    let (fault, envelope) = faults.wait_for(1, WAIT, "the fault is consumed").await[0].clone();
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
