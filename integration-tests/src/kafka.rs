//! Helpers for tests against the local Kafka-protocol broker (nisshi on 127.0.0.1:9092).

use std::net::TcpStream;
use std::time::Duration;

use busway::kafka::Kafka;

/// The brokers for tests: `BUSWAY_KAFKA_BROKERS` or 127.0.0.1:9092.
pub fn brokers() -> String {
    Kafka::env_brokers()
}

/// Panics with how to start the broker when nothing listens.
pub fn require_broker() {
    crate::support::start_watchdog();
    let brokers = brokers();
    let first = brokers
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&first)
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        .unwrap_or(false);
    assert!(
        reachable,
        "no Kafka-protocol broker is reachable at {first} (BUSWAY_KAFKA_BROKERS={brokers}). Start nisshi with \
         `scripts/services` (it installs it with `cargo +1.96.0 install nisshi --locked --version 0.8.1 \
         --no-default-features --features dynostore` if missing), or run `nisshi broker --listener-url \
         tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://nisshi/`."
    );
}

/// A transport whose derived topics carry a prefix of their own, so tests never see each
/// other's (or earlier runs') records.
pub fn isolated_transport(partitions: i32) -> Kafka {
    require_broker();
    let prefix = format!("{}.", crate::support::unique("t"));
    Kafka::builder(&brokers())
        .topic_prefix(&prefix)
        .partitions(partitions)
        .publish_timeout(Duration::from_secs(20))
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "1000")
        .build()
        .expect("a valid Kafka configuration")
}

/// The dead-letter (`kind` = `error`) or skipped topics of an endpoint.
pub async fn endpoint_topics(kafka: &Kafka, endpoint: &str, kind: &str) -> Vec<String> {
    let prefix = kafka.config().topic_prefix().to_string();
    let suffix = format!(".{endpoint}.{kind}");
    kafka
        .topic_names()
        .await
        .expect("topic metadata")
        .into_iter()
        .filter(|t| t.starts_with(&prefix) && t.ends_with(&suffix))
        .collect()
}

/// A nisshi broker of its own with a TLS-only listener on a free loopback port, serving a
/// self-signed certificate for `localhost` and 127.0.0.1 (made with the `openssl` command).
/// Stopped when dropped.
#[derive(Debug)]
pub struct TlsBroker {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl TlsBroker {
    /// Starts it; panics with the fix when nisshi or openssl is missing or it does not come up
    /// within 30 s.
    pub fn start() -> Self {
        crate::support::start_watchdog();
        let dir = std::env::temp_dir().join(crate::support::unique("kafka-tls"));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        self_signed(&dir, "server");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.join("broker.log")).expect("a log file");
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new("nisshi")
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tls/"])
            .arg("--cert")
            .arg(dir.join("server.pem"))
            .arg("--key")
            .arg(dir.join("server.key"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "could not start nisshi ({e}): install it with `scripts/services` (it runs \
                     `cargo +1.96.0 install nisshi --locked --version 0.8.1 --no-default-features \
                     --features dynostore`)"
                )
            });
        let mut broker = Self { child, dir, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return broker;
            }
            let exited = broker.child.try_wait().ok().flatten();
            if exited.is_some() || std::time::Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(broker.dir.join("broker.log")).unwrap_or_default();
                panic!("the TLS nisshi broker did not come up on port {port} ({exited:?}): {log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The certificate the broker serves (its own CA), to trust.
    pub fn ca(&self) -> String {
        self.dir.join("server.pem").display().to_string()
    }

    /// Another self-signed certificate, which did not sign the broker's.
    pub fn unrelated_ca(&self) -> String {
        self_signed(&self.dir, "other");
        self.dir.join("other.pem").display().to_string()
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `<dir>/<name>.pem` and `<dir>/<name>.key`: a self-signed certificate for `localhost` and
/// 127.0.0.1, valid for a day.
fn self_signed(dir: &std::path::Path, name: &str) {
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem")))
        .output()
        .unwrap_or_else(|e| {
            panic!("the `openssl` command is needed to make a test certificate: {e}")
        });
    assert!(
        out.status.success(),
        "openssl could not make a certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
