//! A started bus: [`Bus::start`] and the [`RunningBus`] handle that shuts it down.

use std::fmt;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, DEFAULT_SHUTDOWN_TIMEOUT};
use crate::error::{Error, ErrorKind, Result};

impl Bus {
    /// Starts every receive endpoint. Returns a handle to stop them.
    pub async fn start(&self) -> Result<RunningBus> {
        let starter = self
            .shared()
            .starter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::config("the bus was already started"))?;
        let started = starter(self.clone()).await?;
        tracing::info!(endpoints = started.endpoints.len(), "bus started");
        Ok(RunningBus {
            bus: self.clone(),
            stop: started.stop,
            hard: started.hard,
            endpoints: started.endpoints,
            done: false,
        })
    }
}

/// A started bus. Stop it with [`RunningBus::shutdown`]: intake stops, in-flight messages
/// finish (up to a deadline, then they are cancelled and returned to their queues), and the
/// transport closes. Dropping it without shutdown stops intake only.
pub struct RunningBus {
    bus: Bus,
    stop: CancellationToken,
    hard: CancellationToken,
    endpoints: Vec<(String, JoinHandle<()>)>,
    done: bool,
}

impl RunningBus {
    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Graceful shutdown with the default deadline (30 s).
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown_within(DEFAULT_SHUTDOWN_TIMEOUT).await
    }

    /// Graceful shutdown: stop taking deliveries, let in-flight ones finish within
    /// `deadline`, then cancel what is left (those messages go back to their queues), and
    /// close the transport.
    pub async fn shutdown_within(mut self, deadline: Duration) -> Result<()> {
        self.done = true;
        self.stop.cancel();
        let endpoints = std::mem::take(&mut self.endpoints);
        let names: Vec<String> = endpoints.iter().map(|(n, _)| n.clone()).collect();
        let mut handles: Vec<JoinHandle<()>> = endpoints.into_iter().map(|(_, h)| h).collect();
        let drained =
            tokio::time::timeout(deadline, futures_util::future::join_all(handles.iter_mut()))
                .await;
        if drained.is_err() {
            tracing::warn!(?deadline, endpoints = ?names, "in-flight messages did not finish before the shutdown deadline; cancelling them");
            self.hard.cancel();
            let grace = Duration::from_secs(5);
            if tokio::time::timeout(grace, futures_util::future::join_all(handles.iter_mut()))
                .await
                .is_err()
            {
                for h in &handles {
                    h.abort();
                }
            }
        }
        self.bus.stop_response_endpoint().await;
        self.bus.transport().close().await?;
        tracing::info!("bus stopped");
        Ok(())
    }

    /// Runs until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<()> {
        wait_for_signal().await?;
        tracing::info!("signal received; shutting down");
        self.shutdown().await
    }
}

async fn wait_for_signal() -> Result<()> {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| {
                Error::with_source(ErrorKind::Config, "could not listen for SIGTERM", e)
            })?;
        tokio::select! {
            r = ctrl_c => r.map_err(|e| Error::with_source(ErrorKind::Config, "could not listen for Ctrl-C", e)),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c
            .await
            .map_err(|e| Error::with_source(ErrorKind::Config, "could not listen for Ctrl-C", e))
    }
}

impl Drop for RunningBus {
    fn drop(&mut self) {
        if !self.done {
            self.stop.cancel();
        }
    }
}

impl fmt::Debug for RunningBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningBus")
            .field(
                "endpoints",
                &self.endpoints.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}
