//! The conformance suite and Service Bus-specific tests.
//!
//! No Azure Service Bus can run on this machine, so these tests run against
//! [`StandIn`](busway_integration_tests::servicebus::StandIn), a **local stand-in** that
//! follows Service Bus's REST protocol and semantics (see its module docs for what it covers
//! and what it does not). The same conformance suite runs against a real namespace in
//! `real_namespace` below, ignored unless asked for.

use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use busway::TransportMessage;
use busway::servicebus::ServiceBus;
use busway::transport::QueueAdmin;
use busway_integration_tests::TransportFixture;
use busway_integration_tests::servicebus::StandIn;

/// The stand-in shared by the conformance tests (each test uses endpoints of its own).
fn shared() -> &'static StandIn {
    static STANDIN: OnceLock<StandIn> = OnceLock::new();
    STANDIN.get_or_init(StandIn::start)
}

fn on_standin(standin: &StandIn) -> busway::servicebus::ServiceBusBuilder {
    ServiceBus::builder(&standin.connection_string()).base_url(standin.base_url())
}

async fn take(t: &ServiceBus, queue: &str) -> Vec<TransportMessage> {
    t.take_messages(queue, 100_000)
        .await
        .expect("reading a queue")
}

struct StandInFixture;

#[async_trait]
impl TransportFixture for StandInFixture {
    type Transport = ServiceBus;

    fn name(&self) -> &'static str {
        "Azure Service Bus (local stand-in)"
    }

    async fn transport(&self) -> ServiceBus {
        on_standin(shared())
            .lock_duration(Duration::from_secs(30))
            .build()
            .expect("a transport for the stand-in")
    }
}

busway_integration_tests::conformance_suite!(StandInFixture);

/// The conformance suite against a real Azure Service Bus namespace. Ignored by default:
/// `BUSWAY_ASB_CONNECTION_STRING=... cargo test -p busway-integration-tests --test servicebus
/// real_namespace -- --ignored` runs it (the key needs Manage rights; every test creates
/// entities of its own and deletes its queues).
mod real_namespace {
    use super::*;

    struct RealFixture;

    #[async_trait]
    impl TransportFixture for RealFixture {
        type Transport = ServiceBus;

        fn name(&self) -> &'static str {
            "Azure Service Bus"
        }

        async fn transport(&self) -> ServiceBus {
            assert!(
                std::env::var(busway::servicebus::CONNECTION_STRING_ENV).is_ok(),
                "these tests need a real Azure Service Bus namespace: set {} to a connection string \
                 with Manage rights (Endpoint=sb://<ns>.servicebus.windows.net/;SharedAccessKeyName=..;SharedAccessKey=..)",
                busway::servicebus::CONNECTION_STRING_ENV
            );
            ServiceBus::from_env().expect("a valid connection string")
        }
    }

    busway_integration_tests::conformance_suite!(
        ignore = "needs a real Azure Service Bus namespace: set BUSWAY_ASB_CONNECTION_STRING and run with --ignored",
        RealFixture
    );
}

