//! Consumes `Crashy` messages from a Service Bus endpoint and never finishes one: prints
//! `started`, then `received <n> delivery <count>` for each delivery, and holds it (renewing
//! its lock) until killed. Used by the lock-expiry test, which kills it with SIGKILL.
//!
//! Usage: `servicebus-probe <connection-string> <base-url> <queue> <lock-seconds>`

use std::io::Write;
use std::time::Duration;

use busway::prelude::*;
use busway::servicebus::ServiceBus;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:BuswayTests:Crashy")]
struct Crashy {
    n: u32,
}

#[tokio::main]
async fn main() -> busway::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [connection, base_url, queue, lock] = args.as_slice() else {
        eprintln!("usage: servicebus-probe <connection-string> <base-url> <queue> <lock-seconds>");
        std::process::exit(2);
    };
    let transport = ServiceBus::builder(connection)
        .base_url(base_url)
        .lock_duration(Duration::from_secs(lock.parse().unwrap_or(2)))
        .build()?;
    let bus = Bus::builder()
        .transport(transport)
        .receive_endpoint(queue.clone(), |e| {
            e.handler(|ctx: ConsumeContext<Crashy>| async move {
                {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(
                        out,
                        "received {} delivery {}",
                        ctx.message().n,
                        ctx.delivery_count().unwrap_or(0)
                    );
                    let _ = out.flush();
                }
                std::future::pending::<()>().await;
                Ok(())
            })
        })
        .build()
        .await?;
    let running = bus.start().await?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "started");
        let _ = out.flush();
    }
    running.run_until_signal().await
}
