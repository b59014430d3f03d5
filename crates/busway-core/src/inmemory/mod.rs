//! The in-memory transport (`loopback://localhost/...`): a small broker inside the process
//! with RabbitMQ's model, so what works here works on a broker.
//!
//! - Fanout exchanges, queues, exchange-to-exchange and exchange-to-queue bindings; a
//!   message reaches each bound queue once however many paths lead there.
//! - Publish goes to the message type's exchange (`Contracts:OrderPlaced`); each endpoint has
//!   an exchange and a queue of its own name, and consumed types are bound to it.
//! - Competing consumers: several receivers (several buses sharing one [`InMemory`]) on one
//!   queue each get different messages.
//! - Prefetch: a receiver holds at most `prefetch` unacknowledged deliveries.
//! - Unsettled deliveries (a dropped task, a crash) go back to the front of their queue.
//! - Delayed delivery by timer; error and skipped queues that tests can read.
//! - Messages travel as serialized bytes, exactly as on a broker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::address::{Address, AddressKind};
use crate::error::{Error, ErrorKind, Result};
use crate::topology::{EndpointTopology, Topology};
use crate::transport::{
    Capabilities, DeliveryOptions, QueueAdmin, Receiver, Transport, TransportMessage,
    TransportProfile, check_scheme,
};
use crate::urn::Urn;

mod broker;
mod receive;

pub use broker::ENTITY_NAMES;
use broker::{Broker, Queue, exchange_for, lock};
use receive::InMemoryReceiver;

/// The in-memory transport. Clone it to share one broker between several buses (competing
/// consumers, or a test that inspects queues while a bus runs).
#[derive(Clone, Default)]
pub struct InMemory {
    broker: Arc<Broker>,
}

impl InMemory {
    /// A new, empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        lock(&self.broker.state).queues.get(name).cloned()
    }

    /// Messages waiting in a queue (not counting unacknowledged deliveries).
    pub fn queue_len(&self, queue: &str) -> usize {
        self.queue(queue)
            .map(|q| lock(&q.inner).ready.len())
            .unwrap_or(0)
    }

    /// Deliveries handed to receivers and not yet settled.
    pub fn unacked(&self, queue: &str) -> usize {
        self.queue(queue)
            .map(|q| lock(&q.inner).unacked)
            .unwrap_or(0)
    }

    /// A copy of the messages waiting in a queue, oldest first.
    pub fn messages(&self, queue: &str) -> Vec<TransportMessage> {
        self.queue(queue)
            .map(|q| {
                lock(&q.inner)
                    .ready
                    .iter()
                    .map(|s| s.message.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes and returns the messages waiting in a queue.
    pub fn take(&self, queue: &str) -> Vec<TransportMessage> {
        self.queue(queue)
            .map(|q| lock(&q.inner).ready.drain(..).map(|s| s.message).collect())
            .unwrap_or_default()
    }

    /// True if a queue of that name exists.
    pub fn has_queue(&self, queue: &str) -> bool {
        self.queue(queue).is_some()
    }

    /// Names of all queues, sorted.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.broker.state).queues.keys().cloned().collect();
        names.sort();
        names
    }

    /// True if exchange `source` is bound to exchange or queue `destination`.
    pub fn has_binding(&self, source: &str, destination: &str) -> bool {
        lock(&self.broker.state)
            .exchanges
            .get(source)
            .map(|e| {
                e.to_exchanges.iter().any(|x| x == destination)
                    || e.to_queues.iter().any(|q| q == destination)
            })
            .unwrap_or(false)
    }
}

/// The in-memory broker's queues, through the admin interface every transport has.
#[async_trait]
impl QueueAdmin for InMemory {
    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        Ok(self.queue_len(queue) as u64)
    }

    async fn take_messages(&self, queue: &str, max: usize) -> Result<Vec<TransportMessage>> {
        Ok(self
            .queue(queue)
            .map(|q| {
                let mut inner = lock(&q.inner);
                let n = max.min(inner.ready.len());
                inner.ready.drain(..n).map(|s| s.message).collect()
            })
            .unwrap_or_default())
    }

    async fn purge_queue(&self, queue: &str) -> Result<u64> {
        Ok(self.take(queue).len() as u64)
    }

    async fn delete_queues(&self, queues: &[String]) -> Result<()> {
        for q in queues {
            self.broker.delete_queue(q);
        }
        Ok(())
    }
}

impl fmt::Debug for InMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.broker.state);
        f.debug_struct("InMemory")
            .field("exchanges", &state.exchanges.len())
            .field("queues", &state.queues.len())
            .finish()
    }
}

