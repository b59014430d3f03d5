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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::address::{Address, AddressKind};
use crate::error::{Error, ErrorKind, Result};
use crate::topology::{EndpointTopology, Topology};
use crate::transport::{
    Capabilities, Delivery, DeliveryOptions, GiveBack, MoveError, MoveKind, QueueAdmin, Receiver,
    SettleOnDrop, Settlement, Transport, TransportMessage, TransportProfile, check_scheme,
};
use crate::urn::{EntityNameStyle, Urn};

/// The in-memory transport. Clone it to share one broker between several buses (competing
/// consumers, or a test that inspects queues while a bus runs).
#[derive(Clone, Default)]
pub struct InMemory {
    broker: Arc<Broker>,
}

#[derive(Default)]
struct Broker {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, Arc<Queue>>,
    /// The queues each exchange routed to, computed on first use; emptied by every change
    /// to exchanges, queues or bindings.
    routes: HashMap<String, Arc<[Arc<Queue>]>>,
}

#[derive(Default)]
struct Exchange {
    to_exchanges: Vec<String>,
    to_queues: Vec<String>,
}

struct Queue {
    name: String,
    temporary: bool,
    inner: Mutex<QueueInner>,
    notify: Notify,
}

#[derive(Default)]
struct QueueInner {
    ready: VecDeque<Stored>,
    unacked: usize,
    consumers: usize,
    deleted: bool,
}

struct Stored {
    message: TransportMessage,
    delivery_count: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    fn new(name: &str, temporary: bool) -> Self {
        Self {
            name: name.to_string(),
            temporary,
            inner: Mutex::new(QueueInner::default()),
            notify: Notify::new(),
        }
    }

    fn push_back(&self, stored: Stored) {
        {
            let mut q = lock(&self.inner);
            if q.deleted {
                return;
            }
            q.ready.push_back(stored);
        }
        self.notify.notify_one();
    }

    fn push_front(&self, stored: Stored) {
        {
            let mut q = lock(&self.inner);
            q.unacked = q.unacked.saturating_sub(1);
            if q.deleted {
                return;
            }
            q.ready.push_front(stored);
        }
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Stored> {
        let mut q = lock(&self.inner);
        let mut stored = q.ready.pop_front()?;
        stored.delivery_count += 1;
        q.unacked += 1;
        Some(stored)
    }

    fn settled(&self) {
        let mut q = lock(&self.inner);
        q.unacked = q.unacked.saturating_sub(1);
    }
}

impl Broker {
    fn declare_exchange(state: &mut State, name: &str) {
        if !state.exchanges.contains_key(name) {
            state
                .exchanges
                .insert(name.to_string(), Exchange::default());
            state.routes.clear();
        }
    }

    fn declare_queue(state: &mut State, name: &str, temporary: bool) -> Arc<Queue> {
        if let Some(q) = state.queues.get(name) {
            return q.clone();
        }
        let q = Arc::new(Queue::new(name, temporary));
        state.queues.insert(name.to_string(), q.clone());
        state.routes.clear();
        q
    }

    fn exchange_mut<'s>(state: &'s mut State, name: &str) -> &'s mut Exchange {
        Self::declare_exchange(state, name);
        state
            .exchanges
            .get_mut(name)
            .expect("the exchange was just declared")
    }

    fn bind_queue(state: &mut State, exchange: &str, queue: &str) {
        let e = Self::exchange_mut(state, exchange);
        if !e.to_queues.iter().any(|q| q == queue) {
            e.to_queues.push(queue.to_string());
            state.routes.clear();
        }
    }

    fn bind_exchange(state: &mut State, source: &str, destination: &str) {
        if source == destination {
            return;
        }
        Self::declare_exchange(state, destination);
        let e = Self::exchange_mut(state, source);
        if !e.to_exchanges.iter().any(|x| x == destination) {
            e.to_exchanges.push(destination.to_string());
            state.routes.clear();
        }
    }

    /// Declares exchange `name`, queue `name` and the binding between them.
    fn declare_endpoint(state: &mut State, name: &str, temporary: bool) -> Arc<Queue> {
        Self::declare_exchange(state, name);
        let q = Self::declare_queue(state, name, temporary);
        Self::bind_queue(state, name, name);
        q
    }

    /// Every queue reachable from `exchange`, once each (cached until the topology changes).
    fn routes(state: &mut State, exchange: &str) -> Arc<[Arc<Queue>]> {
        if let Some(r) = state.routes.get(exchange) {
            return r.clone();
        }
        let r: Arc<[Arc<Queue>]> = Self::route(state, exchange).into();
        state.routes.insert(exchange.to_string(), r.clone());
        r
    }

    /// Every queue reachable from `exchange`, once each.
    fn route(state: &State, exchange: &str) -> Vec<Arc<Queue>> {
        let mut seen_exchanges = HashSet::new();
        let mut seen_queues = HashSet::new();
        let mut out = Vec::new();
        let mut stack = vec![exchange.to_string()];
        while let Some(x) = stack.pop() {
            if !seen_exchanges.insert(x.clone()) {
                continue;
            }
            let Some(e) = state.exchanges.get(&x) else {
                continue;
            };
            for q in &e.to_queues {
                if seen_queues.insert(q.clone())
                    && let Some(queue) = state.queues.get(q)
                {
                    out.push(queue.clone());
                }
            }
            stack.extend(e.to_exchanges.iter().cloned());
        }
        out
    }

    fn deliver(&self, exchange: &str, message: TransportMessage) -> usize {
        let queues = Self::routes(&mut lock(&self.state), exchange);
        Self::push_all(&queues, message)
    }

    /// Declares `exchange` (bound to the exchanges of `also`) and delivers to its queues,
    /// under one lock; a publish of a single-type message to a known exchange is one lookup.
    fn publish(&self, exchange: &str, also: &[Urn], message: TransportMessage) -> usize {
        let queues = {
            let mut state = lock(&self.state);
            // A cached route implies the exchange exists: topology changes clear the cache.
            let cached = if also.is_empty() {
                state.routes.get(exchange).cloned()
            } else {
                None
            };
            match cached {
                Some(queues) => queues,
                None => {
                    Self::declare_publish(&mut state, exchange, also);
                    Self::routes(&mut state, exchange)
                }
            }
        };
        Self::push_all(&queues, message)
    }

    /// Declares the exchange of a message's first type, bound to those of its other types.
    fn declare_publish(state: &mut State, exchange: &str, also: &[Urn]) {
        Self::declare_exchange(state, exchange);
        for other in also {
            Self::bind_exchange(state, exchange, &exchange_for(other));
        }
    }

    fn push_all(queues: &[Arc<Queue>], message: TransportMessage) -> usize {
        if let Some((last, rest)) = queues.split_last() {
            for q in rest {
                q.push_back(Stored {
                    message: message.clone(),
                    delivery_count: 0,
                });
            }
            last.push_back(Stored {
                message,
                delivery_count: 0,
            });
        }
        queues.len()
    }

    fn delete_queue(&self, name: &str) {
        let mut state = lock(&self.state);
        if let Some(q) = state.queues.remove(name) {
            lock(&q.inner).deleted = true;
        }
        state.exchanges.remove(name);
        state.routes.clear();
        for e in state.exchanges.values_mut() {
            e.to_queues.retain(|q| q != name);
            e.to_exchanges.retain(|x| x != name);
        }
    }
}

