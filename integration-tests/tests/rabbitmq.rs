//! The conformance suite on RabbitMQ (127.0.0.1:5672, guest/guest, or `BUSWAY_RABBITMQ_URL`).
//! Each test uses uniquely named endpoints and deletes its queues afterwards.

use async_trait::async_trait;
use busway::rabbitmq::RabbitMq;
use busway_integration_tests::TransportFixture;
use busway_integration_tests::rabbit::{transport_for, url};

struct RabbitFixture;

#[async_trait]
impl TransportFixture for RabbitFixture {
    type Transport = RabbitMq;

    fn name(&self) -> &'static str {
        "RabbitMQ"
    }

    async fn transport(&self) -> RabbitMq {
        transport_for(&url())
    }
}

busway_integration_tests::conformance_suite!(RabbitFixture);

// ---- RabbitMQ-specific tests -------------------------------------------------------------

mod rabbit_specific {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use busway::headers::names;
    use busway::prelude::*;
    use busway::rabbitmq::RabbitMqEndpointExt;
    use busway::transport::QueueAdmin;
    use busway::{Address, Transport, TransportMessage};
    use busway_integration_tests::rabbit::{TestVhost, raw, transport_for};
    use busway_integration_tests::support::{
        Counter, Recorder, header, init_tracing, unique, wait_until,
    };
    use chrono::{DateTime, Utc};
    use futures_util::StreamExt;
    use lapin::options::*;
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use lapin::{Connection, ConnectionProperties, ExchangeKind};
    use rust_decimal::Decimal;
    use serde::{Deserialize, Serialize};
    use serde_json::Value;
    use uuid::Uuid;

    const WAIT: Duration = Duration::from_secs(20);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:SubmitOrder")]
    struct SubmitOrder {
        order_id: Uuid,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:ChargeCard")]
    struct ChargeCard {
        amount: Decimal,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:RefundCard")]
    struct RefundCard {
        amount: Decimal,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:OrderPlaced")]
    struct OrderPlaced {
        order_id: Uuid,
        customer_id: Uuid,
        total: Decimal,
        occurred_at: DateTime<Utc>,
    }

    struct SubmitOrderConsumer;

    impl Consumer<SubmitOrder> for SubmitOrderConsumer {
        async fn consume(&self, _: &ConsumeContext<SubmitOrder>) -> Result<(), ConsumeError> {
            Err(ConsumeError::msg("rejected"))
        }
    }

