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
        "{} is missing; build the examples with `cargo test --workspace --all-features` or `cargo build -p busway-examples --examples --all-features`",
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

/// Runs `<example> consume --count N` and, once `ready` returns, `<example> publish --count
/// N` with `env`; both must succeed. Returns the consumer's JSON lines.
fn orders_round_trip(
    name: &str,
    count: usize,
    env: &[(&str, String)],
    ready: impl FnOnce(),
) -> Vec<serde_json::Value> {
    let count = count.to_string();
    let run = |mode: &str| {
        let mut command = Command::new(example(name));
        command.args([mode, "--count", count.as_str()]);
        for (k, v) in env {
            command.env(k, v);
        }
        command
    };
    let consumer = run("consume")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("consume starts");
    ready();
    let publish = run("publish").output().expect("publish runs");
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
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[test]
fn rabbitmq_orders_publishes_and_consumes() {
    let vhost = TestVhost::create("example");
    // Give the consumer time to declare its endpoint before publishing.
    let lines = orders_round_trip(
        "rabbitmq-orders",
        5,
        &[("BUSWAY_RABBITMQ_URL", vhost.url())],
        || std::thread::sleep(Duration::from_secs(1)),
    );
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
    let lines = orders_round_trip("kafka-orders", 3, &[], || {
        std::thread::sleep(Duration::from_secs(2));
    });
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|l| l["orderId"].is_string() && l["total"].is_string())
    );
}

/// The Service Bus example, run against the local stand-in (no Azure here): consume and
/// publish as two processes, through `BUSWAY_ASB_CONNECTION_STRING` and
/// `BUSWAY_ASB_BASE_URL`.
#[test]
fn servicebus_orders_publishes_and_consumes_on_the_standin() {
    let standin = busway_integration_tests::servicebus::StandIn::start();
    let env = [
        ("BUSWAY_ASB_CONNECTION_STRING", standin.connection_string()),
        ("BUSWAY_ASB_BASE_URL", standin.base_url()),
    ];
    // The consumer declares its queue and subscription; publishes before that reach nobody.
    let lines = orders_round_trip("servicebus-orders", 3, &env, || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while standin.subscriptions("Contracts/OrderPlaced").is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer never subscribed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["orderId"].is_string()));
    assert_eq!(
        standin.subscriptions("Contracts/OrderPlaced"),
        vec![(
            "order-confirmation".to_string(),
            Some("order-confirmation".to_string())
        )]
    );
}

/// Without a connection string the example says what to set.
#[test]
fn servicebus_orders_explains_a_missing_connection_string() {
    let out = Command::new(example("servicebus-orders"))
        .env_remove("BUSWAY_ASB_CONNECTION_STRING")
        .args(["publish", "--count", "1"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("BUSWAY_ASB_CONNECTION_STRING"), "{stderr}");
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

fn run_order_saga(database_url: Option<&str>, rabbitmq: bool) {
    let mut command = Command::new(example("order-saga"));
    match database_url {
        Some(url) => command.env("DATABASE_URL", url),
        None => command.env_remove("DATABASE_URL"),
    };
    if rabbitmq {
        busway_integration_tests::rabbit::require_broker();
        command.arg("--rabbitmq");
    }
    let out = command.output().expect("order-saga runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "OrderPlaced -> Submitted (paid 0 of 42.50)",
        "PaymentReceived -> Submitted (paid 20.00 of 42.50)",
        "PaymentReceived -> Paid (paid 42.50 of 42.50)",
        "ItemShipped -> Final",
        "PaymentTimeout -> Cancelled",
        "the paid order closed: completed",
        "the unpaid order closed: cancelled",
        "done",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.matches("PaymentTimeout ->").count(),
        1,
        "the paid order's timeout was unscheduled:\n{stdout}"
    );
}

#[test]
fn order_saga_on_sqlite_and_the_in_memory_transport() {
    run_order_saga(None, false);
}

#[test]
fn order_saga_on_postgres_and_rabbitmq() {
    let url = busway_integration_tests::db::postgres_url();
    busway_integration_tests::db::require_postgres();
    run_order_saga(Some(&url), true);
}
