//! The broker inside the process: exchanges, queues, bindings and the routes between them,
//! held under one lock; each queue with its ready messages, consumer count and waiters.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::transport::TransportMessage;
use crate::urn::{EntityNameStyle, Urn};

#[derive(Default)]
pub(super) struct Broker {
    pub(super) state: Mutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) exchanges: HashMap<String, Exchange>,
    pub(super) queues: HashMap<String, Arc<Queue>>,
    /// The queues each exchange routed to, computed on first use; emptied by every change
    /// to exchanges, queues or bindings.
    pub(super) routes: HashMap<String, Arc<[Arc<Queue>]>>,
}

#[derive(Default)]
pub(super) struct Exchange {
    pub(super) to_exchanges: Vec<String>,
    pub(super) to_queues: Vec<String>,
}

pub(super) struct Queue {
    pub(super) name: String,
    pub(super) temporary: bool,
    pub(super) inner: Mutex<QueueInner>,
    pub(super) notify: Notify,
}

#[derive(Default)]
pub(super) struct QueueInner {
    pub(super) ready: VecDeque<Stored>,
    pub(super) unacked: usize,
    pub(super) consumers: usize,
    pub(super) deleted: bool,
}

pub(super) struct Stored {
    pub(super) message: TransportMessage,
    pub(super) delivery_count: u32,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    pub(super) fn new(name: &str, temporary: bool) -> Self {
        Self {
            name: name.to_string(),
            temporary,
            inner: Mutex::new(QueueInner::default()),
            notify: Notify::new(),
        }
    }

    pub(super) fn push_back(&self, stored: Stored) {
        {
            let mut q = lock(&self.inner);
            if q.deleted {
                return;
            }
            q.ready.push_back(stored);
        }
        self.notify.notify_one();
    }

    pub(super) fn push_front(&self, stored: Stored) {
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

    pub(super) fn pop(&self) -> Option<Stored> {
        let mut q = lock(&self.inner);
        let mut stored = q.ready.pop_front()?;
        stored.delivery_count += 1;
        q.unacked += 1;
        Some(stored)
    }

    pub(super) fn settled(&self) {
        let mut q = lock(&self.inner);
        q.unacked = q.unacked.saturating_sub(1);
    }
}

impl Broker {
    pub(super) fn declare_exchange(state: &mut State, name: &str) {
        if !state.exchanges.contains_key(name) {
            state
                .exchanges
                .insert(name.to_string(), Exchange::default());
            state.routes.clear();
        }
    }

    pub(super) fn declare_queue(state: &mut State, name: &str, temporary: bool) -> Arc<Queue> {
        if let Some(q) = state.queues.get(name) {
            return q.clone();
        }
        let q = Arc::new(Queue::new(name, temporary));
        state.queues.insert(name.to_string(), q.clone());
        state.routes.clear();
        q
    }

    pub(super) fn exchange_mut<'s>(state: &'s mut State, name: &str) -> &'s mut Exchange {
        Self::declare_exchange(state, name);
        state
            .exchanges
            .get_mut(name)
            .expect("the exchange was just declared")
    }

    pub(super) fn bind_queue(state: &mut State, exchange: &str, queue: &str) {
        let e = Self::exchange_mut(state, exchange);
        if !e.to_queues.iter().any(|q| q == queue) {
            e.to_queues.push(queue.to_string());
            state.routes.clear();
        }
    }

    pub(super) fn bind_exchange(state: &mut State, source: &str, destination: &str) {
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
    pub(super) fn declare_endpoint(state: &mut State, name: &str, temporary: bool) -> Arc<Queue> {
        Self::declare_exchange(state, name);
        let q = Self::declare_queue(state, name, temporary);
        Self::bind_queue(state, name, name);
        q
    }

    /// Every queue reachable from `exchange`, once each (cached until the topology changes).
    pub(super) fn routes(state: &mut State, exchange: &str) -> Arc<[Arc<Queue>]> {
        if let Some(r) = state.routes.get(exchange) {
            return r.clone();
        }
        let r: Arc<[Arc<Queue>]> = Self::route(state, exchange).into();
        state.routes.insert(exchange.to_string(), r.clone());
        r
    }

    /// Every queue reachable from `exchange`, once each.
    pub(super) fn route(state: &State, exchange: &str) -> Vec<Arc<Queue>> {
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

    pub(super) fn deliver(&self, exchange: &str, message: TransportMessage) -> usize {
        let queues = Self::routes(&mut lock(&self.state), exchange);
        Self::push_all(&queues, message)
    }

    /// Declares `exchange` (bound to the exchanges of `also`) and delivers to its queues,
    /// under one lock; a publish of a single-type message to a known exchange is one lookup.
    pub(super) fn publish(&self, exchange: &str, also: &[Urn], message: TransportMessage) -> usize {
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
    pub(super) fn declare_publish(state: &mut State, exchange: &str, also: &[Urn]) {
        Self::declare_exchange(state, exchange);
        for other in also {
            Self::bind_exchange(state, exchange, &exchange_for(other));
        }
    }

    pub(super) fn push_all(queues: &[Arc<Queue>], message: TransportMessage) -> usize {
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

    pub(super) fn delete_queue(&self, name: &str) {
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

pub(super) fn exchange_for(urn: &Urn) -> Arc<str> {
    urn.entity_name_shared(&ENTITY_NAMES)
}