    fn row_set(rows: &[Value], keys: &[&str]) -> BTreeSet<String> {
        rows.iter()
            .map(|r| {
                keys.iter()
                    .map(|k| r[*k].to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// After start, the broker holds exactly what MassTransit declares for the same consumers;
    /// error and skipped queues appear on first use.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topology_matches_masstransit() {
        init_tracing();
        let vhost = TestVhost::create("topology");
        let transport = transport_for(&vhost.url());
        let bus = Bus::builder()
            .transport(transport.clone())
            .consumer(SubmitOrderConsumer)
            .receive_endpoint("billing", |e| {
                e.handler(|_: ConsumeContext<ChargeCard>| async { Ok(()) })
                    .handler(|_: ConsumeContext<RefundCard>| async { Ok(()) })
            })
            .receive_endpoint("ledger", |e| {
                e.quorum_queue()
                    .handler(|_: ConsumeContext<ChargeCard>| async { Ok(()) })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");

        let exchanges = vhost.list(
            "list_exchanges",
            &["name", "type", "durable", "auto_delete"],
        );
        let exchanges: Vec<Value> = exchanges
            .into_iter()
            .filter(|e| {
                let n = e["name"].as_str().unwrap_or_default();
                !n.is_empty() && !n.starts_with("amq.")
            })
            .collect();
        assert_eq!(
            row_set(&exchanges, &["name", "type", "durable", "auto_delete"]),
            set(&[
                r#""Contracts:ChargeCard" "fanout" true false"#,
                r#""Contracts:RefundCard" "fanout" true false"#,
                r#""Contracts:SubmitOrder" "fanout" true false"#,
                r#""billing" "fanout" true false"#,
                r#""ledger" "fanout" true false"#,
                r#""submit-order" "fanout" true false"#,
            ])
        );
        let queues = vhost.list("list_queues", &["name", "durable", "auto_delete", "type"]);
        assert_eq!(
            row_set(&queues, &["name", "durable", "auto_delete", "type"]),
            set(&[
                r#""billing" true false "classic""#,
                r#""ledger" true false "quorum""#,
                r#""submit-order" true false "classic""#,
            ])
        );
        let bindings: Vec<Value> = vhost
            .list(
                "list_bindings",
                &[
                    "source_name",
                    "destination_name",
                    "destination_kind",
                    "routing_key",
                ],
            )
            .into_iter()
            .filter(|b| b["source_name"] != "")
            .collect();
        assert_eq!(
            row_set(
                &bindings,
                &["source_name", "destination_name", "destination_kind"]
            ),
            set(&[
                r#""Contracts:ChargeCard" "billing" "exchange""#,
                r#""Contracts:ChargeCard" "ledger" "exchange""#,
                r#""Contracts:RefundCard" "billing" "exchange""#,
                r#""Contracts:SubmitOrder" "submit-order" "exchange""#,
                r#""billing" "billing" "queue""#,
                r#""ledger" "ledger" "queue""#,
                r#""submit-order" "submit-order" "queue""#,
            ])
        );

        // A fault declares submit-order_error and publishes Fault<SubmitOrder>.
        bus.publish(SubmitOrder {
            order_id: Uuid::now_v7(),
        })
        .await
        .expect("publish");
        let errors = busway_integration_tests::support::take_queue(
            &RabbitProbe(transport.clone()),
            &transport,
            "submit-order_error",
            1,
            WAIT,
        )
        .await;
        assert_eq!(header(&errors[0], names::REASON), "fault");
        let queues = vhost.list("list_queues", &["name"]);
        assert!(row_set(&queues, &["name"]).contains(r#""submit-order_error""#));
        let exchanges = vhost.list("list_exchanges", &["name"]);
        let names_now = row_set(&exchanges, &["name"]);
        assert!(names_now.contains(r#""submit-order_error""#));
        assert!(
            names_now.contains(r#""MassTransit:Fault--Contracts:SubmitOrder--""#),
            "{names_now:?}"
        );
        assert!(names_now.contains(r#""MassTransit:Fault""#));
        running.shutdown().await.expect("shutdown");
    }

    /// A [`busway_integration_tests::TransportFixture`] for the vhost-scoped tests.
    struct RabbitProbe(busway::rabbitmq::RabbitMq);

    #[async_trait::async_trait]
    impl busway_integration_tests::TransportFixture for RabbitProbe {
        type Transport = busway::rabbitmq::RabbitMq;
        fn name(&self) -> &'static str {
            "RabbitMQ"
        }
        async fn transport(&self) -> Self::Transport {
            self.0.clone()
        }
    }

    async fn raw_connection(url: &str) -> Connection {
        Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("a raw AMQP connection")
    }

    /// What a MassTransit service publishes for `Contracts.OrderPlaced` (System.Text.Json
    /// envelope, camelCase, decimals as strings) reaches a busway consumer of
    /// `urn:message:Contracts:OrderPlaced`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_masstransit_publish_reaches_a_busway_consumer() {
        init_tracing();
        let vhost = TestVhost::create("interop-in");
        let got = Arc::new(Mutex::new(Vec::<(
            OrderPlaced,
            Option<Uuid>,
            Option<String>,
            Option<String>,
        )>::new()));
        let g = got.clone();
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("order-confirmation", move |e| {
                e.handler(move |ctx: ConsumeContext<OrderPlaced>| {
                    let g = g.clone();
                    async move {
                        g.lock().expect("lock").push((
                            ctx.message().clone(),
                            ctx.conversation_id(),
                            ctx.source_address().map(str::to_string),
                            ctx.headers().get_str("Tenant").map(|s| s.into_owned()),
                        ));
                        Ok(())
                    }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");

        let envelope = r#"{
  "messageId": "181c0000-6393-3630-36a4-08daf4e7c6da",
  "requestId": null,
  "correlationId": null,
  "conversationId": "181c0000-6393-3630-7cc2-08daf4e7c6db",
  "initiatorId": null,
  "sourceAddress": "rabbitmq://localhost/DESKTOP_OrderService_bus_abc",
  "destinationAddress": "rabbitmq://localhost/Contracts:OrderPlaced",
  "responseAddress": null,
  "faultAddress": null,
  "messageType": [
    "urn:message:Contracts:OrderPlaced"
  ],
  "message": {
    "orderId": "0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4",
    "customerId": "8a7f4c3a-14a9-4a4e-b1d3-8f3e2c1b0a99",
    "total": "12.50",
    "occurredAt": "2026-11-28T10:00:00.1234567Z"
  },
  "expirationTime": null,
  "sentTime": "2026-11-28T10:00:00.2345678Z",
  "headers": { "Tenant": "acme" },
  "host": {
    "machineName": "DESKTOP", "processName": "OrderService", "processId": 4242,
    "assembly": "OrderService", "assemblyVersion": "1.0.0.0", "frameworkVersion": "8.0.1",
    "massTransitVersion": "8.5.8.0", "operatingSystemVersion": "Unix 6.1.0"
  }
}"#;
        let (conn, channel) = raw::channel(&vhost.url()).await;
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("Tenant"),
            AMQPValue::LongString("acme".into()),
        );
        raw::publish(
            &channel,
            "Contracts:OrderPlaced",
            envelope.as_bytes(),
            raw::masstransit_properties()
                .with_message_id(ShortString::from("181c0000-6393-3630-36a4-08daf4e7c6da"))
                .with_headers(headers),
        )
        .await;
        wait_until(WAIT, "the busway consumer got it", || {
            !got.lock().expect("lock").is_empty()
        })
        .await;
        let (message, conversation, source, tenant) = got.lock().expect("lock")[0].clone();
        assert_eq!(
            message.order_id.to_string(),
            "0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4"
        );
        assert_eq!(message.total.to_string(), "12.50");
        assert_eq!(message.occurred_at.timestamp(), 1_795_860_000);
        assert_eq!(
            conversation.map(|c| c.to_string()).as_deref(),
            Some("181c0000-6393-3630-7cc2-08daf4e7c6db")
        );
        assert_eq!(
            source.as_deref(),
            Some("rabbitmq://localhost/DESKTOP_OrderService_bus_abc")
        );
        assert_eq!(tenant.as_deref(), Some("acme"));
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// A busway publish reaches a MassTransit-style endpoint bound to the same message type
    /// exchange, with MassTransit's properties and envelope.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busway_publish_reaches_a_masstransit_endpoint() {
        init_tracing();
        let vhost = TestVhost::create("interop-out");
        let conn = raw_connection(&vhost.url()).await;
        let ch = conn.create_channel().await.expect("channel");
        // What MassTransit declares for a receive endpoint `mt-orders` consuming OrderPlaced.
        for (name, kind) in [
            ("mt-orders", ExchangeKind::Fanout),
            ("Contracts:OrderPlaced", ExchangeKind::Fanout),
        ] {
            ch.exchange_declare(
                ShortString::from(name),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        }
        ch.queue_declare(
            ShortString::from("mt-orders"),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
        ch.queue_bind(
            ShortString::from("mt-orders"),
            ShortString::from("mt-orders"),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        ch.exchange_bind(
            ShortString::from("mt-orders"),
            ShortString::from("Contracts:OrderPlaced"),
            ShortString::from(""),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("e2e bind");

        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .build()
            .await
            .expect("build");
        let order = OrderPlaced {
            order_id: Uuid::now_v7(),
            customer_id: Uuid::now_v7(),
            total: Decimal::new(1250, 2),
            occurred_at: Utc::now(),
        };
        let correlation = Uuid::now_v7();
        bus.publish(order.clone())
            .correlation_id(correlation)
            .header("Tenant", "acme")
            .await
            .expect("publish");

        let mut consumer = ch
            .basic_consume(
                ShortString::from("mt-orders"),
                ShortString::from("mt"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("a delivery")
            .expect("no error");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        let props = &delivery.properties;
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/vnd.masstransit+json")
        );
        assert_eq!(props.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            props
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            Some(correlation.to_string())
        );
        let amqp_headers = props.headers().as_ref().expect("a headers table");
        assert_eq!(
            amqp_headers.inner().get("Tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
        assert!(
            amqp_headers.inner().contains_key("MT-Activity-Id"),
            "trace context for MassTransit"
        );
        assert_eq!(delivery.exchange.as_str(), "Contracts:OrderPlaced");

        let body: Value = serde_json::from_slice(&delivery.data).expect("JSON envelope");
        for key in [
            "messageId",
            "requestId",
            "correlationId",
            "conversationId",
            "initiatorId",
            "sourceAddress",
            "destinationAddress",
            "responseAddress",
            "faultAddress",
            "messageType",
            "message",
            "expirationTime",
            "sentTime",
            "headers",
            "host",
        ] {
            assert!(body.get(key).is_some(), "envelope field {key}");
        }
        assert_eq!(
            body["messageId"].as_str(),
            props.message_id().as_ref().map(|s| s.as_str())
        );
        assert_eq!(
            body["messageType"],
            serde_json::json!(["urn:message:Contracts:OrderPlaced"])
        );
        assert_eq!(body["message"]["orderId"], order.order_id.to_string());
        assert_eq!(
            body["message"]["total"], "12.50",
            "decimals as strings, like System.Text.Json in MassTransit"
        );
        assert_eq!(
            body["destinationAddress"],
            format!(
                "rabbitmq://127.0.0.1/{}/Contracts:OrderPlaced",
                vhost.name()
            )
        );
        assert_eq!(body["sourceAddress"].as_str(), Some(bus.address()));
        assert!(bus.address().ends_with("?temporary=true"));
        assert_eq!(body["headers"]["Tenant"], "acme");
        assert!(body["host"]["machineName"].is_string());
        assert!(body["host"]["processId"].is_number());
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// Invalid JSON, a wrong content type, invalid UTF-8 and a 10 MB body each end in
    /// `_error`; the endpoint keeps consuming.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_bodies_end_in_the_error_queue() {
        init_tracing();
        let t = transport_for(&busway_integration_tests::rabbit::url());
        let name = unique("malformed");
        let ok = Counter::default();
        let o = ok.clone();
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(name.clone(), move |e| {
                e.handler(move |_: ConsumeContext<SubmitOrder>| {
                    let o = o.clone();
                    async move {
                        o.incr();
                        Ok(())
                    }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let address = Address::queue(name.clone());
        let raw = |body: Vec<u8>, ct: &str| {
            TransportMessage::new(body)
                .with_content_type(ct)
                .with_message_id(Uuid::now_v7().to_string())
        };
        let big = vec![b'x'; 10 * 1024 * 1024];
        let bodies = vec![
            raw(
                b"{\"message\": ".to_vec(),
                "application/vnd.masstransit+json",
            ),
            raw(b"{}".to_vec(), "text/csv"),
            raw(
                vec![0xff, 0xfe, 0x00, 0x80],
                "application/vnd.masstransit+json",
            ),
            raw(big.clone(), "application/vnd.masstransit+json"),
        ];
        for m in bodies {
            t.send(&address, m, &Default::default())
                .await
                .expect("raw send");
        }
        bus.send(
            format!("queue:{name}"),
            SubmitOrder {
                order_id: Uuid::now_v7(),
            },
        )
        .await
        .expect("send");
        let errors = busway_integration_tests::support::take_queue(
            &RabbitProbe(t.clone()),
            &t,
            &format!("{name}_error"),
            4,
            WAIT,
        )
        .await;
        assert_eq!(errors.len(), 4);
        for m in &errors {
            assert_eq!(header(m, names::REASON), "fault");
            assert_eq!(
                header(m, names::FAULT_EXCEPTION_TYPE),
                "busway::DeserializeError"
            );
            assert!(!header(m, names::FAULT_MESSAGE).is_empty());
        }
        assert!(
            errors.iter().any(|m| m.body.len() == big.len()),
            "the 10 MB body is kept whole"
        );
        assert!(
            errors
                .iter()
                .any(|m| header(m, names::FAULT_MESSAGE).contains("text/csv"))
        );
        wait_until(WAIT, "the endpoint still consumes", || ok.get() == 1).await;
        running.shutdown().await.expect("shutdown");
        t.delete_queues(&[
            name.clone(),
            format!("{name}_error"),
            format!("{name}_skipped"),
        ])
        .await
        .expect("cleanup");
    }

    /// A send to `exchange:` with nothing bound is returned by the broker: an error to the
    /// caller, not a silent loss. A bad URL fails at build with the URL in the message and
    /// without the password.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unroutable_sends_and_unreachable_brokers_are_errors() {
        init_tracing();
        let t = transport_for(&busway_integration_tests::rabbit::url());
        let bus = Bus::builder()
            .transport(t.clone())
            .build()
            .await
            .expect("build");
        let lonely = unique("nobody-bound");
        let err = bus
            .send(
                format!("exchange:{lonely}"),
                SubmitOrder {
                    order_id: Uuid::now_v7(),
                },
            )
            .await
            .expect_err("returned");
        assert!(err.is_transport(), "{err}");
        assert!(err.to_string().contains("returned"), "{err}");
        t.delete_queues(&[lonely]).await.expect("cleanup");

        let unreachable =
            busway::rabbitmq::RabbitMq::builder("amqp://guest:s3cret@127.0.0.1:1/%2f")
                .connect_timeout(Duration::from_millis(500))
                .build()
                .expect("valid url");
        let err = Bus::builder()
            .transport(unreachable)
            .build()
            .await
            .expect_err("no broker there");
        let text = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(err.is_transport(), "{text}");
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("rabbitmq-server -detached"), "{text}");
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:CheckOrder")]
    struct CheckOrder {
        order_id: Uuid,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:OrderStatus")]
    struct OrderStatus {
        order_id: Uuid,
        status: String,
    }

    /// Issue 14.5: message type URNs match without regard to case, as MassTransit's do
    /// (`MessageUrn` comparisons are ordinal-ignore-case). A MassTransit sender whose contract
    /// is named `urn:message:contracts:checkorder` reaches a busway consumer of
    /// `urn:message:Contracts:CheckOrder` instead of `_skipped`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn message_type_urns_match_in_any_case() {
        init_tracing();
        let vhost = TestVhost::create("interop-case");
        let got = Counter::default();
        let g = got.clone();
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("order-lookup", move |e| {
                e.handler(move |ctx: ConsumeContext<CheckOrder>| {
                    assert_eq!(
                        ctx.message().order_id.to_string(),
                        "0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4"
                    );
                    g.incr();
                    async { Ok(()) }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let envelope = r#"{"messageId":"181c0000-6393-3630-36a4-08daf4e7c6e1","conversationId":"181c0000-6393-3630-7cc2-08daf4e7c6e2","sourceAddress":"rabbitmq://localhost/DESKTOP_Lookup_bus_abc","destinationAddress":"rabbitmq://localhost/order-lookup","messageType":["urn:message:contracts:checkorder"],"message":{"orderId":"0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4"},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{},"host":{"machineName":"DESKTOP","processName":"Lookup","processId":1,"assembly":"Lookup","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}"#;
        let (conn, channel) = raw::channel(&vhost.url()).await;
        raw::publish(
            &channel,
            "order-lookup",
            envelope.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        wait_until(WAIT, "the consumer got the differently cased type", || {
            got.get() == 1
        })
        .await;
        running.shutdown().await.expect("shutdown");
        let skipped = vhost.list("list_queues", &["name", "messages"]);
        assert!(
            skipped
                .iter()
                .all(|q| q["name"] != "order-lookup_skipped" || q["messages"] == 0),
            "{skipped:?}"
        );
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// Issue 14.7: a message a MassTransit service sent while consuming (so it carries the
    /// busway producer's old `traceparent` next to its own fresh `MT-Activity-Id`, which is
    /// all MassTransit writes) and that RabbitMQ dead-lettered once (`x-death`,
    /// `x-first-death-*`): the busway consumer continues MassTransit's trace, and what it
    /// publishes carries the application header but none of the broker's bookkeeping.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_messages_keep_the_trace_and_drop_broker_headers() {
        init_tracing();
        let vhost = TestVhost::create("interop-forwarded");
        let parents = Recorder::<Option<busway::TraceContext>>::default();
        let next_headers = Recorder::<busway::Headers>::default();
        let on_check = parents.record_then(
            |ctx: &ConsumeContext<CheckOrder>| ctx.receive_context().parent_trace_context(),
            |ctx| async move {
                ctx.publish(OrderStatus {
                    order_id: ctx.message().order_id,
                    status: "checked".into(),
                })
                .await?;
                Ok(())
            },
        );
        let on_status =
            next_headers.record(|ctx: &ConsumeContext<OrderStatus>| ctx.headers().clone());
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("order-check", move |e| e.handler(on_check))
            .receive_endpoint("order-status", move |e| e.handler(on_status))
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let stale = "00-11111111111111111111111111111111-2222222222222222-01";
        let fresh = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        // MassTransit carries non-MT headers in the envelope (traceparent, Tenant) and writes
        // MT-Activity-Id as a transport header; RabbitMQ added the dead-letter history.
        let envelope = format!(
            r#"{{"messageId":"181c0000-6393-3630-36a4-08daf4e7c6f1","conversationId":"181c0000-6393-3630-7cc2-08daf4e7c6f2","sourceAddress":"rabbitmq://localhost/order-service","destinationAddress":"rabbitmq://localhost/order-check","messageType":["urn:message:Contracts:CheckOrder"],"message":{{"orderId":"0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4"}},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{{"traceparent":"{stale}","Tenant":"acme"}},"host":{{"machineName":"DESKTOP","processName":"OrderService","processId":1,"assembly":"OrderService","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}}}"#
        );
        let mut death = FieldTable::default();
        death.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
        death.insert(
            ShortString::from("reason"),
            AMQPValue::LongString("expired".into()),
        );
        death.insert(
            ShortString::from("queue"),
            AMQPValue::LongString("order-check-wait".into()),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("MT-Activity-Id"),
            AMQPValue::LongString(fresh.into()),
        );
        headers.insert(
            ShortString::from("x-death"),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        headers.insert(
            ShortString::from("x-first-death-reason"),
            AMQPValue::LongString("expired".into()),
        );
        headers.insert(
            ShortString::from("x-first-death-queue"),
            AMQPValue::LongString("order-check-wait".into()),
        );
        let (conn, channel) = raw::channel(&vhost.url()).await;
        raw::publish(
            &channel,
            "order-check",
            envelope.as_bytes(),
            raw::masstransit_properties().with_headers(headers),
        )
        .await;
        let parent =
            parents.wait_for(1, WAIT, "the check consumed").await[0].expect("a parent trace");
        assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id(), "00f067aa0ba902b7");
        let carried = next_headers.wait_for(1, WAIT, "the status consumed").await[0].clone();
        assert_eq!(carried.get_str("Tenant").as_deref(), Some("acme"));
        for leaked in ["x-death", "x-first-death-reason", "x-first-death-queue"] {
            assert!(
                carried.get(leaked).is_none(),
                "{leaked} leaked: {carried:?}"
            );
        }
        let trace = carried
            .get_str("traceparent")
            .expect("the next message has a traceparent");
        assert!(
            trace.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "the next message stays in MassTransit's trace: {trace}"
        );
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:RemindCustomer")]
    struct RemindCustomer {
        n: u32,
    }

    /// Issue 14.8: a scheduled send carries `MT-Scheduling-TokenId` (MassTransit's
    /// `ScheduleSendPipe` sets it) and returns a handle with that token; cancelling drops the
    /// message when it arrives (acknowledged, not consumed, not in `_skipped`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduled_sends_carry_a_token_and_can_be_cancelled() {
        init_tracing();
        let vhost = TestVhost::create("interop-schedule");
        let got = Recorder::<(u32, Option<String>)>::default();
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("reminders", {
                let on = got.record(|ctx: &ConsumeContext<RemindCustomer>| {
                    (
                        ctx.message().n,
                        ctx.headers()
                            .get_str("MT-Scheduling-TokenId")
                            .map(|s| s.into_owned()),
                    )
                });
                move |e| e.handler(on)
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let kept = bus
            .schedule_send(
                "queue:reminders",
                Duration::from_millis(300),
                RemindCustomer { n: 1 },
            )
            .await
            .expect("schedule");
        let cancelled = bus
            .schedule_send(
                "queue:reminders",
                Duration::from_millis(300),
                RemindCustomer { n: 2 },
            )
            .await
            .expect("schedule");
        assert_ne!(kept.token_id, cancelled.token_id);
        assert!(
            kept.destination.ends_with("/reminders"),
            "{}",
            kept.destination
        );
        bus.cancel_scheduled_send(&cancelled);
        let seen = got.wait_for(1, WAIT, "the kept reminder").await;
        assert_eq!(seen[0], (1, Some(kept.token_id.to_string())));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(got.len(), 1, "the cancelled reminder was not consumed");
        running.shutdown().await.expect("shutdown");
        let queues = vhost.list("list_queues", &["name", "messages"]);
        assert!(
            queues.iter().all(|q| q["messages"] == 0),
            "nothing left behind or skipped: {queues:?}"
        );
    }

    /// Issue 14.8: scheduling through a MassTransit scheduler endpoint (Quartz) sends
    /// `ScheduleMessage` and `CancelScheduledMessage` in MassTransit's shape
    /// (`ScheduleMessageCommand<T>`, `EndpointScheduleMessageProvider`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduling_through_a_masstransit_scheduler_endpoint() {
        init_tracing();
        let vhost = TestVhost::create("interop-quartz");
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("reminders", |e| {
                e.handler(|_: ConsumeContext<RemindCustomer>| async { Ok(()) })
            })
            .build()
            .await
            .expect("build");
        let (conn, channel) = raw::channel(&vhost.url()).await;
        // busway's send to `queue:quartz` declares the scheduler's queue (durable), as
        // MassTransit's Quartz endpoint has it.
        let at = chrono::Utc::now() + chrono::Duration::minutes(5);
        let handle = bus
            .schedule_send_via(
                "queue:quartz",
                "queue:reminders",
                at,
                RemindCustomer { n: 3 },
            )
            .await
            .expect("schedule via the scheduler");
        bus.cancel_scheduled_send_via("queue:quartz", &handle)
            .await
            .expect("cancel via the scheduler");
        let mut consumer = channel
            .basic_consume(
                ShortString::from("quartz"),
                ShortString::from("quartz"),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        async fn next(consumer: &mut lapin::Consumer) -> Value {
            let d = tokio::time::timeout(WAIT, consumer.next())
                .await
                .expect("a scheduler command in time")
                .expect("a delivery")
                .expect("a good delivery");
            serde_json::from_slice::<Value>(&d.data).expect("JSON")
        }
        let schedule = next(&mut consumer).await;
        assert_eq!(
            schedule["messageType"],
            serde_json::json!(["urn:message:MassTransit.Scheduling:ScheduleMessage"])
        );
        let m = &schedule["message"];
        assert_eq!(m["correlationId"], handle.token_id.to_string());
        assert_eq!(
            m["payloadType"],
            serde_json::json!(["urn:message:Contracts:RemindCustomer"])
        );
        assert_eq!(
            m["destination"],
            format!("rabbitmq://127.0.0.1/{}/reminders", vhost.name())
        );
        assert_eq!(m["payload"]["n"], 3);
        let when =
            chrono::DateTime::parse_from_rfc3339(m["scheduledTime"].as_str().expect("a time"))
                .expect("an RFC 3339 time");
        assert_eq!(when.timestamp(), at.timestamp());
        let cancel = next(&mut consumer).await;
        assert_eq!(
            cancel["messageType"],
            serde_json::json!(["urn:message:MassTransit.Scheduling:CancelScheduledMessage"])
        );
        assert_eq!(cancel["message"]["tokenId"], handle.token_id.to_string());
        assert!(cancel["message"]["timestamp"].is_string());
        let _ = conn.close(200, ShortString::from("done")).await;
        drop(bus);
    }

    /// Issue 14.8, recurring: `ScheduleRecurringMessage` and the cancel, pause and resume
    /// commands reach a MassTransit scheduler endpoint in MassTransit's shape
    /// (`ScheduleRecurringMessageCommand<T>`, `RecurringSchedule`, `MissedEventPolicy` as a
    /// number, `CancelScheduledRecurringMessageCommand`; `EndpointRecurringMessageScheduler`
    /// sends each to the scheduler's queue).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recurring_schedules_through_a_masstransit_scheduler_endpoint() {
        use busway::scheduling::{MissedEventPolicy, RecurringSchedule};
        init_tracing();
        let vhost = TestVhost::create("interop-recurring");
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .build()
            .await
            .expect("build");
        let (conn, channel) = raw::channel(&vhost.url()).await;
        let mut schedule = RecurringSchedule::new("DailyReminder", "Reminders", "0 0 6 * * ?");
        schedule.misfire_policy = MissedEventPolicy::Skip;
        schedule.time_zone_id = "Europe/Paris".into();
        let handle = bus
            .schedule_recurring_send_via(
                "queue:quartz",
                "queue:reminders",
                schedule.clone(),
                RemindCustomer { n: 9 },
            )
            .await
            .expect("schedule a recurring send");
        bus.pause_scheduled_recurring_send_via("queue:quartz", &handle)
            .await
            .expect("pause");
        bus.resume_scheduled_recurring_send_via("queue:quartz", &handle)
            .await
            .expect("resume");
        bus.cancel_scheduled_recurring_send_via("queue:quartz", &handle)
            .await
            .expect("cancel");
        let mut quartz = raw::consume(&channel, "quartz").await;
        let command = raw::next_json(&mut quartz, WAIT, "ScheduleRecurringMessage").await;
        assert_eq!(
            command["messageType"],
            serde_json::json!(["urn:message:MassTransit.Scheduling:ScheduleRecurringMessage"])
        );
        let m = &command["message"];
        assert!(
            m["correlationId"]
                .as_str()
                .is_some_and(|id| id.parse::<Uuid>().is_ok())
        );
        assert_eq!(
            m["payloadType"],
            serde_json::json!(["urn:message:Contracts:RemindCustomer"])
        );
        assert_eq!(
            m["destination"],
            format!("rabbitmq://127.0.0.1/{}/reminders", vhost.name())
        );
        assert_eq!(m["payload"]["n"], 9);
        let s = &m["schedule"];
        let fields: BTreeSet<&str> = s
            .as_object()
            .expect("a schedule object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields,
            BTreeSet::from([
                "timeZoneId",
                "startTime",
                "endTime",
                "scheduleId",
                "scheduleGroup",
                "cronExpression",
                "description",
                "misfirePolicy"
            ]),
            "RecurringSchedule's eight properties"
        );
        assert_eq!(s["scheduleId"], "DailyReminder");
        assert_eq!(s["scheduleGroup"], "Reminders");
        assert_eq!(s["cronExpression"], "0 0 6 * * ?");
        assert_eq!(s["timeZoneId"], "Europe/Paris");
        assert_eq!(s["misfirePolicy"], 1, "MissedEventPolicy.Skip as a number");
        assert_eq!(s["endTime"], Value::Null);
        let start = DateTime::parse_from_rfc3339(s["startTime"].as_str().expect("a time"))
            .expect("a DateTimeOffset");
        assert_eq!(
            start.timestamp_micros(),
            schedule.start_time.timestamp_micros()
        );
        for kind in ["Pause", "Resume", "Cancel"] {
            let command = raw::next_json(&mut quartz, WAIT, kind).await;
            assert_eq!(
                command["messageType"],
                serde_json::json!([format!(
                    "urn:message:MassTransit.Scheduling:{kind}ScheduledRecurringMessage"
                )])
            );
            let m = &command["message"];
            assert_eq!(m["scheduleId"], "DailyReminder");
            assert_eq!(m["scheduleGroup"], "Reminders");
            assert!(m["timestamp"].is_string() && m["correlationId"].is_string());
        }
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:OrderShipped")]
    struct OrderShipped {
        order_id: Uuid,
    }

    /// A .NET generic contract `Contracts.Tracked<T>`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:Tracked")]
    struct Tracked<T> {
        tracking_code: String,
        event: T,
    }

    /// Issue 14.4: MassTransit publishes `Contracts.Tracked<Contracts.OrderShipped>` with the
    /// URN `urn:message:Contracts:Tracked[[Contracts:OrderShipped]]` to the exchange
    /// `Contracts:Tracked--OrderShipped--` (`DefaultMessageNameFormatter` leaves out an
    /// argument's namespace when it is the generic type's); a busway consumer of
    /// `Tracked<OrderShipped>` binds that exchange and reads it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn generic_contracts_named_per_instantiation() {
        init_tracing();
        let vhost = TestVhost::create("interop-generic");
        let got = Recorder::<String>::default();
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("tracking", {
                let on = got.record(|ctx: &ConsumeContext<Tracked<OrderShipped>>| {
                    ctx.message().tracking_code.clone()
                });
                move |e| e.handler(on)
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let envelope = r#"{"messageId":"181c0000-6393-3630-36a4-08daf4e7ca01","conversationId":"181c0000-6393-3630-7cc2-08daf4e7ca02","sourceAddress":"rabbitmq://localhost/DESKTOP_Shipping_bus_abc","destinationAddress":"rabbitmq://localhost/Contracts:Tracked--OrderShipped--","messageType":["urn:message:Contracts:Tracked[[Contracts:OrderShipped]]"],"message":{"trackingCode":"JD0142","event":{"orderId":"0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4"}},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{},"host":{"machineName":"DESKTOP","processName":"Shipping","processId":1,"assembly":"Shipping","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}"#;
        let (conn, channel) = raw::channel(&vhost.url()).await;
        raw::publish(
            &channel,
            "Contracts:Tracked--OrderShipped--",
            envelope.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        assert_eq!(
            got.wait_for(1, WAIT, "the generic contract consumed").await,
            vec!["JD0142".to_string()]
        );
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// Issue 14.8, the reverse: a MassTransit service scheduling through a busway scheduler
    /// endpoint. Its `ScheduleMessage` (as `ScheduleMessageCommand<T>` writes it) reaches
    /// `message_scheduler_endpoint("quartz")`, and the payload arrives at its destination no
    /// earlier than its time, with the token in `MT-Scheduling-TokenId`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_masstransit_service_schedules_through_a_busway_scheduler() {
        init_tracing();
        let vhost = TestVhost::create("interop-scheduler");
        let got = Recorder::<(u32, Option<String>, std::time::Instant)>::default();
        let on = got.record(|ctx: &ConsumeContext<RemindCustomer>| {
            (
                ctx.message().n,
                ctx.headers()
                    .get_str("MT-Scheduling-TokenId")
                    .map(|s| s.into_owned()),
                std::time::Instant::now(),
            )
        });
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .message_scheduler_endpoint("quartz")
            .receive_endpoint("reminders", move |e| e.handler(on))
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let (conn, channel) = raw::channel(&vhost.url()).await;
        let token = "181c0000-6393-3630-a1b2-08daf4e7ce01";
        let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
        let envelope = format!(
            r#"{{"messageId":"181c0000-6393-3630-36a4-08daf4e7ce02","correlationId":"{token}","conversationId":"181c0000-6393-3630-7cc2-08daf4e7ce03","sourceAddress":"rabbitmq://127.0.0.1/DESKTOP_Billing_bus_abc","destinationAddress":"rabbitmq://127.0.0.1/{vhost}/quartz","messageType":["urn:message:MassTransit.Scheduling:ScheduleMessage"],"message":{{"correlationId":"{token}","scheduledTime":"{at}","payloadType":["urn:message:Contracts:RemindCustomer"],"destination":"rabbitmq://127.0.0.1/{vhost}/reminders","payload":{{"n":42}}}},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{{}},"host":{{"machineName":"DESKTOP","processName":"Billing","processId":1,"assembly":"Billing","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}}}"#,
            vhost = vhost.name(),
            at = busway::dotnet::date_time_utc::format(&at),
        );
        let sent = std::time::Instant::now();
        raw::publish(
            &channel,
            "quartz",
            envelope.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        let seen = got.wait_for(1, WAIT, "the scheduled payload").await;
        assert_eq!(seen[0].0, 42);
        assert_eq!(seen[0].1.as_deref(), Some(token));
        assert!(
            seen[0].2.duration_since(sent) >= Duration::from_millis(1000),
            "not before its time: {:?}",
            seen[0].2.duration_since(sent)
        );
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// A .NET interface `Contracts.IOrderEvent`, as a busway contract with the fields read.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:IOrderEvent")]
    struct OrderEvent {
        order_id: Uuid,
    }

    /// A .NET class `Contracts.OrderCancelled : IOrderEvent`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:OrderCancelled", implements(OrderEvent))]
    struct OrderCancelled {
        order_id: Uuid,
        reason: String,
    }

    /// Issue 14.3: a contract that declares the contracts it implements is published with
    /// every URN in `messageType` (concrete first, as MassTransit lists them) and its
    /// exchange is bound to the interface's (MassTransit's RabbitMQ publish topology,
    /// `FlattenHierarchy`), so a MassTransit consumer of `IOrderEvent` (a queue bound to
    /// that exchange) and a busway consumer of the base contract both receive it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polymorphic_publish_reaches_interface_consumers() {
        init_tracing();
        let vhost = TestVhost::create("interop-poly");
        let base = Recorder::<Uuid>::default();
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("order-audit", {
                let on = base.record(|ctx: &ConsumeContext<OrderEvent>| ctx.message().order_id);
                move |e| e.handler(on)
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let (conn, channel) = raw::channel(&vhost.url()).await;
        // What a MassTransit consumer of IOrderEvent has: its queue bound to the exchange.
        let mut consumer = raw::tap(&channel, "Contracts:IOrderEvent", "dotnet-order-events").await;
        let id = Uuid::now_v7();
        bus.publish(OrderCancelled {
            order_id: id,
            reason: "customer".into(),
        })
        .await
        .expect("publish");
        assert_eq!(base.wait_for(1, WAIT, "the base consumer").await, vec![id]);
        let body = raw::next_json(&mut consumer, WAIT, "the interface queue got it in time").await;
        assert_eq!(
            body["messageType"],
            serde_json::json!([
                "urn:message:Contracts:OrderCancelled",
                "urn:message:Contracts:IOrderEvent"
            ])
        );
        assert_eq!(body["message"]["reason"], "customer");
        let bindings = vhost.list("list_bindings", &["source_name", "destination_name"]);
        assert!(
            bindings
                .iter()
                .any(|b| b["source_name"] == "Contracts:OrderCancelled"
                    && b["destination_name"] == "Contracts:IOrderEvent"),
            "{bindings:?}"
        );
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// A .NET contract `Contracts.ReturnRequested` with `[MessageUrn("return-requested")]`:
    /// MassTransit writes the URN from the attribute but names the exchange after the type
    /// (`MessageUrn` vs `RabbitMqMessageNameFormatter`).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "return-requested", entity_name = "Contracts:ReturnRequested")]
    struct ReturnRequested {
        order_id: Uuid,
    }

    /// Issue 14.4: with `#[message(entity_name = ..)]` busway binds, and publishes to, the
    /// exchange MassTransit uses for such a contract, while the URN on the wire stays the
    /// attribute's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entity_name_override_meets_masstransit() {
        init_tracing();
        let vhost = TestVhost::create("interop-entity");
        let got = Recorder::<Uuid>::default();
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("returns", {
                let on = got.record(|ctx: &ConsumeContext<ReturnRequested>| ctx.message().order_id);
                move |e| e.handler(on)
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let bindings = vhost.list("list_bindings", &["source_name", "destination_name"]);
        assert!(
            bindings
                .iter()
                .any(|b| b["source_name"] == "Contracts:ReturnRequested"
                    && b["destination_name"] == "returns"),
            "{bindings:?}"
        );
        let (conn, channel) = raw::channel(&vhost.url()).await;
        let envelope = r#"{"messageId":"181c0000-6393-3630-36a4-08daf4e7c901","conversationId":"181c0000-6393-3630-7cc2-08daf4e7c902","sourceAddress":"rabbitmq://localhost/DESKTOP_Returns_bus_abc","destinationAddress":"rabbitmq://localhost/Contracts:ReturnRequested","messageType":["urn:message:return-requested"],"message":{"orderId":"0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4"},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{},"host":{"machineName":"DESKTOP","processName":"Returns","processId":1,"assembly":"Returns","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}"#;
        raw::publish(
            &channel,
            "Contracts:ReturnRequested",
            envelope.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        let ids = got
            .wait_for(1, WAIT, "the MassTransit publish consumed")
            .await;
        assert_eq!(ids[0].to_string(), "0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4");
        // busway publishes to the same exchange, with the attribute's URN.
        let mut consumer = raw::tap(&channel, "Contracts:ReturnRequested", "dotnet-returns").await;
        bus.publish(ReturnRequested {
            order_id: Uuid::now_v7(),
        })
        .await
        .expect("publish");
        let body = raw::next_json(&mut consumer, WAIT, "busway's publish in time").await;
        assert_eq!(
            body["messageType"],
            serde_json::json!(["urn:message:return-requested"])
        );
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:ParcelScanned")]
    struct ParcelScanned {
        parcel_id: Uuid,
        depot: String,
    }

    /// Raw JSON both ways, as MassTransit's raw serializer writes it on RabbitMQ
    /// (`RawMessageSerializer.SetRawMessageHeaders`: the body is the message alone; `MessageId`,
    /// `CorrelationId`, `ConversationId`, `MT-MessageType`, `MT-Source-Address` travel as
    /// headers; content type `application/json`). busway reads it, and what busway writes with
    /// `RawJson` carries the headers MassTransit's raw deserializer reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_json_both_ways() {
        init_tracing();
        let vhost = TestVhost::create("interop-raw");
        let got = Recorder::<(String, Option<Uuid>, Option<Uuid>)>::default();
        let on = got.record(|ctx: &ConsumeContext<ParcelScanned>| {
            (
                ctx.message().depot.clone(),
                ctx.message_id(),
                ctx.conversation_id(),
            )
        });
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .serializer(busway::RawJson::new())
            .receive_endpoint("parcels", move |e| e.handler(on))
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let (conn, channel) = raw::channel(&vhost.url()).await;
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("MessageId", "181c0000-6393-3630-36a4-08daf4e7cc01"),
            ("ConversationId", "181c0000-6393-3630-7cc2-08daf4e7cc02"),
            ("MT-MessageType", "urn:message:Contracts:ParcelScanned"),
            (
                "MT-Source-Address",
                "rabbitmq://localhost/DESKTOP_Scanner_bus_abc",
            ),
        ] {
            headers.insert(ShortString::from(name), AMQPValue::LongString(value.into()));
        }
        raw::publish(
            &channel,
            "Contracts:ParcelScanned",
            br#"{"parcelId":"5a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d","depot":"Leeds"}"#,
            lapin::BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from("181c0000-6393-3630-36a4-08daf4e7cc01"))
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await;
        let seen = got.wait_for(1, WAIT, "the raw message consumed").await;
        assert_eq!(seen[0].0, "Leeds");
        assert_eq!(
            seen[0].1.map(|u| u.to_string()).as_deref(),
            Some("181c0000-6393-3630-36a4-08daf4e7cc01")
        );
        assert_eq!(
            seen[0].2.map(|u| u.to_string()).as_deref(),
            Some("181c0000-6393-3630-7cc2-08daf4e7cc02")
        );

        // busway → MassTransit: the body alone, the identity in headers.
        let mut consumer = raw::tap(&channel, "Contracts:ParcelScanned", "dotnet-parcels").await;
        let id = Uuid::now_v7();
        bus.publish(ParcelScanned {
            parcel_id: id,
            depot: "York".into(),
        })
        .await
        .expect("publish");
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("busway's raw message in time")
            .expect("a delivery")
            .expect("a good delivery");
        let body: Value = serde_json::from_slice(&delivery.data).expect("JSON");
        assert_eq!(body["parcelId"], id.to_string());
        assert_eq!(body["depot"], "York");
        assert!(body.get("messageType").is_none(), "no envelope: {body}");
        let props = &delivery.properties;
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let table = props.headers().clone().expect("headers");
        let header = |name: &str| match table.inner().get(name) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            other => other.map(|v| format!("{v:?}")),
        };
        assert_eq!(
            header("MT-MessageType").as_deref(),
            Some("urn:message:Contracts:ParcelScanned")
        );
        assert!(header("MessageId").is_some(), "{table:?}");
        assert!(header("ConversationId").is_some(), "{table:?}");
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// A .NET enum: System.Text.Json as MassTransit configures it writes the number.
    #[derive(
        Debug, Clone, Copy, PartialEq, serde_repr::Serialize_repr, serde_repr::Deserialize_repr,
    )]
    #[repr(i32)]
    enum ShipmentState {
        Pending = 0,
        Shipped = 2,
    }

    /// A nested .NET record.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Parcel {
        weight_grams: u32,
        label: Option<String>,
    }

    /// A contract with the .NET value types of issue 14.2, as `busway::dotnet` maps them.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:ShipmentBooked")]
    struct ShipmentBooked {
        shipment_id: Uuid,
        state: ShipmentState,
        #[serde(with = "busway::dotnet::time_span")]
        transit_time: std::time::Duration,
        #[serde(default, with = "busway::dotnet::time_span::option")]
        grace: Option<std::time::Duration>,
        #[serde(with = "busway::dotnet::date_time")]
        local_pickup: chrono::NaiveDateTime,
        #[serde(with = "busway::dotnet::date_time_offset")]
        booked_at: chrono::DateTime<chrono::FixedOffset>,
        #[serde(with = "busway::dotnet::bytes")]
        signature: Vec<u8>,
        fee: Decimal,
        insured_value: Option<Decimal>,
        parcels: Vec<Parcel>,
        attributes: std::collections::HashMap<String, String>,
    }

    /// Issue 14.2: the body System.Text.Json writes for a .NET contract with `TimeSpan`,
    /// `DateTime` (Unspecified), `DateTimeOffset`, `byte[]`, `decimal`, an enum, nullables,
    /// a list of records and a dictionary (MassTransit's `SystemTextJsonMessageSerializer`
    /// options: camelCase, no enum string converter, `StringDecimalJsonConverter`) is read by
    /// a busway consumer, and what busway writes back has the same strings.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dotnet_value_types_round_trip() {
        init_tracing();
        let vhost = TestVhost::create("interop-dotnet");
        let got = Recorder::<ShipmentBooked>::default();
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint("shipments", {
                let on = got.record(|ctx: &ConsumeContext<ShipmentBooked>| ctx.message().clone());
                move |e| e.handler(on)
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        // As .NET 8 writes it (WriteIndented, as MassTransit sets it).
        let message = r#"{
    "shipmentId": "5a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
    "state": 2,
    "transitTime": "1.02:03:04.5000000",
    "grace": null,
    "localPickup": "2026-12-03T10:00:00.1234567",
    "bookedAt": "2026-12-03T10:00:00.5+01:00",
    "signature": "AAEC/f7/",
    "fee": "12.50",
    "insuredValue": null,
    "parcels": [
      { "weightGrams": 1200, "label": "fragile" },
      { "weightGrams": 300, "label": null }
    ],
    "attributes": { "Carrier": "DHL", "priority": "high" }
  }"#;
        let envelope = format!(
            r#"{{"messageId":"181c0000-6393-3630-36a4-08daf4e7c801","conversationId":"181c0000-6393-3630-7cc2-08daf4e7c802","sourceAddress":"rabbitmq://localhost/DESKTOP_Shipping_bus_abc","destinationAddress":"rabbitmq://localhost/Contracts:ShipmentBooked","messageType":["urn:message:Contracts:ShipmentBooked"],"message":{message},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{{}},"host":{{"machineName":"DESKTOP","processName":"Shipping","processId":1,"assembly":"Shipping","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}}}"#
        );
        let (conn, channel) = raw::channel(&vhost.url()).await;
        raw::publish(
            &channel,
            "Contracts:ShipmentBooked",
            envelope.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        let booked = got.wait_for(1, WAIT, "the shipment consumed").await[0].clone();
        assert_eq!(booked.state, ShipmentState::Shipped);
        assert_eq!(
            booked.transit_time,
            std::time::Duration::from_millis(93_784_500)
        );
        assert_eq!(booked.grace, None);
        assert_eq!(
            booked.local_pickup.to_string(),
            "2026-12-03 10:00:00.123456700"
        );
        assert_eq!(
            booked.booked_at.to_rfc3339(),
            "2026-12-03T10:00:00.500+01:00"
        );
        assert_eq!(booked.signature, vec![0, 1, 2, 253, 254, 255]);
        assert_eq!(booked.fee.to_string(), "12.50");
        assert_eq!(booked.insured_value, None);
        assert_eq!(booked.parcels[0].weight_grams, 1200);
        assert_eq!(booked.parcels[1].label, None);
        assert_eq!(booked.attributes["Carrier"], "DHL");

        // busway → .NET: a queue bound like a MassTransit consumer's reads busway's body.
        let mut consumer = raw::tap(&channel, "Contracts:ShipmentBooked", "dotnet-shipments").await;
        let mut out = booked.clone();
        out.grace = Some(std::time::Duration::from_secs(90));
        out.state = ShipmentState::Pending;
        bus.publish(out).await.expect("publish back");
        let body = raw::next_json(&mut consumer, WAIT, "busway's message in time").await;
        let m = &body["message"];
        assert_eq!(m["state"], 0);
        assert_eq!(m["transitTime"], "1.02:03:04.5000000");
        assert_eq!(m["grace"], "00:01:30");
        assert_eq!(m["localPickup"], "2026-12-03T10:00:00.1234567");
        assert_eq!(m["bookedAt"], "2026-12-03T10:00:00.5+01:00");
        assert_eq!(m["signature"], "AAEC/f7/");
        assert_eq!(m["fee"], "12.50");
        assert_eq!(m["insuredValue"], Value::Null);
        assert_eq!(m["parcels"][1]["label"], Value::Null);
        assert_eq!(m["attributes"]["Carrier"], "DHL");
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// A busway request client and a MassTransit responder: the request (sent to the
    /// service's queue) carries `requestId` and `responseAddress` (busway's temporary bus
    /// queue, `?temporary=true`), and a response written as MassTransit's `RespondAsync`
    /// writes it (published to the response address's exchange, `requestId` copied,
    /// `messageType` the response's) completes the request; so does a `Fault<T>`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busway_request_client_gets_a_masstransit_response() {
        init_tracing();
        let vhost = TestVhost::create("interop-requester");
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let (conn, channel) = raw::channel(&vhost.url()).await;
        // The MassTransit service's endpoint: exchange and queue `order-status-service`.
        let mut service = raw::tap(&channel, "order-status-service", "order-status-service").await;
        let client = bus
            .request_client_to::<CheckOrder>("queue:order-status-service")
            .expect("client");
        let order_id = Uuid::now_v7();
        let asking = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .get_response::<OrderStatus>(CheckOrder { order_id })
                    .await
            }
        });
        let request = raw::next_json(&mut service, WAIT, "the request").await;
        let request_id = request["requestId"]
            .as_str()
            .expect("a requestId")
            .to_string();
        let response_address = request["responseAddress"]
            .as_str()
            .expect("a responseAddress")
            .to_string();
        assert!(
            response_address.ends_with("?temporary=true"),
            "{response_address}"
        );
        assert_eq!(request["message"]["orderId"], order_id.to_string());
        let bus_exchange = response_address
            .trim_end_matches("?temporary=true")
            .rsplit('/')
            .next()
            .expect("a name")
            .to_string();
        let respond = |message_type: &str, message: String, request_id: &str| {
            format!(
                r#"{{"messageId":"{}","requestId":"{request_id}","conversationId":"181c0000-6393-3630-7cc2-08daf4e7cd02","sourceAddress":"rabbitmq://127.0.0.1/order-status-service","destinationAddress":"{response_address}","messageType":["{message_type}"],"message":{message},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{{}},"host":{{"machineName":"DESKTOP","processName":"OrderStatus","processId":1,"assembly":"OrderStatus","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}}}"#,
                Uuid::now_v7()
            )
        };
        let response = respond(
            "urn:message:Contracts:OrderStatus",
            format!(r#"{{"orderId":"{order_id}","status":"delivered"}}"#),
            &request_id,
        );
        raw::publish(
            &channel,
            &bus_exchange,
            response.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        let answered = tokio::time::timeout(WAIT, asking)
            .await
            .expect("the request completed in time")
            .expect("the task")
            .expect("a response");
        assert_eq!(answered.message().status, "delivered");

        // A MassTransit fault in reply ends the request with a request fault.
        let asking = tokio::spawn(async move {
            client
                .get_response::<OrderStatus>(CheckOrder {
                    order_id: Uuid::nil(),
                })
                .await
        });
        let request = raw::next_json(&mut service, WAIT, "the second request").await;
        let request_id = request["requestId"]
            .as_str()
            .expect("a requestId")
            .to_string();
        let fault = respond(
            "urn:message:MassTransit:Fault[[Contracts:CheckOrder]]",
            r#"{"faultId":"181c0000-6393-3630-36a4-08daf4e7cd09","faultedMessageId":null,"timestamp":"2026-12-03T10:00:00Z","exceptions":[{"exceptionType":"System.InvalidOperationException","innerException":null,"stackTrace":"","message":"no such order","source":"OrderStatus","data":null}],"host":null,"faultMessageTypes":["urn:message:Contracts:CheckOrder"],"message":{"orderId":"00000000-0000-0000-0000-000000000000"}}"#.to_string(),
            &request_id,
        );
        raw::publish(
            &channel,
            &bus_exchange,
            fault.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        let err = tokio::time::timeout(WAIT, asking)
            .await
            .expect("the request ended in time")
            .expect("the task")
            .expect_err("a fault");
        assert!(err.is_request_fault(), "{err}");
        assert!(err.to_string().contains("no such order"), "{err}");
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// A busway service answering `CheckOrder` with `OrderStatus { status }`, faulting for
    /// the nil order id.
    async fn order_check_service(
        vhost: &TestVhost,
        service: &str,
        status: &'static str,
    ) -> (Bus, busway::RunningBus) {
        let bus = Bus::builder()
            .transport(transport_for(&vhost.url()))
            .receive_endpoint(service.to_string(), move |e| {
                e.handler(move |ctx: ConsumeContext<CheckOrder>| async move {
                    if ctx.message().order_id.is_nil() {
                        return Err(ConsumeError::msg("no such order"));
                    }
                    ctx.respond(OrderStatus {
                        order_id: ctx.message().order_id,
                        status: status.into(),
                    })
                    .await
                    .map_err(ConsumeError::from)?;
                    Ok(())
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        (bus, running)
    }

    /// The `Fault<CheckOrder>` a busway service sends for request `request_id`, as a
    /// MassTransit request client reads it.
    fn assert_check_order_fault(fault: &Value, request_id: &str) {
        assert_eq!(fault["requestId"], request_id);
        assert_eq!(
            fault["messageType"][0],
            "urn:message:MassTransit:Fault[[Contracts:CheckOrder]]"
        );
        assert_eq!(
            fault["message"]["exceptions"][0]["message"],
            "no such order"
        );
    }

    /// Issue 14.1: a MassTransit request client that uses RabbitMQ's direct reply-to
    /// (`SetRabbitMqReplyToRequestClientFactory`) gets its answer. As MassTransit does it
    /// (`RabbitMqRequestClientExtensions`, `RabbitMqSendTransportContext`): it consumes
    /// `amq.rabbitmq.reply-to` with no-ack, and publishes the request on that same channel
    /// with the AMQP `reply-to` property `amq.rabbitmq.reply-to` and `responseAddress =
    /// rabbitmq://host/vhost/amq.rabbitmq.reply-to`. The response must go to the default
    /// exchange with the token the broker put in `reply-to` (`ReplyToSendEndpoint`); a
    /// declare of `amq.rabbitmq.reply-to` (what busway did) is refused by the broker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_masstransit_direct_reply_to_request_gets_its_response() {
        init_tracing();
        let vhost = TestVhost::create("interop-reply-to");
        let service = unique("check-order-direct");
        let (_bus, running) = order_check_service(&vhost, &service, "packed").await;

        let (conn, channel) = raw::channel(&vhost.url()).await;
        let mut replies = channel
            .basic_consume(
                ShortString::from("amq.rabbitmq.reply-to"),
                ShortString::from("reply-to-client"),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume amq.rabbitmq.reply-to");
        let response_address = format!(
            "rabbitmq://127.0.0.1/{}/amq.rabbitmq.reply-to",
            vhost.name()
        );
        let request_id = "181c0000-6393-3630-a1b2-08daf4e7c7dd";
        let order_id = "7d0c8a51-2f44-4c1e-8e3b-3f1b6c2a9e10";
        let envelope = format!(
            r#"{{"messageId":"181c0000-6393-3630-36a4-08daf4e7c7dc","requestId":"{request_id}","conversationId":"181c0000-6393-3630-7cc2-08daf4e7c7de","sourceAddress":"{response_address}","destinationAddress":"rabbitmq://127.0.0.1/{vhost}/{service}","responseAddress":"{response_address}","messageType":["urn:message:Contracts:CheckOrder"],"message":{{"orderId":"{order_id}"}},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{{}},"host":{{"machineName":"DESKTOP","processName":"OrderClient","processId":4242,"assembly":"OrderClient","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}}}"#,
            vhost = vhost.name()
        );
        raw::publish(
            &channel,
            service.as_str(),
            envelope.as_bytes(),
            raw::masstransit_properties().with_reply_to(ShortString::from("amq.rabbitmq.reply-to")),
        )
        .await;
        let delivery = tokio::time::timeout(WAIT, replies.next())
            .await
            .expect("the response came back through direct reply-to in time")
            .expect("a delivery")
            .expect("a good delivery");
        let body: Value = serde_json::from_slice(&delivery.data).expect("a JSON envelope");
        assert_eq!(body["requestId"], request_id);
        assert_eq!(body["message"]["orderId"], order_id);
        assert_eq!(body["message"]["status"], "packed");
        assert_eq!(body["destinationAddress"], response_address.as_str());
        // A request that faults: the Fault<CheckOrder> comes back the same way.
        let failing = envelope
            .replace(order_id, "00000000-0000-0000-0000-000000000000")
            .replace(request_id, "181c0000-6393-3630-a1b2-08daf4e7c7ee");
        raw::publish(
            &channel,
            service.as_str(),
            failing.as_bytes(),
            raw::masstransit_properties().with_reply_to(ShortString::from("amq.rabbitmq.reply-to")),
        )
        .await;
        let delivery = tokio::time::timeout(WAIT, replies.next())
            .await
            .expect("the fault came back through direct reply-to in time")
            .expect("a delivery")
            .expect("a good delivery");
        let fault: Value = serde_json::from_slice(&delivery.data).expect("a JSON envelope");
        assert_check_order_fault(&fault, "181c0000-6393-3630-a1b2-08daf4e7c7ee");
        // Nothing named amq.rabbitmq.reply-to was declared (the broker refuses that).
        let exchanges = vhost.list("list_exchanges", &["name"]);
        assert!(
            exchanges
                .iter()
                .all(|e| e["name"] != "amq.rabbitmq.reply-to"),
            "{exchanges:?}"
        );
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }

    /// Issue 14.1: a MassTransit request client gets its answer. Its bus endpoint is declared
    /// as MassTransit declares it (`RabbitMqBusFactoryConfigurator`: exchange and queue
    /// non-durable, auto-delete, `x-expires` 60000 from `RabbitMqReceiveEndpointBuilder`), and
    /// its request carries `responseAddress = rabbitmq://host/vhost/<queue>?temporary=true`
    /// (`ClientRequestHandle` sets `RequestId` and `ResponseAddress`). busway publishes the
    /// response to that exchange without declaring the queue again (which the broker refused
    /// with PRECONDITION_FAILED, so the caller timed out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_masstransit_request_client_gets_its_response() {
        init_tracing();
        let vhost = TestVhost::create("interop-request");
        let service = unique("check-order");
        let (_bus, running) = order_check_service(&vhost, &service, "shipped").await;

        let (conn, channel) = raw::channel(&vhost.url()).await;
        let bus_queue = "DESKTOP_OrderClient_bus_7kyoyyfqw4rbyx8ibdq3ruuu8z";
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-expires"),
            AMQPValue::LongLongInt(60_000),
        );
        let temporary = || ExchangeDeclareOptions {
            durable: false,
            auto_delete: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                ShortString::from(bus_queue),
                ExchangeKind::Fanout,
                temporary(),
                FieldTable::default(),
            )
            .await
            .expect("the bus endpoint's exchange");
        channel
            .queue_declare(
                ShortString::from(bus_queue),
                QueueDeclareOptions {
                    durable: false,
                    auto_delete: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("the bus endpoint's queue");
        channel
            .queue_bind(
                ShortString::from(bus_queue),
                ShortString::from(bus_queue),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        let response_address = format!(
            "rabbitmq://127.0.0.1/{}/{bus_queue}?temporary=true",
            vhost.name()
        );
        let request_id = "181c0000-6393-3630-a1b2-08daf4e7c6dd";
        let order_id = "0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4";
        let envelope = format!(
            r#"{{"messageId":"181c0000-6393-3630-36a4-08daf4e7c6dc","requestId":"{request_id}","correlationId":null,"conversationId":"181c0000-6393-3630-7cc2-08daf4e7c6de","initiatorId":null,"sourceAddress":"{response_address}","destinationAddress":"rabbitmq://127.0.0.1/{vhost}/{service}","responseAddress":"{response_address}","faultAddress":null,"messageType":["urn:message:Contracts:CheckOrder"],"message":{{"orderId":"{order_id}"}},"expirationTime":"2026-12-02T10:00:30Z","sentTime":"2026-12-02T10:00:00.1234567Z","headers":{{}},"host":{{"machineName":"DESKTOP","processName":"OrderClient","processId":4242,"assembly":"OrderClient","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}}}"#,
            vhost = vhost.name()
        );
        raw::publish(
            &channel,
            service.as_str(),
            envelope.as_bytes(),
            raw::masstransit_properties()
                .with_message_id(ShortString::from("181c0000-6393-3630-36a4-08daf4e7c6dc")),
        )
        .await;

        let mut consumer = channel
            .basic_consume(
                ShortString::from(bus_queue),
                ShortString::from("client"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume the bus queue");
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("the response reached the MassTransit bus queue in time")
            .expect("a delivery")
            .expect("a good delivery");
        let body: Value = serde_json::from_slice(&delivery.data).expect("a JSON envelope");
        assert_eq!(body["requestId"], request_id);
        assert_eq!(
            body["messageType"],
            serde_json::json!(["urn:message:Contracts:OrderStatus"])
        );
        assert_eq!(body["message"]["orderId"], order_id);
        assert_eq!(body["message"]["status"], "shipped");
        assert_eq!(body["destinationAddress"], response_address.as_str());
        // A request that faults: the Fault<CheckOrder> goes to the same temporary queue
        // (MassTransit sends faults of requests to the response address when there is no
        // fault address), again without declaring it.
        let failing = envelope
            .replace(order_id, "00000000-0000-0000-0000-000000000000")
            .replace(request_id, "181c0000-6393-3630-a1b2-08daf4e7c6ee");
        raw::publish(
            &channel,
            service.as_str(),
            failing.as_bytes(),
            raw::masstransit_properties(),
        )
        .await;
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("the fault reached the MassTransit bus queue in time")
            .expect("a delivery")
            .expect("a good delivery");
        let fault: Value = serde_json::from_slice(&delivery.data).expect("a JSON envelope");
        assert_check_order_fault(&fault, "181c0000-6393-3630-a1b2-08daf4e7c6ee");
        // The queue is still the one the client declared: nothing re-declared it.
        let queues = vhost.list(
            "list_queues",
            &["name", "durable", "auto_delete", "arguments"],
        );
        let q = queues
            .iter()
            .find(|q| q["name"] == bus_queue)
            .expect("the bus queue still exists");
        assert_eq!(q["durable"], false);
        assert_eq!(q["auto_delete"], true);
        running.shutdown().await.expect("shutdown");
        let _ = conn.close(200, ShortString::from("done")).await;
    }
}
