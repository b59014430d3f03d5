//! `inmemory`: busway on its in-memory transport (full pipeline: envelope, serializer,
//! endpoint, settlement) vs a tokio channel carrying the same envelope encoded and decoded
//! by hand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::BoxError;
use busway::InMemory;
use tokio::sync::mpsc;

use super::{BenchTransport, BuswaySide};
use crate::message::{BenchMessage, RawEnvelope, Tally, WAIT, send_open_loop};
use crate::{Scenario, Settings, Side};

impl BenchTransport for InMemory {}

/// The in-memory scenario.
#[derive(Debug)]
pub struct InMemoryScenario;

#[async_trait]
impl Scenario for InMemoryScenario {
    fn name(&self) -> &'static str {
        "inmemory"
    }

    fn description(&self) -> String {
        "busway publish → in-memory transport → consumer vs tokio mpsc + serde_json of the same envelope".into()
    }

    async fn available(&self) -> Result<(), String> {
        Ok(())
    }

    async fn busway(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        Ok(BuswaySide::boxed(
            Arc::new(|_: &str| Ok(InMemory::new())),
            settings,
        ))
    }

    async fn raw(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        Ok(Box::new(ChannelSide {
            settings: settings.clone(),
            backlog: None,
        }))
    }

    fn sides(&self) -> (&'static str, &'static str) {
        ("busway", "tokio mpsc")
    }
}

struct ChannelSide {
    settings: Settings,
    backlog: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
}

const DESTINATION: &str = "loopback://localhost/bench";

/// Reads `n` envelopes from `rx`, decoding each.
async fn drain<R>(mut recv: R, n: usize, tally: &Tally) -> Result<(), BoxError>
where
    R: FnMut() -> Option<Vec<u8>>,
{
    let mut got = 0;
    while got < n {
        match recv() {
            Some(bytes) => {
                let envelope = RawEnvelope::decode(&bytes)?;
                tally.record(&envelope.message);
                got += 1;
            }
            None => tokio::task::yield_now().await,
        }
    }
    Ok(())
}

fn spawn_consumer(
    mut rx: mpsc::Receiver<Vec<u8>>,
    tally: Arc<Tally>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            let envelope = RawEnvelope::decode(&bytes).map_err(|e| e.to_string())?;
            tally.record(&envelope.message);
        }
        Ok(())
    })
}

#[async_trait]
impl Side for ChannelSide {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let (tx, rx) = mpsc::unbounded_channel();
        for i in 0..n {
            let m = BenchMessage::new(i as u64, self.settings.payload);
            tx.send(RawEnvelope::encode(m, DESTINATION))?;
        }
        self.backlog = Some(rx);
        Ok(())
    }

    async fn consume(&mut self, n: usize) -> Result<Duration, BoxError> {
        let mut rx = self.backlog.take().ok_or("consume before publish")?;
        let tally = Tally::new(n, false);
        drain(|| rx.try_recv().ok(), n, &tally).await?;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let (tx, rx) = mpsc::channel(usize::from(self.settings.prefetch.max(1)));
        let tally = Tally::new(n, false);
        let consumer = spawn_consumer(rx, tally.clone());
        let started = Instant::now();
        for i in 0..n {
            let m = BenchMessage::new(i as u64, self.settings.payload);
            tx.send(RawEnvelope::encode(m, DESTINATION)).await?;
        }
        tally.wait(WAIT).await?;
        let took = started.elapsed();
        drop(tx);
        consumer.await??;
        Ok(took)
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let (tx, rx) = mpsc::channel(usize::from(self.settings.prefetch.max(1)));
        let tally = Tally::new(n, true);
        let consumer = spawn_consumer(rx, tally.clone());
        send_open_loop(n, rate, self.settings.payload, |m| {
            let tx = tx.clone();
            async move {
                tx.send(RawEnvelope::encode(m, DESTINATION)).await?;
                Ok(())
            }
        })
        .await?;
        tally.wait(WAIT).await?;
        drop(tx);
        consumer.await??;
        Ok(tally.latencies())
    }
}
