//! A bus that runs until SIGINT/SIGTERM; used by the lifecycle test.
//! Prints `ready` once its consumer is busy with a message, `tick consumed` when that
//! message is done, and `stopped` after the graceful shutdown.

use std::time::Duration;

use busway::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Message)]
struct Tick {
    n: u32,
}

#[tokio::main]
async fn main() -> busway::Result<()> {
    let bus = Bus::builder()
        .receive_endpoint("ticks", |e| {
            e.handler(|_: ConsumeContext<Tick>| async {
                println!("ready");
                tokio::time::sleep(Duration::from_millis(300)).await;
                println!("tick consumed");
                Ok(())
            })
        })
        .build()
        .await?;
    let running = bus.start().await?;
    bus.send("queue:ticks", Tick { n: 1 }).await?;
    running.run_until_signal().await?;
    println!("stopped");
    Ok(())
}
