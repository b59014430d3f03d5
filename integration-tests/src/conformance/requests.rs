//! Request/response through the bus's response endpoint.

use super::*;

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
    let response_address = Recorder::<Option<String>>::default();
    let answer = response_address.record_then(
        |ctx: &ConsumeContext<Question>| ctx.response_address().map(str::to_string),
        |ctx| async move {
            ctx.respond(Answer {
                n: ctx.message().n * 2,
            })
            .await?;
            Ok(())
        },
    );
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(answering.clone(), move |e| e.temporary().handler(answer)),
    )
    .await;
    let running = bus.start().await.expect("start");
    let first = bus
        .request_client::<Question>()
        .get_response::<Answer>(Question { n: 1 })
        .await
        .expect("a response");
    assert_eq!(first.n, 2);
    let address = response_address.entries()[0]
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
        depth(fixture, &t, &error_queue).await,
        0,
        "a late response went to {error_queue}"
    );
    running.shutdown().await.expect("shutdown");
}
