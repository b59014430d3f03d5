//! The runnable examples, run as a user would run them (`cargo test` builds them first).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use busway_integration_tests::rabbit::TestVhost;

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing; build the examples with `cargo test --workspace` or `cargo build --examples`",
        path.display()
    );
    path
}

#[test]
fn quickstart_runs_the_seed_scenario() {
    let out = Command::new(example("quickstart"))
        .output()
        .expect("quickstart runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "1. place an order",
        "domain event: sales statistics updated in-process",
        "consumed OrderPlaced on `send-confirmation-email`",
        "consumed ConfirmationSent",
        "3. request/response",
        "is placed",
        "ReserveInventory attempt 3 failed",
        "consumed Fault<OrderPlaced>",
        "reserve-inventory_error holds message",
        "MT-Reason=fault",
        "done: the bus shut down cleanly",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
}

#[test]
fn rabbitmq_orders_publishes_and_consumes() {
    let vhost = TestVhost::create("example");
    let consumer = Command::new(example("rabbitmq-orders"))
        .args(["consume", "--count", "5"])
        .env("BUSWAY_RABBITMQ_URL", vhost.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("consume starts");
    // Give the consumer time to declare its endpoint before publishing.
    std::thread::sleep(Duration::from_secs(1));
    let publish = Command::new(example("rabbitmq-orders"))
        .args(["publish", "--count", "5"])
        .env("BUSWAY_RABBITMQ_URL", vhost.url())
        .output()
        .expect("publish runs");
    assert!(
        publish.status.success(),
        "{}",
        String::from_utf8_lossy(&publish.stderr)
    );
    let out = consumer.wait_with_output().expect("consume exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 5);
    for l in &lines {
        for key in ["orderId", "customerId", "total", "occurredAt"] {
            assert!(l.get(key).is_some(), "{key} in {l}");
        }
        assert!(l["total"].is_string(), "decimal as string: {l}");
    }
}

#[test]
fn kafka_orders_publishes_and_consumes() {
    busway_integration_tests::kafka::require_broker();
    let consumer = Command::new(example("kafka-orders"))
        .args(["consume", "--count", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("consume starts");
    std::thread::sleep(Duration::from_secs(2));
    let publish = Command::new(example("kafka-orders"))
        .args(["publish", "--count", "3"])
        .output()
        .expect("publish runs");
    assert!(
        publish.status.success(),
        "{}",
        String::from_utf8_lossy(&publish.stderr)
    );
    let out = consumer.wait_with_output().expect("consume exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|l| l["orderId"].is_string() && l["total"].is_string())
    );
}

fn run_outbox_orders(database_url: Option<&str>) {
    let mut command = Command::new(example("outbox-orders"));
    match database_url {
        Some(url) => command.env("DATABASE_URL", url),
        None => command.env_remove("DATABASE_URL"),
    };
    let out = command.output().expect("outbox-orders runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "the dispatcher delivered OrderPlaced",
        "nothing was published for it",
        "orders stored by this run: 1",
        "done",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
}

#[test]
fn outbox_orders_on_sqlite() {
    run_outbox_orders(None);
}

#[test]
fn outbox_orders_on_postgres() {
    let url = busway_integration_tests::db::postgres_url();
    busway_integration_tests::db::require_postgres();
    run_outbox_orders(Some(&url));
}
