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
