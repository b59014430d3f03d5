//! Microsoft's own reading of the Service Bus REST protocol, held against the local stand-in
//! (which is not Azure: see `busway_integration_tests::servicebus`). The npm package
//! `azure-sb` 0.11.2, Microsoft's Node.js REST client (pinned in `integration-tests/node`),
//! runs `integration-tests/node/azure-sb-check.js` against the stand-in: create a queue, a
//! topic and a subscription, send with custom and broker properties, peek-lock, renew, unlock,
//! receive again, complete, fan out through the topic, exceed the max delivery count into the
//! dead-letter queue and read it there, and delete. Every step must pass, and the stand-in's
//! own counters must show the operations happened.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use busway_integration_tests::servicebus::StandIn;
use busway_integration_tests::support::unique;

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// Runs `command` in `dir` to completion within `limit`; its exit status and output.
fn run(mut command: Command, limit: Duration, what: &str) -> (bool, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "could not run {what} ({e}): install Node.js and npm (apt-get install nodejs npm)"
            )
        });
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {limit:?}; stderr: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = out.join().unwrap_or_default();
    let errors = err.join().unwrap_or_default();
    (status.success(), format!("{text}{errors}"))
}

/// `npm ci` when the pinned client is not installed yet (the first run fetches 62 packages
/// from the npm registry).
fn install_client() {
    if node_dir()
        .join("node_modules/azure-sb/package.json")
        .exists()
    {
        return;
    }
    let mut npm = Command::new("npm");
    npm.args(["ci", "--no-audit", "--no-fund"])
        .current_dir(node_dir());
    let (ok, output) = run(npm, Duration::from_secs(180), "npm ci");
    assert!(ok, "npm ci in {} failed:\n{output}", node_dir().display());
}

#[test]
fn microsofts_rest_client_agrees_with_the_stand_in() {
    install_client();
    let secret = "c2VjcmV0LWZvci10aGUtYXp1cmUtc2ItY2hlY2s=";
    let standin = StandIn::builder().key("azsbcheck", secret, true).start();
    let connection = format!(
        "Endpoint={}/;SharedAccessKeyName=azsbcheck;SharedAccessKey={secret}",
        standin.base_url()
    );
    let mut node = Command::new("node");
    node.arg("azure-sb-check.js")
        .arg(&connection)
        .arg(unique("azsb"))
        .current_dir(node_dir());
    let (ok, output) = run(node, Duration::from_secs(240), "node azure-sb-check.js");
    let steps: Vec<serde_json::Value> = output
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let failed: Vec<String> = steps
        .iter()
        .filter(|s| s["ok"] != true)
        .map(|s| format!("{}: {} {}", s["step"], s["error"], s["detail"]))
        .collect();
    assert!(
        ok && failed.is_empty() && steps.len() >= 22,
        "azure-sb disagrees with the stand-in in {} of {} steps:\n{}\n--- output ---\n{output}",
        failed.len(),
        steps.len(),
        failed.join("\n")
    );
    let counts = standin.counts();
    println!(
        "azure-sb: {} steps passed; stand-in counts {counts:?}",
        steps.len()
    );
    assert_eq!(
        counts.unauthorized, 0,
        "every token azure-sb made was accepted"
    );
    assert!(counts.sent >= 3, "{counts:?}");
    assert!(counts.completed >= 2, "{counts:?}");
    assert!(counts.renewed >= 1, "{counts:?}");
    assert!(counts.unlocked >= 3, "{counts:?}");
    assert_eq!(counts.dead_lettered, 1, "{counts:?}");
}