mod servicebus_specific {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use busway::headers::names;
    use busway::prelude::*;
    use busway::servicebus::{subscription_name, topic_name};
    use busway::{BusBuilder, ConsumeErrorKind};
    use busway_integration_tests::support::{
        Counter, Recorder, ToggleProxy, header, init_tracing, unique, wait_until,
    };
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:OrderPlaced")]
    struct OrderPlaced {
        #[message(correlation_id)]
        order_id: Uuid,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:BuswayTests:Crashy")]
    struct Crashy {
        n: u32,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    struct SlowWork {
        n: u32,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    struct GivesUp {
        n: u32,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    struct Outage {
        n: u32,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:ParcelScanned")]
    struct ParcelScanned {
        parcel_id: Uuid,
        depot: String,
    }

    /// Sends a message over the REST data plane with raw HTTP, as a .NET client's
    /// `ServiceBusSender` would put it on the wire: `BrokerProperties` JSON and each
    /// application property as a header of its own (HTTP makes the names lower case).
    async fn post_raw(
        standin: &StandIn,
        queue: &str,
        content_type: &str,
        properties: &[(&str, &str)],
        body: &str,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let connection =
            busway::servicebus::ConnectionString::parse(&standin.connection_string()).expect("cs");
        let url = format!("{}/{queue}", standin.base_url());
        let token = busway::servicebus::sas_token(&connection, &url, 600).expect("token");
        let host = standin.base_url().trim_start_matches("http://").to_string();
        let mut request = format!(
            "POST /{queue}/messages HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in properties {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let mut stream = tokio::net::TcpStream::connect(&host)
            .await
            .expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
            .await
            .expect("the stand-in answered in time")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    }

    /// Issue 14.6: what MassTransit's raw JSON serializer sends on Service Bus
    /// (`RawMessageSerializer.SetRawMessageHeaders`: `MessageId`, `CorrelationId`,
    /// `ConversationId`, `MT-MessageType`, `MT-Source-Address` as application properties,
    /// the body the message alone) is read by busway whatever case the property names
    /// arrive in: the REST data plane hands them over lower case, and here some are sent
    /// upper case too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn masstransit_raw_json_identity_in_any_case() {
        init_tracing();
        let standin = StandIn::start();
        let t = on_standin(&standin).build().expect("transport");
        let name = unique("parcels");
        let got = Recorder::<(String, Option<Uuid>, Option<Uuid>)>::default();
        let on = got.record(|ctx: &ConsumeContext<ParcelScanned>| {
            (
                ctx.message().depot.clone(),
                ctx.message_id(),
                ctx.conversation_id(),
            )
        });
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(name.clone(), move |e| e.handler(on))
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        post_raw(
            &standin,
            &name,
            "application/json",
            &[
                (
                    "BrokerProperties",
                    r#"{"MessageId":"181c00006393363036a408daf4e7cb01","ContentType":"application/json"}"#,
                ),
                ("MESSAGEID", "\"181c0000-6393-3630-36a4-08daf4e7cb01\""),
                ("conversationid", "\"181c0000-6393-3630-7cc2-08daf4e7cb02\""),
                ("MT-MessageType", "\"urn:message:Contracts:ParcelScanned\""),
                ("mt-source-address", "\"sb://busway-standin.servicebus.windows.net/scanner\""),
            ],
            r#"{"parcelId":"5a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d","depot":"Leeds"}"#,
        )
        .await;
        let seen = got.wait_for(1, WAIT, "the raw message consumed").await;
        assert_eq!(seen[0].0, "Leeds");
        assert_eq!(
            seen[0].1.map(|u| u.to_string()).as_deref(),
            Some("181c0000-6393-3630-36a4-08daf4e7cb01")
        );
        assert_eq!(
            seen[0].2.map(|u| u.to_string()).as_deref(),
            Some("181c0000-6393-3630-7cc2-08daf4e7cb02")
        );
        running.shutdown().await.expect("shutdown");
    }

    /// Issue 14 on Service Bus, MassTransit → busway publish: a MassTransit publisher posts
    /// the envelope to the message type's topic (`Contracts/ParcelScanned`,
    /// `ServiceBusMessageNameFormatter`) with `ContentType` `application/vnd.masstransit+json`
    /// and `MessageId` in its `N` form (`ServiceBusSendTransportContext.CreateMessage`); a
    /// busway consumer's subscription receives it with the envelope's identity and source.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn masstransit_publish_reaches_a_busway_subscription() {
        init_tracing();
        let standin = StandIn::start();
        let t = on_standin(&standin).build().expect("transport");
        let name = unique("depots");
        let got = Recorder::<(String, Option<Uuid>, Option<String>)>::default();
        let on = got.record(|ctx: &ConsumeContext<ParcelScanned>| {
            (
                ctx.message().depot.clone(),
                ctx.message_id(),
                ctx.source_address().map(str::to_string),
            )
        });
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(name.clone(), move |e| e.handler(on))
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let envelope = r#"{"messageId":"181c0000-6393-3630-36a4-08daf4e7cc01","conversationId":"181c0000-6393-3630-7cc2-08daf4e7cc02","sourceAddress":"sb://busway-standin.servicebus.windows.net/scanner","destinationAddress":"sb://busway-standin.servicebus.windows.net/Contracts/ParcelScanned","messageType":["urn:message:Contracts:ParcelScanned"],"message":{"parcelId":"5a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d","depot":"York"},"sentTime":"2026-12-03T10:00:00.1234567Z","headers":{},"host":{"machineName":"SCANNER","processName":"Scanner","processId":7,"assembly":"Scanner","assemblyVersion":"1.0.0.0","frameworkVersion":"8.0.1","massTransitVersion":"8.5.8.0","operatingSystemVersion":"Unix 6.1.0"}}"#;
        post_raw(
            &standin,
            "Contracts/ParcelScanned",
            "application/vnd.masstransit+json",
            &[(
                "BrokerProperties",
                r#"{"MessageId":"181c00006393363036a408daf4e7cc01"}"#,
            )],
            envelope,
        )
        .await;
        let seen = got
            .wait_for(1, WAIT, "the MassTransit publish consumed")
            .await;
        assert_eq!(seen[0].0, "York");
        assert_eq!(
            seen[0].1.map(|u| u.to_string()).as_deref(),
            Some("181c0000-6393-3630-36a4-08daf4e7cc01")
        );
        assert_eq!(
            seen[0].2.as_deref(),
            Some("sb://busway-standin.servicebus.windows.net/scanner")
        );
        running.shutdown().await.expect("shutdown");
        assert_eq!(standin.counts().completed, 1, "settled once");
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:IShipmentEvent")]
    struct ShipmentEvent {
        n: u32,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(
        urn = "urn:message:Contracts:ShipmentDelayed",
        implements(ShipmentEvent)
    )]
    struct ShipmentDelayed {
        n: u32,
        hours: u32,
    }

    /// Issue 14.3 on Service Bus: publishing a contract that implements another creates, on
    /// the concrete type's topic, a subscription named as MassTransit names it
    /// (`IShipmentEvent-Contracts`: the destination topic's segments reversed) that forwards
    /// to the interface's topic, so the interface's consumers receive it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polymorphic_publish_forwards_to_interface_topics() {
        init_tracing();
        let standin = StandIn::start();
        let t = on_standin(&standin).build().expect("transport");
        let got = Counter::default();
        let g = got.clone();
        let name = unique("shipment-audit");
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(name.clone(), move |e| {
                e.handler(move |ctx: ConsumeContext<ShipmentEvent>| {
                    assert_eq!(ctx.message().n, 7);
                    g.incr();
                    async { Ok(()) }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        bus.publish(ShipmentDelayed { n: 7, hours: 3 })
            .await
            .expect("publish");
        wait_until(WAIT, "the interface consumer got it", || got.get() == 1).await;
        assert!(
            standin
                .subscriptions("Contracts/ShipmentDelayed")
                .contains(&(
                    "IShipmentEvent-Contracts".to_string(),
                    Some("Contracts/IShipmentEvent".to_string())
                )),
            "{:?}",
            standin.subscriptions("Contracts/ShipmentDelayed")
        );
        running.shutdown().await.expect("shutdown");
    }

    /// A receive answered without `BrokerProperties` (the message locked, but unreadable) is
    /// unlocked at once and delivered on the next receive, not left locked until its lock
    /// runs out (30 s here) or lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreadable_receive_answer_is_unlocked() {
        init_tracing();
        let standin = StandIn::start();
        let t = on_standin(&standin)
            .lock_duration(Duration::from_secs(30))
            .build()
            .expect("transport");
        let name = unique("garbled");
        let got = Counter::default();
        let g = got.clone();
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(name.clone(), move |e| {
                e.prefetch(1).handler(move |_: ConsumeContext<Crashy>| {
                    g.incr();
                    async { Ok(()) }
                })
            })
            .build()
            .await
            .expect("build");
        standin.garble_next_receives(1);
        let running = bus.start().await.expect("start");
        let started = std::time::Instant::now();
        bus.send(format!("queue:{name}"), Crashy { n: 1 })
            .await
            .expect("send");
        wait_until(
            WAIT,
            "the message is consumed after the garbled answer",
            || got.get() == 1,
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "unlocked, not left to its 30 s lock: {:?}",
            started.elapsed()
        );
        let counts = standin.counts();
        assert!(counts.unlocked >= 1, "{counts:?}");
        assert_eq!(counts.received, 2, "{counts:?}");
        assert_eq!(counts.completed, 1, "{counts:?}");
        running.shutdown().await.expect("shutdown");
    }

    /// MassTransit's topology: a topic per message type, a subscription per consuming
    /// endpoint named after it (shortened past 50 characters) forwarding to its queue, queues
    /// with the configured lock duration and delivery count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topology_like_masstransit() {
        init_tracing();
        let standin = StandIn::start();
        let t = on_standin(&standin)
            .lock_duration(Duration::from_secs(45))
            .max_delivery_count(7)
            .build()
            .expect("transport");
        let short = "order-confirmation".to_string();
        let long = "an-endpoint-with-a-name-well-past-the-fifty-character-limit".to_string();
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(short.clone(), |e| {
                e.handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) })
            })
            .receive_endpoint(long.clone(), |e| {
                e.handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) })
            })
            .build()
            .await
            .expect("build");
        let topic = topic_name(&OrderPlaced::message_type().clone());
        assert_eq!(topic, "Contracts/OrderPlaced");
        assert!(standin.has_topic(&topic));
        let subs = standin.subscriptions(&topic);
        let long_sub = subscription_name(&long);
        // Worked out by hand from MassTransit's rule: 43 characters, `-`, the first 30 bits
        // of SHA-1(name) in z-base-32 (ServiceBusPublishTopology.FormatSubscriptionName).
        assert_eq!(
            long_sub,
            "an-endpoint-with-a-name-well-past-the-fifty-rkx1km"
        );
        assert_eq!(
            subs,
            vec![
                (long_sub, Some(long.clone())),
                (short.clone(), Some(short.clone())),
            ]
        );
        assert_eq!(
            standin.queue_settings(&short),
            Some((Duration::from_secs(45), 7))
        );
        // The topology as Service Bus has it: topics with subscriptions forwarding to queues.
        let text = bus.topology_text();
        assert!(
            text.contains(&format!(
                "  {} <- topic {topic} / subscription {}\n",
                OrderPlaced::message_type(),
                subscription_name(&long)
            )),
            "{text}"
        );
        assert!(
            text.contains("  reads queue order-confirmation\n"),
            "{text}"
        );
        assert!(!text.contains("exchange"), "{text}");
        assert_eq!(
            bus.transport().publish_address(OrderPlaced::message_type()),
            "sb://busway-standin.servicebus.windows.net/Contracts/OrderPlaced?type=topic"
        );
        // A publish reaches both endpoints through their subscriptions.
        let seen = Counter::default();
        let bus = {
            let (a, b) = (seen.clone(), seen.clone());
            Bus::builder()
                .transport(t.clone())
                .receive_endpoint(short.clone(), move |e| {
                    e.handler(move |_: ConsumeContext<OrderPlaced>| {
                        let a = a.clone();
                        async move {
                            a.incr();
                            Ok(())
                        }
                    })
                })
                .receive_endpoint(long.clone(), move |e| {
                    e.handler(move |_: ConsumeContext<OrderPlaced>| {
                        let b = b.clone();
                        async move {
                            b.incr();
                            Ok(())
                        }
                    })
                })
                .build()
                .await
                .expect("build")
        };
        let running = bus.start().await.expect("start");
        bus.publish(OrderPlaced {
            order_id: Uuid::new_v4(),
        })
        .await
        .expect("publish");
        wait_until(WAIT, "both endpoints consumed", || seen.get() == 2).await;
        running.shutdown().await.expect("shutdown");
    }

