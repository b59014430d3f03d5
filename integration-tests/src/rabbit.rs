//! Helpers for tests against the local RabbitMQ.

use std::net::TcpStream;
use std::time::Duration;

use busway::rabbitmq::RabbitMq;

/// The broker URL for tests: `BUSWAY_RABBITMQ_URL` or the local guest user.
pub fn url() -> String {
    RabbitMq::env_url()
}

/// Panics with how to start RabbitMQ when nothing listens on its port.
pub fn require_broker() {
    crate::support::start_watchdog();
    let url = url();
    let hostport = url
        .split('@')
        .next_back()
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_string();
    let hostport = if hostport.contains(':') {
        hostport
    } else {
        format!("{hostport}:5672")
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .ok()
        .and_then(|mut a| a.next());
    let reachable = addr
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        .unwrap_or(false);
    assert!(
        reachable,
        "RabbitMQ is not reachable at {hostport} (BUSWAY_RABBITMQ_URL={url}). Start it with \
         `rabbitmq-server -detached` (or `scripts/services`, or `docker compose up -d rabbitmq`)."
    );
}

/// A transport for tests, with short timeouts so failures show quickly.
pub fn transport_for(url: &str) -> RabbitMq {
    require_broker();
    RabbitMq::builder(url)
        .connection_name("busway-tests")
        .publish_timeout(Duration::from_secs(20))
        .build()
        .expect("the test URL is valid")
}

/// Runs `rabbitmqctl` with arguments; panics with its output when it fails.
///
/// Bounded: a call that takes longer than 90 s (a broker that stopped answering) is killed
/// and fails the test.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("timeout")
        .arg("90")
        .arg("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl could not run ({e}); it is needed for this test"));
    assert!(
        out.status.code() != Some(124),
        "rabbitmqctl {args:?} did not finish within 90 s"
    );
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A virtual host of its own for one test, deleted when dropped.
#[derive(Debug)]
pub struct TestVhost {
    name: String,
}

impl TestVhost {
    /// Creates `busway-<tag>-<id>` and gives the guest user all permissions on it.
    pub fn create(tag: &str) -> Self {
        require_broker();
        let name = crate::support::unique(&format!("busway-{tag}"));
        rabbitmqctl(&["-q", "add_vhost", &name]);
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            &name,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        Self { name }
    }

    /// The vhost name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest URL of this vhost on the local broker.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    /// `rabbitmqctl list_<what> -p <vhost> <columns>` as JSON rows.
    pub fn list(&self, what: &str, columns: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["-q", "--formatter", "json", what, "-p", &self.name];
        args.extend_from_slice(columns);
        let out = rabbitmqctl(&args);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("rabbitmqctl {what} printed no JSON ({e}): {out}"))
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("timeout")
            .args(["60", "rabbitmqctl", "-q", "delete_vhost", &self.name])
            .output();
    }
}

/// A raw AMQP client, standing in for a .NET service's RabbitMQ client: publishing bytes
/// shaped as MassTransit writes them and reading what busway writes, without busway's code.
pub mod raw {
    use std::time::Duration;

    use futures_util::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::{FieldTable, ShortString};
    use lapin::{
        BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
    };
    use serde_json::Value;

    /// A connection and a channel with publisher confirms on `url`.
    pub async fn channel(url: &str) -> (Connection, Channel) {
        let connection = tokio::time::timeout(
            Duration::from_secs(20),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        .expect("connecting to RabbitMQ timed out")
        .expect("a raw AMQP connection (is RabbitMQ up? `rabbitmq-server -detached`)");
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("publisher confirms");
        (connection, channel)
    }

    /// The AMQP properties MassTransit sets on every message: its content type, persistent.
    pub fn masstransit_properties() -> BasicProperties {
        BasicProperties::default()
            .with_content_type(ShortString::from("application/vnd.masstransit+json"))
            .with_delivery_mode(2)
    }

    /// Publishes `body` to `exchange` with `properties` and waits for the broker's confirm.
    pub async fn publish(
        channel: &Channel,
        exchange: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(""),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            confirm.is_ack(),
            "the broker took the message for `{exchange}`"
        );
    }

    /// Declares durable queue `queue` bound to durable fanout exchange `exchange` and
    /// consumes it without acks: what a MassTransit consumer of that exchange would get.
    pub async fn tap(channel: &Channel, exchange: &str, queue: &str) -> Consumer {
        bind_queue(channel, exchange, queue).await;
        consume(channel, queue).await
    }

    /// Declares durable queue `queue` bound to durable fanout exchange `exchange`.
    pub async fn bind_queue(channel: &Channel, exchange: &str, queue: &str) {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                ShortString::from(exchange),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .expect("the tapped exchange");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(ShortString::from(queue), durable, FieldTable::default())
            .await
            .expect("the tap queue");
        channel
            .queue_bind(
                ShortString::from(queue),
                ShortString::from(exchange),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("binding the tap queue");
    }

    /// Consumes `queue` without acks.
    pub async fn consume(channel: &Channel, queue: &str) -> Consumer {
        channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(format!("raw-{queue}")),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consuming")
    }

    /// The next message's body as JSON; panics naming `what` after `timeout`.
    pub async fn next_json(consumer: &mut Consumer, timeout: Duration, what: &str) -> Value {
        let delivery = tokio::time::timeout(timeout, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"))
            .expect("a delivery")
            .expect("a good delivery");
        serde_json::from_slice(&delivery.data).expect("a JSON body")
    }
}