/// How the in-memory transport names a message type's exchange: `Ns:Type`, as MassTransit
/// names RabbitMQ exchanges, so what a test sees matches what RabbitMQ would show.
pub const ENTITY_NAMES: EntityNameStyle = EntityNameStyle::COLONS;

fn exchange_for(urn: &Urn) -> Arc<str> {
    urn.entity_name_shared(&ENTITY_NAMES)
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

struct InMemoryReceiver {
    broker: Arc<Broker>,
    queue: Arc<Queue>,
    prefetch: Arc<Semaphore>,
    stopped: bool,
}

#[async_trait]
impl Receiver for InMemoryReceiver {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.stopped {
            return None;
        }
        let permit = self.prefetch.clone().acquire_owned().await.ok()?;
        loop {
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.queue.inner).deleted {
                return None;
            }
            if let Some(stored) = self.queue.pop() {
                let message = stored.message.clone();
                let delivery_count = stored.delivery_count;
                return Some(Ok(Delivery {
                    message,
                    redelivered: delivery_count > 1,
                    delivery_count: Some(delivery_count),
                    lost: None,
                    settlement: Box::new(InMemorySettlement {
                        broker: self.broker.clone(),
                        unacked: SettleOnDrop::new(Unacked {
                            queue: self.queue.clone(),
                            stored,
                        }),
                        _permit: permit,
                    }),
                }));
            }
            notified.await;
        }
    }

    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let remaining = {
            let mut q = lock(&self.queue.inner);
            q.consumers = q.consumers.saturating_sub(1);
            q.consumers
        };
        // Wake another receiver on the queue in case this one held a notification.
        self.queue.notify.notify_one();
        if self.queue.temporary && remaining == 0 {
            self.broker.delete_queue(&self.queue.name);
        }
        Ok(())
    }
}

struct InMemorySettlement {
    broker: Arc<Broker>,
    unacked: SettleOnDrop<Unacked>,
    _permit: OwnedSemaphorePermit,
}

/// A delivery not yet settled: it goes back to the front of its queue if the settlement is
/// dropped.
struct Unacked {
    queue: Arc<Queue>,
    stored: Stored,
}

impl GiveBack for Unacked {
    fn give_back(self) {
        self.queue.push_front(self.stored);
    }
}

impl InMemorySettlement {
    fn ack_now(&mut self) -> Option<Arc<Queue>> {
        let Unacked { queue, .. } = self.unacked.take()?;
        queue.settled();
        Some(queue)
    }
}

#[async_trait]
impl Settlement for InMemorySettlement {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.ack_now();
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<()> {
        if let Some(unacked) = self.unacked.take() {
            unacked.give_back();
        }
        Ok(())
    }

    async fn move_to(
        mut self: Box<Self>,
        kind: MoveKind,
        message: TransportMessage,
    ) -> std::result::Result<(), MoveError> {
        let Some(unacked) = self.unacked.get() else {
            return Ok(());
        };
        let target = kind.queue_name(&unacked.queue.name);
        let queue = {
            let mut state = lock(&self.broker.state);
            Broker::declare_queue(&mut state, &target, false)
        };
        queue.push_back(Stored {
            message,
            delivery_count: 0,
        });
        self.ack_now();
        Ok(())
    }

    async fn redeliver(
        mut self: Box<Self>,
        message: TransportMessage,
        delay: Duration,
    ) -> Result<()> {
        if let Some(queue) = self.ack_now() {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                queue.push_back(Stored {
                    message,
                    delivery_count: 0,
                });
            });
        }
        Ok(())
    }
}
