//! Topology: the endpoints, their consumed message types and options, computed once from the
//! registrations, deployed by the transport and printable for people (text and Mermaid).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use crate::urn::{EntityNameStyle, Urn};

/// Transport-specific endpoint options, keyed by type (`http::Extensions`-like).
///
/// Transport crates add their own option types here through extension traits on the
/// endpoint configurator (a RabbitMQ quorum queue, a Kafka topic name) and read them back in
/// `Transport::deploy`.
#[derive(Clone, Default)]
pub struct Extensions {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Extensions {
    /// Stores a value, replacing one of the same type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The stored value of type `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.as_ref().downcast_ref::<T>())
    }

    /// True if nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.len())
            .finish()
    }
}

/// One receive endpoint as the transport must declare it.
///
/// The bus builds these; a transport's own tests can make one with
/// [`EndpointTopology::new`] and set the public fields (the type is `#[non_exhaustive]`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointTopology {
    /// The endpoint (queue) name.
    pub name: String,
    /// The endpoint's full address on the transport.
    pub address: String,
    /// Message types the endpoint consumes; publishes of these types reach it.
    pub message_types: Vec<Urn>,
    /// How many unacknowledged deliveries the broker may hand the endpoint at once.
    pub prefetch: u16,
    /// How many deliveries the endpoint processes at once.
    pub concurrency: usize,
    /// Temporary endpoints (the bus's response endpoint) are deleted when the bus stops.
    pub temporary: bool,
    /// Whether message types are bound to the endpoint (MassTransit's
    /// `ConfigureConsumeTopology`). When false only sends reach it.
    pub bind_message_types: bool,
    /// Consumer type names, for display.
    pub consumers: Vec<String>,
    /// Transport-specific options.
    pub extensions: Extensions,
}

impl EndpointTopology {
    /// An endpoint `name` at `address` that consumes nothing yet: prefetch and concurrency
    /// 16, durable, binding the message types it is given.
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            message_types: Vec::new(),
            prefetch: 16,
            concurrency: 16,
            temporary: false,
            bind_message_types: true,
            consumers: Vec::new(),
            extensions: Extensions::default(),
        }
    }

    /// The error queue name (`<name>_error`).
    pub fn error_queue(&self) -> String {
        format!("{}_error", self.name)
    }

    /// The skipped queue name (`<name>_skipped`).
    pub fn skipped_queue(&self) -> String {
        format!("{}_skipped", self.name)
    }
}

/// The whole topology of a bus.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Receive endpoints, in registration order.
    pub endpoints: Vec<EndpointTopology>,
}

impl Topology {
    /// The endpoint named `name`.
    pub fn endpoint(&self, name: &str) -> Option<&EndpointTopology> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// Every message type consumed somewhere, without duplicates, in first-seen order.
    pub fn message_types(&self) -> Vec<Urn> {
        let mut out: Vec<Urn> = Vec::new();
        for e in &self.endpoints {
            for t in &e.message_types {
                if !out.contains(t) {
                    out.push(t.clone());
                }
            }
        }
        out
    }
}

/// A topology as its transport names it, for printing: the entities each endpoint reads
/// from and moves to, in the transport's own terms (exchanges and queues on RabbitMQ,
/// topics and consumer groups on Kafka). Made by [`crate::transport::Transport::describe`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TopologyView {
    /// One view per endpoint, in registration order.
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint in its transport's terms.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointView {
    /// The endpoint as the bus planned it (name, address, options, consumers).
    pub topology: EndpointTopology,
    /// What the endpoint reads from: `queue orders`, `consumer group orders`.
    pub input: String,
    /// Where its messages come from: a label (a message type URN, or `sends`) and the
    /// entity (`exchange Contracts:OrderPlaced`, `topic contracts.order-placed`).
    pub sources: Vec<(String, String)>,
    /// Where faulted messages go: `queue orders_error`, `topic orders.orders.error`.
    pub error: String,
    /// Where messages nobody consumes go.
    pub skipped: String,
}

