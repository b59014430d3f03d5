//! `run_until_signal`: SIGTERM and SIGINT stop the bus gracefully, finishing in-flight work.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_and_signal(signal: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_signal-probe"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("the probe starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert_eq!(first, "ready");
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let begun = Instant::now();
    let rest: Vec<String> = lines.map(|l| l.expect("utf-8")).collect();
    let exit = child.wait().expect("the probe exits");
    assert!(exit.success(), "exit status {exit:?}, output {rest:?}");
    assert_eq!(
        rest,
        vec!["tick consumed", "stopped"],
        "the in-flight message finished before the bus stopped"
    );
    assert!(begun.elapsed() < Duration::from_secs(10));
}

#[test]
fn sigterm_shuts_down_gracefully() {
    run_and_signal("TERM");
}

#[test]
fn sigint_shuts_down_gracefully() {
    run_and_signal("INT");
}