    /// Broker properties carry the ids in MassTransit's "N" form, the content type, the
    /// time to live and the headers as custom properties.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_properties_follow_masstransit() {
        init_tracing();
        let standin = shared();
        let t = on_standin(standin).build().expect("transport");
        let queue = unique("props");
        let bus = Bus::builder()
            .transport(t.clone())
            .build()
            .await
            .expect("build");
        let order_id = Uuid::new_v4();
        bus.send(format!("queue:{queue}"), OrderPlaced { order_id })
            .time_to_live(Duration::from_secs(600))
            .await
            .expect("send");
        let got = take(&t, &queue).await;
        assert_eq!(got.len(), 1);
        let m = &got[0];
        let id = m.message_id.clone().expect("MessageId");
        assert_eq!(id.len(), 32, "N form: {id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert_eq!(
            m.correlation_id.as_deref(),
            Some(order_id.simple().to_string().as_str())
        );
        assert_eq!(
            m.content_type.as_deref(),
            Some("application/vnd.masstransit+json")
        );
        let ttl = m.time_to_live.expect("TimeToLive");
        assert!(
            ttl <= Duration::from_secs(600) && ttl > Duration::from_secs(590),
            "{ttl:?}"
        );
        // Headers travel as custom properties.
        assert!(header(m, "traceparent").starts_with("00-"));
        // The envelope inside still carries the "D" form MassTransit writes in JSON.
        let envelope: serde_json::Value = serde_json::from_slice(&m.body).expect("JSON body");
        let envelope_id = envelope["messageId"].as_str().expect("messageId");
        assert_eq!(
            Uuid::parse_str(envelope_id)
                .expect("a GUID")
                .simple()
                .to_string(),
            id
        );
        t.delete_queues(std::slice::from_ref(&queue))
            .await
            .expect("cleanup");
    }

    /// A consumer that runs three times longer than the lock keeps it (renewals), so the
    /// message is processed once and completed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_consumer_keeps_its_lock() {
        init_tracing();
        let standin = StandIn::start();
        let t = on_standin(&standin)
            .lock_duration(Duration::from_secs(1))
            .build()
            .expect("transport");
        let queue = unique("slow");
        let runs = Counter::default();
        let r = runs.clone();
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(queue.clone(), move |e| {
                e.handler(move |_: ConsumeContext<SlowWork>| {
                    let r = r.clone();
                    async move {
                        r.incr();
                        tokio::time::sleep(Duration::from_millis(3500)).await;
                        Ok(())
                    }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        bus.send(format!("queue:{queue}"), SlowWork { n: 1 })
            .await
            .expect("send");
        wait_until(WAIT, "the message completed", || {
            standin.counts().completed == 1
        })
        .await;
        // Longer than a lock, to see a duplicate if there were one.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        running.shutdown().await.expect("shutdown");
        let counts = standin.counts();
        assert_eq!(runs.get(), 1, "processed once: {counts:?}");
        assert_eq!(counts.expired_locks, 0, "{counts:?}");
        assert!(counts.renewed >= 3, "the lock was renewed: {counts:?}");
        assert_eq!(standin.stats(&queue).map(|s| s.active + s.locked), Some(0));
    }

    /// A child process that is killed when the test ends, however it ends.
    struct Probe(std::process::Child);

    impl Probe {
        /// Its stdout lines, read on a thread of their own.
        fn lines(&mut self) -> std::sync::mpsc::Receiver<String> {
            let out = self.0.stdout.take().expect("stdout");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
            rx
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn line(lines: &std::sync::mpsc::Receiver<String>) -> String {
        lines
            .recv_timeout(WAIT)
            .expect("the probe printed a line within 20 s")
    }

    /// A consumer process killed mid-message: its lock runs out, the message comes back with
    /// DeliveryCount 2, and after the endpoint's retries it lands in `_error` with fault
    /// headers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_consumer_message_returns_after_lock_expiry() {
        init_tracing();
        let standin = StandIn::start();
        let queue = unique("crash");
        let lock = Duration::from_secs(2);
        let mut probe = Probe(
            Command::new(env!("CARGO_BIN_EXE_servicebus-probe"))
                .args([
                    standin.connection_string(),
                    standin.base_url(),
                    queue.clone(),
                    lock.as_secs().to_string(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("the probe starts"),
        );
        let lines = probe.lines();
        assert_eq!(line(&lines), "started");
        let t = on_standin(&standin)
            .lock_duration(lock)
            .build()
            .expect("transport");
        let sender = Bus::builder()
            .transport(t.clone())
            .build()
            .await
            .expect("build");
        sender
            .send(format!("queue:{queue}"), Crashy { n: 7 })
            .await
            .expect("send");
        assert_eq!(line(&lines), "received 7 delivery 1");
        probe.0.kill().expect("SIGKILL the probe");
        let killed = Instant::now();
        let _ = probe.0.wait();

        /// (delivery count, redelivered, time since the kill) of each attempt.
        type Attempts = Arc<Mutex<Vec<(Option<u32>, bool, Duration)>>>;
        let seen: Attempts = Arc::default();
        let s = seen.clone();
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(queue.clone(), move |e| {
                e.retry(Retry::immediate(2))
                    .handler(move |ctx: ConsumeContext<Crashy>| {
                        let s = s.clone();
                        async move {
                            s.lock().expect("lock").push((
                                ctx.delivery_count(),
                                ctx.redelivered(),
                                killed.elapsed(),
                            ));
                            Err(ConsumeError::msg("still broken"))
                        }
                    })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let errors = {
            let deadline = Instant::now() + WAIT;
            loop {
                let got = take(&t, &format!("{queue}_error")).await;
                if !got.is_empty() || Instant::now() > deadline {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        running.shutdown().await.expect("shutdown");
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 3, "one delivery, two retries: {seen:?}");
        for (count, redelivered, _) in &seen {
            assert_eq!(*count, Some(2), "DeliveryCount went up by one: {seen:?}");
            assert!(redelivered);
        }
        // The lock was at most 2 s old when the probe died (renewed every second).
        assert!(seen[0].2 < Duration::from_secs(5), "{seen:?}");
        assert_eq!(standin.counts().expired_locks, 1);
        assert_eq!(errors.len(), 1, "the message is in `_error`");
        let e = &errors[0];
        assert_eq!(header(e, names::FAULT_MESSAGE), "still broken");
        assert_eq!(header(e, names::FAULT_RETRY_COUNT), "2");
        assert!(!header(e, names::FAULT_EXCEPTION_TYPE).is_empty());
        assert_eq!(
            standin.stats(&queue).map(|s| s.active + s.locked),
            Some(0),
            "nothing left behind"
        );
    }

    /// A message handed back (unlocked) on every delivery reaches MaxDeliveryCount and
    /// Service Bus dead-letters it, with DeliveryCount 1, 2, 3 on the way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_delivery_count_dead_letters() {
        init_tracing();
        let standin = StandIn::start();
        let t = on_standin(&standin)
            .max_delivery_count(3)
            .build()
            .expect("transport");
        let queue = unique("gives-up");
        let counts: Arc<Mutex<Vec<Option<u32>>>> = Arc::default();
        let c = counts.clone();
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(queue.clone(), move |e| {
                e.handler(move |ctx: ConsumeContext<GivesUp>| {
                    let c = c.clone();
                    async move {
                        c.lock().expect("lock").push(ctx.delivery_count());
                        // Hand the message back to the broker instead of faulting it.
                        Err(ConsumeError::with_kind(
                            ConsumeErrorKind::Cancelled,
                            "Tests::HandBack",
                            "not now",
                        ))
                    }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        bus.send(format!("queue:{queue}"), GivesUp { n: 1 })
            .await
            .expect("send");
        let dlq = format!("{queue}/$DeadLetterQueue");
        wait_until(WAIT, "the message was dead-lettered", || {
            standin.stats(&dlq).is_some_and(|s| s.active == 1)
        })
        .await;
        running.shutdown().await.expect("shutdown");
        assert_eq!(
            *counts.lock().expect("lock"),
            vec![Some(1), Some(2), Some(3)]
        );
        let dead = take(&t, &dlq).await;
        assert_eq!(dead.len(), 1);
        assert_eq!(
            header(&dead[0], "DeadLetterReason"),
            "MaxDeliveryCountExceeded"
        );
        assert!(take(&t, &format!("{queue}_error")).await.is_empty());
    }

    /// A wrong key fails start-up with an error that names the namespace and the key name
    /// and never the key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_key_fails_startup_clearly() {
        init_tracing();
        let standin = shared();
        let secret = "d3JvbmcgYnV0IHdlbGwtZm9ybWVkIHNlY3JldA==";
        for key_name in ["RootManageSharedAccessKey", "no-such-policy"] {
            let t = ServiceBus::builder(&standin.connection_string_for(key_name, secret))
                .base_url(standin.base_url())
                .build()
                .expect("a well-formed connection string");
            let err = Bus::builder()
                .transport(t)
                .receive_endpoint(unique("denied"), |e| {
                    e.handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) })
                })
                .build()
                .await
                .expect_err("a wrong key fails start-up");
            let text = format!("{err} / {err:?}");
            assert!(err.is_config(), "{text}");
            assert!(
                text.contains("busway-standin"),
                "names the namespace: {text}"
            );
            assert!(text.contains(key_name), "names the key: {text}");
            assert!(!text.contains(secret), "never the key: {text}");
            assert!(!text.contains("d3Jvbmc"), "never part of the key: {text}");
        }
        // Without provisioning nothing is checked at start-up; the receivers then meet the
        // 401, report it, back off (no hot loop), and shut down promptly.
        let isolated = StandIn::start();
        let t = ServiceBus::builder(
            &isolated.connection_string_for("RootManageSharedAccessKey", secret),
        )
        .base_url(isolated.base_url())
        .provision(false)
        .build()
        .expect("transport");
        let bus = Bus::builder()
            .transport(t)
            .receive_endpoint(unique("revoked"), |e| {
                e.prefetch(16)
                    .handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) })
            })
            .build()
            .await
            .expect("nothing checked without provisioning");
        let running = bus.start().await.expect("start");
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::time::timeout(Duration::from_secs(10), running.shutdown())
            .await
            .expect("shutdown completes while receives are refused")
            .expect("shutdown");
        let refused = isolated.counts().unauthorized;
        assert!(
            (8..200).contains(&refused),
            "every poller tried and backed off: {refused} refusals in 2 s"
        );
        // A malformed connection string is refused before any request.
        let err = ServiceBus::new("Endpoint=sb://x.example.com/").expect_err("malformed");
        assert!(err.is_config(), "{err}");
    }

    /// A key without Manage rights: provisioning fails with an error that says so; with
    /// provisioning off the same key sends and receives on entities that exist.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listen_send_key_works_without_provisioning() {
        init_tracing();
        let standin = StandIn::builder()
            .key("app", "c2VuZC1hbmQtbGlzdGVu", false)
            .start();
        let queue = unique("no-manage");
        let app = |provision: bool| {
            ServiceBus::builder(&standin.connection_string_for("app", "c2VuZC1hbmQtbGlzdGVu"))
                .base_url(standin.base_url())
                .provision(provision)
                .build()
                .expect("transport")
        };
        let endpoint = |b: BusBuilder, seen: Counter| {
            b.receive_endpoint(queue.clone(), move |e| {
                e.handler(move |_: ConsumeContext<OrderPlaced>| {
                    let seen = seen.clone();
                    async move {
                        seen.incr();
                        Ok(())
                    }
                })
            })
        };
        let err = endpoint(Bus::builder().transport(app(true)), Counter::default())
            .build()
            .await
            .expect_err("no Manage rights");
        assert!(err.is_config(), "{err}");
        assert!(err.to_string().contains("Manage"), "{err}");
        // An operator (root key) creates the topology once ...
        let admin = on_standin(&standin).build().expect("transport");
        endpoint(Bus::builder().transport(admin), Counter::default())
            .build()
            .await
            .expect("the admin deploys");
        // ... and the application runs with send/listen rights only.
        let seen = Counter::default();
        let bus = endpoint(Bus::builder().transport(app(false)), seen.clone())
            .build()
            .await
            .expect("build without provisioning");
        let running = bus.start().await.expect("start");
        bus.publish(OrderPlaced {
            order_id: Uuid::new_v4(),
        })
        .await
        .expect("publish");
        wait_until(WAIT, "consumed with a listen/send key", || seen.get() == 1).await;
        running.shutdown().await.expect("shutdown");
    }

    /// The HTTP path goes down for two seconds: sends made during the outage fail with a
    /// clear error (nothing is silently lost), receivers keep polling, and everything sent
    /// before and after is consumed exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_is_survived() {
        init_tracing();
        let standin = StandIn::start();
        let target = standin.base_url().trim_start_matches("http://").to_string();
        let proxy = ToggleProxy::start(&target).await;
        let t = ServiceBus::builder(&standin.connection_string())
            .base_url(format!("http://127.0.0.1:{}", proxy.port()))
            .build()
            .expect("transport");
        let queue = unique("outage");
        let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
        let s = seen.clone();
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(queue.clone(), move |e| {
                e.prefetch(4).handler(move |ctx: ConsumeContext<Outage>| {
                    let s = s.clone();
                    async move {
                        s.lock().expect("lock").push(ctx.message().n);
                        Ok(())
                    }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        for n in 0..20 {
            bus.send(format!("queue:{queue}"), Outage { n })
                .await
                .expect("send");
        }
        wait_until(WAIT, "the first 20 consumed", || {
            seen.lock().expect("lock").len() == 20
        })
        .await;
        proxy.down();
        let err = bus
            .send(format!("queue:{queue}"), Outage { n: 999 })
            .await
            .expect_err("a send during the outage fails");
        assert!(err.is_unavailable(), "{err}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.up();
        for n in 20..40 {
            bus.send(format!("queue:{queue}"), Outage { n })
                .await
                .expect("send after the outage");
        }
        wait_until(WAIT, "all 40 consumed", || {
            seen.lock().expect("lock").len() >= 40
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        running.shutdown().await.expect("shutdown");
        let mut got = seen.lock().expect("lock").clone();
        got.sort_unstable();
        assert_eq!(got, (0..40).collect::<Vec<_>>(), "each once, none lost");
    }

    /// Issue 12.12: a gateway that accepts connections and never answers (a half-open
    /// connection) makes sends, receives and management calls fail within the request
    /// timeout instead of stalling forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_gateway_fails_calls_within_the_request_timeout() {
        init_tracing();
        let standin = StandIn::start();
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                open.push(socket); // read nothing, answer nothing, keep it open
            }
        });
        let t = ServiceBus::builder(&standin.connection_string())
            .base_url(format!("http://127.0.0.1:{port}"))
            .provision(false)
            .receive_wait(Duration::from_secs(1))
            .request_timeout(Duration::from_secs(1))
            .build()
            .expect("transport");
        let started = Instant::now();
        let address = busway::Address::parse("queue:silent").expect("address");
        let sent = busway::Transport::send(
            &t,
            &address,
            TransportMessage::default(),
            &Default::default(),
        )
        .await;
        assert!(sent.is_err(), "a send to a silent gateway fails");
        let counted = t.queue_depth("silent").await;
        assert!(
            counted.is_err(),
            "a management call to a silent gateway fails"
        );
        // Each call is bounded by the receive wait plus 1 s (2 s) here.
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
        held.abort();
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Tests:LongJob")]
    struct LongJob {
        n: u32,
    }

    /// Issue 12.12: when a message's lock cannot be renewed before it runs out (Service Bus
    /// unreachable), the consumer's cancellation fires; Service Bus delivers the message
    /// again and it is consumed then. Before, a failed renewal was only logged and the
    /// consumer went on with work it could no longer complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_lock_cancels_the_consumer() {
        init_tracing();
        let standin = StandIn::start();
        let target = standin.base_url().trim_start_matches("http://").to_string();
        let proxy = ToggleProxy::start(&target).await;
        let t = ServiceBus::builder(&standin.connection_string())
            .base_url(format!("http://127.0.0.1:{}", proxy.port()))
            .lock_duration(Duration::from_secs(2))
            .request_timeout(Duration::from_secs(2))
            .build()
            .expect("transport");
        let queue = unique("lost-lock");
        // The first delivery's cancellation token, and the delivery counts that were consumed.
        let first: Arc<Mutex<Option<tokio_util::sync::CancellationToken>>> = Arc::default();
        let consumed: Arc<Mutex<Vec<Option<u32>>>> = Arc::default();
        let (f, c) = (first.clone(), consumed.clone());
        let bus = Bus::builder()
            .transport(t.clone())
            .receive_endpoint(queue.clone(), move |e| {
                e.handler(move |ctx: ConsumeContext<LongJob>| {
                    let (f, c) = (f.clone(), c.clone());
                    async move {
                        let count = ctx.delivery_count();
                        if count == Some(1) {
                            *f.lock().expect("lock") = Some(ctx.cancellation().clone());
                            // Long work, stopped by the cancellation (the endpoint may also
                            // drop this future once the token fires).
                            let _ = tokio::time::timeout(
                                Duration::from_secs(15),
                                ctx.cancellation().cancelled(),
                            )
                            .await;
                            return Err(ConsumeError::with_kind(
                                ConsumeErrorKind::Cancelled,
                                "Tests::LockLost",
                                "the lock was lost",
                            ));
                        }
                        c.lock().expect("lock").push(count);
                        Ok(())
                    }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        bus.send(format!("queue:{queue}"), LongJob { n: 1 })
            .await
            .expect("send");
        // Once the first delivery runs, cut the consumer off from Service Bus until its lock
        // has run out.
        wait_until(WAIT, "the first delivery started", || {
            first.lock().expect("lock").is_some()
        })
        .await;
        proxy.down();
        let token = first.lock().expect("lock").clone().expect("token");
        // The lock is 2 s; renewals fail while the proxy is down. Before the fix nothing
        // cancelled the consumer: this waited the full bound.
        wait_until(
            Duration::from_secs(10),
            "the consumer was cancelled",
            || token.is_cancelled(),
        )
        .await;
        proxy.up();
        wait_until(WAIT, "the message was delivered again and consumed", || {
            !consumed.lock().expect("lock").is_empty()
        })
        .await;
        let consumed = consumed.lock().expect("lock").clone();
        assert!(
            consumed.iter().all(|c| c.unwrap_or(0) >= 2),
            "consumed on a later delivery: {consumed:?}"
        );
        running.shutdown().await.expect("shutdown");
    }
}