#[async_trait]
impl Transport for InMemory {
    fn profile(&self) -> TransportProfile {
        TransportProfile::new("loopback")
            .with_capabilities(Capabilities::new().with_delayed_delivery(true))
            .with_entity_names(ENTITY_NAMES)
    }

    fn endpoint_address(&self, name: &str) -> String {
        format!("loopback://localhost/{name}")
    }

    fn publish_address(&self, message_type: &Urn) -> String {
        self.endpoint_address(&exchange_for(message_type))
    }

    async fn deploy(&self, topology: &Topology) -> Result<()> {
        let mut state = lock(&self.broker.state);
        for e in &topology.endpoints {
            Broker::declare_endpoint(&mut state, &e.name, e.temporary);
            if e.bind_message_types {
                for t in &e.message_types {
                    Broker::bind_exchange(&mut state, &exchange_for(t), &e.name);
                }
            }
            if !e.temporary {
                Broker::declare_queue(&mut state, &e.error_queue(), false);
                Broker::declare_queue(&mut state, &e.skipped_queue(), false);
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        message_types: &[Urn],
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()> {
        let Some(first) = message_types.first() else {
            return Err(Error::new(
                ErrorKind::Config,
                "cannot publish a message without a message type",
            ));
        };
        let exchange = exchange_for(first);
        if options.delay.is_none_or(|d| d.is_zero()) {
            self.broker.publish(&exchange, &message_types[1..], message);
            return Ok(());
        }
        Broker::declare_publish(
            &mut lock(&self.broker.state),
            &exchange,
            &message_types[1..],
        );
        self.deliver_later(exchange, message, options.delay);
        Ok(())
    }

    async fn send(
        &self,
        address: &Address,
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()> {
        check_scheme("in-memory", address, &["loopback"])?;
        let name = address.name().to_string();
        {
            let mut state = lock(&self.broker.state);
            match address.kind() {
                AddressKind::Exchange | AddressKind::Topic => {
                    Broker::declare_exchange(&mut state, &name);
                }
                _ => {
                    Broker::declare_endpoint(&mut state, &name, false);
                }
            }
        }
        self.deliver_later(name, message, options.delay);
        Ok(())
    }

    async fn receive(&self, endpoint: &EndpointTopology) -> Result<Box<dyn Receiver>> {
        let queue = {
            let mut state = lock(&self.broker.state);
            let q = Broker::declare_endpoint(&mut state, &endpoint.name, endpoint.temporary);
            lock(&q.inner).consumers += 1;
            q
        };
        Ok(Box::new(InMemoryReceiver {
            broker: self.broker.clone(),
            queue,
            prefetch: Arc::new(Semaphore::new(usize::from(endpoint.prefetch.max(1)))),
            stopped: false,
        }))
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

impl InMemory {
    fn deliver_later<E>(&self, exchange: E, message: TransportMessage, delay: Option<Duration>)
    where
        E: AsRef<str> + Send + 'static,
    {
        match delay.filter(|d| !d.is_zero()) {
            None => {
                self.broker.deliver(exchange.as_ref(), message);
            }
            Some(delay) => {
                let broker = self.broker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    broker.deliver(exchange.as_ref(), message);
                });
            }
        }
    }
}
