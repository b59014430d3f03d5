//! Ids, conversation and trace context carried through chains of messages.

use super::*;

#[derive(Debug, Clone)]
struct Seen {
    envelope: Envelope,
    input_address: String,
}

/// Correlation and conversation ids flow through a publish chain A → B → C; initiator ids
/// point at the cause; non-`MT-` headers are carried; source addresses are the endpoints.
pub async fn ids_propagate_through_publish_chains<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let (a, b, c) = (unique("chain-a"), unique("chain-b"), unique("chain-c"));
    let seen = Recorder::<(char, Seen)>::default();
    fn saw<M: Message>(k: char) -> impl Fn(&ConsumeContext<M>) -> (char, Seen) {
        move |ctx| {
            let seen = Seen {
                envelope: ctx.receive_context().envelope().clone(),
                input_address: ctx.input_address().to_string(),
            };
            (k, seen)
        }
    }
    let on_a = seen.record_then(saw::<ChainA>('a'), |ctx| async move {
        ctx.publish(ChainB { n: 2 }).await?;
        Ok(())
    });
    let on_b = seen.record_then(saw::<ChainB>('b'), |ctx| async move {
        ctx.publish(ChainC { n: 3 }).await?;
        Ok(())
    });
    let on_c = seen.record(saw::<ChainC>('c'));
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(a.clone(), move |e| e.temporary().handler(on_a))
            .receive_endpoint(b.clone(), move |e| e.temporary().handler(on_b))
            .receive_endpoint(c.clone(), move |e| e.temporary().handler(on_c)),
    )
    .await;
    let running = bus.start().await.expect("start");
    let correlation = Uuid::now_v7();
    bus.publish(ChainA { n: 1 })
        .correlation_id(correlation)
        .header("Tenant", "acme")
        .header("MT-Custom", "not carried")
        .await
        .expect("publish");
    let seen = seen.wait_for(3, WAIT, "the chain completes").await;
    let get = |k: char| {
        seen.iter()
            .find(|(x, _)| *x == k)
            .map(|(_, s)| s.clone())
            .expect("seen")
    };
    let (sa, sb, sc) = (get('a'), get('b'), get('c'));
    let conversation = sa
        .envelope
        .conversation_id
        .expect("a conversation id is always set");
    assert_eq!(sa.envelope.correlation_id, Some(correlation));
    assert_eq!(sa.envelope.source_address.as_deref(), Some(bus.address()));
    for s in [&sb, &sc] {
        assert_eq!(
            s.envelope.conversation_id,
            Some(conversation),
            "conversation carried"
        );
        assert_eq!(
            s.envelope.correlation_id,
            Some(correlation),
            "correlation carried"
        );
        assert_eq!(
            s.envelope.initiator_id,
            Some(correlation),
            "initiator = the cause's correlation id"
        );
        assert_eq!(
            s.envelope.headers.get_str("Tenant").as_deref(),
            Some("acme")
        );
        assert!(
            !s.envelope.headers.contains("MT-Custom"),
            "MT- headers are not carried"
        );
    }
    assert_eq!(
        sb.envelope.source_address.as_deref(),
        Some(sa.input_address.as_str())
    );
    assert_eq!(
        sc.envelope.source_address.as_deref(),
        Some(sb.input_address.as_str())
    );
    assert_ne!(sb.envelope.message_id, sa.envelope.message_id);
    running.shutdown().await.expect("shutdown");
}

/// The W3C `traceparent` travels with messages: a consume continues the producer's trace,
/// and messages published while consuming stay in the same trace.
pub async fn traceparent_propagates<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let (a, b) = (unique("traced"), unique("traced-next"));
    let traces = Recorder::<(char, busway::TraceContext, Option<busway::TraceContext>)>::default();
    fn traced<M: Message>(
        k: char,
    ) -> impl Fn(&ConsumeContext<M>) -> (char, busway::TraceContext, Option<busway::TraceContext>)
    {
        move |ctx| {
            let rc = ctx.receive_context();
            (k, rc.trace_context(), rc.parent_trace_context())
        }
    }
    let on_a = traces.record_then(traced::<Traced>('a'), |ctx| async move {
        // Published through the bus handle, not the context: the task-local trace context
        // still links it.
        ctx.bus().publish(TracedNext { n: 2 }).await?;
        Ok(())
    });
    let on_b = traces.record(traced::<TracedNext>('b'));
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(a.clone(), move |e| e.temporary().handler(on_a))
            .receive_endpoint(b.clone(), move |e| e.temporary().handler(on_b)),
    )
    .await;
    let running = bus.start().await.expect("start");
    let root = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    bus.publish(Traced { n: 1 })
        .header(names::TRACEPARENT, root)
        .await
        .expect("publish");
    let traces = traces.wait_for(2, WAIT, "both consumed").await;
    let (_, a_trace, a_parent) = traces
        .iter()
        .find(|(k, _, _)| *k == 'a')
        .cloned()
        .expect("a");
    let (_, b_trace, b_parent) = traces
        .iter()
        .find(|(k, _, _)| *k == 'b')
        .cloned()
        .expect("b");
    assert_eq!(
        a_parent.map(|p| p.span_id()),
        Some("00f067aa0ba902b7".to_string())
    );
    assert_eq!(
        a_trace.trace_id(),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "the consume continues the trace"
    );
    assert_eq!(
        b_trace.trace_id(),
        a_trace.trace_id(),
        "the next hop stays in the trace"
    );
    let b_parent = b_parent.expect("b carries a traceparent");
    assert_ne!(
        b_parent.span_id(),
        a_trace.span_id(),
        "the publish has its own producer span"
    );
    running.shutdown().await.expect("shutdown");
}