impl EndpointView {
    /// A view of `endpoint` reading from `input`, with no sources yet.
    pub fn new(
        endpoint: &EndpointTopology,
        input: impl Into<String>,
        error: impl Into<String>,
        skipped: impl Into<String>,
    ) -> Self {
        Self {
            topology: endpoint.clone(),
            input: input.into(),
            sources: Vec::new(),
            error: error.into(),
            skipped: skipped.into(),
        }
    }

    /// A view of `endpoint` reading from its own queue and moving to `<name>_error` and
    /// `<name>_skipped` queues, with no sources yet.
    pub fn queues(endpoint: &EndpointTopology) -> Self {
        Self::new(
            endpoint,
            format!("queue {}", endpoint.name),
            format!("queue {}", endpoint.error_queue()),
            format!("queue {}", endpoint.skipped_queue()),
        )
    }

    /// Adds a source: messages labelled `label` arrive from `entity`.
    pub fn with_source(mut self, label: impl Into<String>, entity: impl Into<String>) -> Self {
        self.sources.push((label.into(), entity.into()));
        self
    }
}

impl TopologyView {
    /// A view of the given endpoints.
    pub fn new(endpoints: Vec<EndpointView>) -> Self {
        Self { endpoints }
    }

    /// MassTransit's exchanges-and-queues view, message-type exchanges named in `style`: the
    /// default of transports that use that model (RabbitMQ, in-memory).
    pub fn exchanges_and_queues(topology: &Topology, style: &EntityNameStyle) -> Self {
        let endpoints = topology
            .endpoints
            .iter()
            .map(|e| {
                let mut view =
                    EndpointView::queues(e).with_source("sends", format!("exchange {}", e.name));
                if e.bind_message_types {
                    for t in &e.message_types {
                        view = view
                            .with_source(t.as_str(), format!("exchange {}", t.entity_name(style)));
                    }
                }
                view
            })
            .collect();
        Self { endpoints }
    }

    /// A plain-text description: one block per endpoint.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for e in &self.endpoints {
            write_endpoint_header(&mut out, &e.topology);
            let _ = writeln!(out, "  reads {}", e.input);
            for (label, entity) in &e.sources {
                let _ = writeln!(out, "  {label} <- {entity}");
            }
            let _ = writeln!(out, "  faults -> {}, skipped -> {}", e.error, e.skipped);
        }
        out
    }

    /// A Mermaid `flowchart`: sources → input → consumers, and the fault and skipped
    /// entities.
    pub fn to_mermaid(&self) -> String {
        fn id(name: &str) -> String {
            let cleaned: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("n_{cleaned}")
        }
        let mut out = String::from("flowchart LR\n");
        let mut declared: Vec<String> = Vec::new();
        let mut node = |out: &mut String, label: &str, shape: (&str, &str)| {
            let n = id(label);
            if !declared.contains(&n) {
                let _ = writeln!(out, "  {n}{}\"{label}\"{}", shape.0, shape.1);
                declared.push(n.clone());
            }
            n
        };
        for e in &self.endpoints {
            let input = node(&mut out, &e.input, ("[(", ")]"));
            for (_, entity) in &e.sources {
                let source = node(&mut out, entity, ("{{", "}}"));
                let _ = writeln!(out, "  {source} --> {input}");
            }
            for c in &e.topology.consumers {
                let consumer = node(
                    &mut out,
                    &format!("{} / {c}", e.topology.name),
                    ("([", "])"),
                );
                let _ = writeln!(out, "  {input} --> {consumer}");
            }
            let error = node(&mut out, &e.error, ("[(", ")]"));
            let skipped = node(&mut out, &e.skipped, ("[(", ")]"));
            let _ = writeln!(out, "  {input} -. fault .-> {error}");
            let _ = writeln!(out, "  {input} -. skipped .-> {skipped}");
        }
        out
    }
}

/// The first lines of an endpoint's block: name, address, options, consumers.
fn write_endpoint_header(out: &mut String, e: &EndpointTopology) {
    let _ = writeln!(
        out,
        "endpoint {} ({}){}",
        e.name,
        e.address,
        if e.temporary { " [temporary]" } else { "" }
    );
    let _ = writeln!(
        out,
        "  prefetch {}, concurrency {}",
        e.prefetch, e.concurrency
    );
    for c in &e.consumers {
        let _ = writeln!(out, "  consumer {c}");
    }
}
