//! A smoke run of every scenario with a tiny message count: keeps the benchmark compiling and
//! working against the real services. It asserts that each scenario ran and accounted for
//! every message; it asserts nothing about speed.

use std::process::Command;

#[test]
fn every_scenario_runs_and_writes_the_report() {
    let out = std::env::temp_dir().join(format!("busway-bench-smoke-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_busway-bench"))
        .args([
            "all",
            "--smoke",
            "--messages",
            "100",
            "--backlog",
            "300",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("busway-bench runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "busway-bench failed (it needs RabbitMQ, PostgreSQL and a Kafka broker: scripts/services starts them)\n{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("valid JSON");
    let scenarios = json["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "inmemory",
            "mediator",
            "rabbitmq",
            "rabbitmq-json",
            "ruststream",
            "hexeract",
            "kafka",
            "outbox",
            "outbox-batch",
            "saga",
            "saga-memory",
            "backlog"
        ]
    );
    for s in scenarios {
        assert!(
            s["skipped"].is_null(),
            "{} did not run: {}\n{stderr}",
            s["name"],
            s["skipped"]
        );
    }
    for s in scenarios
        .iter()
        .filter(|s| s["pairs"].as_array().is_some_and(|p| !p.is_empty()))
    {
        for pair in s["pairs"].as_array().expect("pairs") {
            for run in pair.as_array().expect("a pair") {
                for phase in ["end_to_end", "publish", "consume"] {
                    assert_eq!(run[phase]["messages"], 100, "{}: {phase}", s["name"]);
                    assert!(run[phase]["rate"].as_f64().unwrap_or(0.0) > 0.0);
                }
                assert!(run["latency"]["samples"].as_u64().unwrap_or(0) >= 100);
            }
        }
        assert!(s["ratio_end_to_end"].as_f64().unwrap_or(0.0) > 0.0);
    }
    let mediator = &scenarios[1];
    assert!(
        mediator["extra"]["mediator_ns_per_dispatch"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
    let backlog = scenarios
        .iter()
        .find(|s| s["name"] == "backlog")
        .expect("the backlog scenario");
    for side in ["busway", "lapin"] {
        assert!(
            backlog["extra"][side]["drain_peak_rss_kb"]
                .as_u64()
                .unwrap_or(0)
                > 0
        );
    }
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for name in [
        "rabbitmq",
        "rabbitmq-json",
        "ruststream",
        "hexeract",
        "outbox-batch",
    ] {
        assert!(md.contains(&format!("| {name} |")), "{md}");
    }
    assert!(out.join("throughput.png").exists());
    assert!(out.join("latency-rabbitmq.png").exists());
    let _ = std::fs::remove_dir_all(&out);
}
