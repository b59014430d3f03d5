//! Consumes numbered messages from Kafka and prints each number as it finishes; used by the
//! commit test, which kills it with SIGKILL mid-stream and starts it again.
//!
//! Usage: `kafka-probe <brokers> <topic-prefix> <endpoint> <max-in-flight>`

use std::io::Write;
use std::time::Duration;

use busway::kafka::{Kafka, KafkaEndpointExt};
use busway::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:BuswayTests:Numbered")]
struct Numbered {
    n: u32,
}

#[tokio::main]
async fn main() -> busway::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [brokers, prefix, endpoint, window] = args.as_slice() else {
        eprintln!("usage: kafka-probe <brokers> <topic-prefix> <endpoint> <max-in-flight>");
        std::process::exit(2);
    };
    let window: usize = window.parse().unwrap_or(50);
    // Diagnostics go to stderr (the commit test keeps them for its failure message).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,busway_kafka=debug".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let transport = Kafka::builder(brokers)
        .topic_prefix(prefix)
        .commit_every(1)
        .commit_interval(Duration::from_millis(100))
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "1000")
        .build()?;
    let bus = Bus::builder()
        .transport(transport)
        .receive_endpoint(endpoint.clone(), move |e| {
            e.max_in_flight(window).prefetch(16).handler(
                |ctx: ConsumeContext<Numbered>| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{}", ctx.message().n);
                    let _ = out.flush();
                    Ok(())
                },
            )
        })
        .build()
        .await?;
    let running = bus.start().await?;
    eprintln!("started");
    running.run_until_signal().await
}
