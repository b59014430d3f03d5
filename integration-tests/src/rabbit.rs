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
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl could not run ({e}); it is needed for this test"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
