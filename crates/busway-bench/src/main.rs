//! `busway-bench`: runs the benchmark scenarios and writes the report.
//!
//! ```text
//! cargo run --release -p busway-bench -- all
//! cargo run --release -p busway-bench -- rabbitmq kafka --pairs 7 --payload 1024
//! cargo run --release -p busway-bench -- all --smoke --out /tmp/bench   # a quick check
//! busway-bench count inmemory --messages 10000 --side busway   # fixed work, for callgrind
//! ```
//!
//! `count` runs exactly one end-to-end pass of N messages on one side and nothing else (no
//! warm-up, calibration or paced latency phase), so the instructions it executes depend on N
//! only: `(I(2N) - I(N)) / N` under `valgrind --tool=callgrind` is the cost per message.

use std::path::PathBuf;
use std::process::ExitCode;

use busway_bench::report::{Machine, Report, markdown, write};
use busway_bench::{ScenarioResult, Settings, run_scenario, scenarios};

const USAGE: &str = "usage: busway-bench [all|inmemory|mediator|rabbitmq|rabbitmq-json|ruststream|hexeract|kafka|outbox|outbox-batch|saga|saga-memory|backlog]... \
[--messages N] [--seconds S] [--payload BYTES] [--pairs K] [--window W] [--prefetch P] \
[--latency-fraction F] [--backlog N] [--out DIR] [--no-plots] [--smoke]";

const ALL: [&str; 12] = [
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
    "backlog",
];

fn parse(args: &[String]) -> Result<(Vec<String>, Settings), String> {
    let mut settings = Settings::default();
    let mut names = Vec::new();
    let mut smoke = false;
    let mut out_given = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut value = || {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or(format!("{a} needs a value; {USAGE}"))
        };
        let number = |v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("`{v}` is not a number"))
        };
        match a {
            "--messages" => settings.messages = Some(number(value()?)? as usize),
            "--seconds" => settings.seconds = number(value()?)?,
            "--payload" => settings.payload = number(value()?)? as usize,
            "--pairs" => settings.pairs = (number(value()?)? as usize).max(1),
            "--window" => settings.window = (number(value()?)? as usize).max(1),
            "--prefetch" => settings.prefetch = (number(value()?)? as u16).max(1),
            "--latency-fraction" => settings.latency_fraction = number(value()?)?.clamp(0.01, 1.0),
            "--backlog" => settings.backlog = (number(value()?)? as usize).max(1),
            "--out" => {
                settings.out = PathBuf::from(value()?);
                out_given = true;
            }
            "--no-plots" => settings.plots = false,
            "--smoke" => smoke = true,
            "-h" | "--help" => return Err(USAGE.into()),
            "all" => names.extend(ALL.iter().map(|s| s.to_string())),
            name if ALL.contains(&name) => names.push(name.to_string()),
            other => return Err(format!("unknown argument `{other}`; {USAGE}")),
        }
        i += 1;
    }
    if names.is_empty() {
        return Err(USAGE.into());
    }
    if smoke {
        settings.messages = Some(settings.messages.unwrap_or(200));
        settings.pairs = 1;
        settings.backlog = settings.backlog.min(500);
        if !out_given {
            settings.out = std::env::temp_dir().join("busway-bench-smoke");
        }
    }
    names.dedup();
    Ok((names, settings))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("backlog-side") {
        return backlog_side(&args[1..]).await;
    }
    if args.first().map(String::as_str) == Some("count") {
        return count(&args[1..]).await;
    }
    let (names, settings) = match parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; run with --release for numbers worth reporting");
    }
    let mut results: Vec<ScenarioResult> = Vec::new();
    let broker_scenarios = scenarios::all();
    for name in &names {
        let result = match name.as_str() {
            "mediator" => scenarios::mediator::run(&settings).await,
            "backlog" => scenarios::backlog::run(&settings).await,
            other => match broker_scenarios.iter().find(|s| s.name() == other) {
                Some(s) => run_scenario(s.as_ref(), &settings).await,
                None => continue,
            },
        };
        results.push(result);
    }
    let report = Report {
        machine: Machine::detect(),
        settings: settings.clone(),
        scenarios: results,
    };
    println!("{}", markdown(&report));
    match write(&report, &settings.out, settings.plots) {
        Ok(files) => {
            for f in files {
                eprintln!("wrote {f}");
            }
        }
        Err(e) => {
            eprintln!("writing the report failed: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut failed = false;
    for r in &report.scenarios {
        if let Some(reason) = &r.skipped {
            eprintln!("not run: {} ({reason})", r.name);
            failed |= reason.starts_with("failed");
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The child half of the backlog scenario: `backlog-side <busway|lapin> [options]`; prints
/// its measurements as one JSON line.
async fn backlog_side(args: &[String]) -> ExitCode {
    let Some(label) = args.first() else {
        eprintln!("backlog-side needs a side: busway or lapin");
        return ExitCode::from(2);
    };
    let mut rest = vec!["backlog".to_string()];
    rest.extend(args[1..].iter().cloned());
    let settings = match parse(&rest) {
        Ok((_, s)) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match scenarios::backlog::run_side(&settings, label).await {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("backlog {label}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `count <scenario> --messages N [--side busway|raw]`: one end-to-end pass of exactly N
/// messages on one side of a broker scenario; prints the elapsed time.
async fn count(args: &[String]) -> ExitCode {
    let mut side_name = "busway".to_string();
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--side" {
            match args.get(i + 1) {
                Some(v) => side_name = v.clone(),
                None => {
                    eprintln!("--side needs busway or raw");
                    return ExitCode::from(2);
                }
            }
            i += 2;
        } else {
            rest.push(args[i].clone());
            i += 1;
        }
    }
    let (names, settings) = match parse(&rest) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let all = scenarios::all();
    let (Some(name), Some(n)) = (names.first(), settings.messages) else {
        eprintln!("usage: busway-bench count <scenario> --messages N [--side busway|raw]");
        return ExitCode::from(2);
    };
    let Some(scenario) = all.iter().find(|s| s.name() == name) else {
        eprintln!(
            "`count` runs a broker scenario (inmemory, rabbitmq, kafka, outbox), not `{name}`"
        );
        return ExitCode::from(2);
    };
    if let Err(reason) = scenario.available().await {
        eprintln!("{name} is not available: {reason}");
        return ExitCode::FAILURE;
    }
    let side = match side_name.as_str() {
        "busway" => scenario.busway(&settings).await,
        "raw" => scenario.raw(&settings).await,
        other => {
            eprintln!("unknown side `{other}`: busway or raw");
            return ExitCode::from(2);
        }
    };
    let mut side = match side {
        Ok(side) => side,
        Err(e) => {
            eprintln!("{name} {side_name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = side.end_to_end(n).await;
    side.cleanup().await;
    match result {
        Ok(elapsed) => {
            println!("{name} {side_name}: {n} messages end to end in {elapsed:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name} {side_name}: {e}");
            ExitCode::FAILURE
        }
    }
}
