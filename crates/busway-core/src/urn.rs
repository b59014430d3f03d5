//! Message type URNs (`urn:message:Namespace:TypeName`) and the entity names brokers derive
//! from them.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The prefix of every MassTransit message type URN.
pub const URN_PREFIX: &str = "urn:message:";

/// A message type URN such as `urn:message:Contracts:OrderPlaced`.
///
/// The URN is a message's routing identity on every transport and on the wire (the envelope's
/// `messageType` array). Cloning is cheap.
#[derive(Clone)]
pub struct Urn(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Urn {
    /// A URN from a static string, usable in `static` items.
    pub const fn from_static(urn: &'static str) -> Self {
        Self(Repr::Static(urn))
    }

    /// A URN from any string. The text is taken as is.
    pub fn new(urn: impl AsRef<str>) -> Self {
        Self(Repr::Shared(Arc::from(urn.as_ref())))
    }

    /// The default URN for a Rust type: `urn:message:{module.path}:{TypeName}`, where the
    /// module path's `::` separators become `.` (MassTransit's namespaces are dotted).
    pub fn from_module_path(module_path: &str, type_name: &str) -> Self {
        let namespace = module_path.replace("::", ".");
        Self::new(format!("{URN_PREFIX}{namespace}:{type_name}"))
    }

    /// The URN as text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(s) => s,
            Repr::Shared(s) => s,
        }
    }

    /// The URN of `Fault<T>` for this message type `T`:
    /// `urn:message:MassTransit:Fault[[Ns:T]]`.
    pub fn fault(&self) -> Urn {
        let inner = self
            .as_str()
            .strip_prefix(URN_PREFIX)
            .unwrap_or(self.as_str());
        Urn::new(format!("{URN_PREFIX}MassTransit:Fault[[{inner}]]"))
    }

    /// For a `Fault[[..]]` URN, the URN of the faulted message type.
    pub fn faulted_type(&self) -> Option<Urn> {
        let inner = self
            .as_str()
            .strip_prefix(URN_PREFIX)?
            .strip_prefix("MassTransit:Fault[[")?
            .strip_suffix("]]")?;
        Some(Urn::new(format!("{URN_PREFIX}{inner}")))
    }

    /// The parsed type name, when the URN has the `urn:message:` form.
    pub fn type_name(&self) -> Option<TypeName> {
        TypeName::parse(self.as_str().strip_prefix(URN_PREFIX)?)
    }

    /// The broker entity name for this type, as MassTransit's message name formatter writes it
    /// for the given transport style (`Contracts:OrderPlaced` for RabbitMQ,
    /// `Contracts/OrderPlaced` for Service Bus). A URN that does not parse is used whole, with
    /// characters brokers reject replaced by `-`.
    pub fn entity_name(&self, style: &EntityNameStyle) -> String {
        self.entity_name_shared(style).to_string()
    }

    /// Whether `other` names this message type. Like MassTransit, URNs are compared without
    /// regard to (ASCII) case: `urn:message:contracts:orderplaced` is
    /// `urn:message:Contracts:OrderPlaced`.
    ///
    /// ```
    /// use busway_core::Urn;
    /// let placed = Urn::new("urn:message:Contracts:OrderPlaced");
    /// assert!(placed.matches("URN:MESSAGE:contracts:orderplaced"));
    /// assert!(!placed.matches("urn:message:Contracts:OrderShipped"));
    /// ```
    pub fn matches(&self, other: &str) -> bool {
        self.as_str().eq_ignore_ascii_case(other)
    }

    /// [`Urn::entity_name`] as a shared string: no allocation when the name is cached.
    pub fn entity_name_shared(&self, style: &EntityNameStyle) -> Arc<str> {
        thread_local! {
            // The last name this thread asked for: a run of publishes of one type skips the
            // shared map's lock and hashing.
            static LAST: std::cell::RefCell<Option<LastName>> =
                const { std::cell::RefCell::new(None) };
        }
        let generation = OVERRIDES_GENERATION.load(Ordering::Acquire);
        let hit = LAST.with(|last| {
            last.borrow()
                .as_ref()
                .filter(|(g, urn, s, _)| *g == generation && urn == self && s == style)
                .map(|(_, _, _, name)| name.clone())
        });
        if let Some(name) = hit {
            return name;
        }
        let name = self.entity_name_shared_slow(style);
        LAST.with(|last| {
            *last.borrow_mut() = Some((generation, self.clone(), style.clone(), name.clone()))
        });
        name
    }

    fn entity_name_shared_slow(&self, style: &EntityNameStyle) -> Arc<str> {
        // Publishing asks for the same few names over and over: remember them (up to a
        // bound, so names of arbitrary types read off the wire cannot grow it forever).
        const MAX_CACHED: usize = 4096;
        let cache = NAME_CACHE.get_or_init(Default::default);
        let key = (self.clone(), style.clone());
        if let Some(name) = cache.read().ok().and_then(|c| c.get(&key).cloned()) {
            return name;
        }
        let name: Arc<str> = Arc::from(self.format_entity_name(style));
        if let Ok(mut c) = cache.write()
            && c.len() < MAX_CACHED
        {
            c.insert(key, name.clone());
        }
        name
    }

    fn format_entity_name(&self, style: &EntityNameStyle) -> String {
        let overridden = |urn: &Urn| {
            OVERRIDES
                .get()
                .and_then(|o| o.read().ok()?.get(urn).cloned())
        };
        if let Some(name) = overridden(self) {
            return name.to_string();
        }
        // A fault of a renamed type: MassTransit names `Fault<T>` after T's .NET type name,
        // which is what the override of a type whose URN differs from it gives.
        if let Some(faulted) = self.faulted_type()
            && let Some(inner) = overridden(&faulted)
        {
            return format!(
                "MassTransit{ns}Fault{sep}{inner}{sep}",
                ns = style.namespace_separator,
                sep = style.generic_separator
            );
        }
        match self.type_name() {
            Some(name) => style.format(&name),
            None => self
                .as_str()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect(),
        }
    }
}

type NameCache = RwLock<HashMap<(Urn, EntityNameStyle), Arc<str>>>;

/// A thread's last entity name: the override generation it was made in, URN, style, name.
type LastName = (u64, Urn, EntityNameStyle, Arc<str>);

/// Entity names computed so far, per URN and style.
static NAME_CACHE: OnceLock<NameCache> = OnceLock::new();

/// Entity names set for a message type ([`set_entity_name`]).
static OVERRIDES: OnceLock<RwLock<HashMap<Urn, Arc<str>>>> = OnceLock::new();

/// Bumped by every [`set_entity_name`], so names cached before it are not used after.
static OVERRIDES_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Names the broker entity (exchange, topic) of a message type on every transport, instead
/// of the name derived from its URN: MassTransit's `[EntityName("...")]`, or a .NET contract
/// whose `[MessageUrn]` differs from its type name (MassTransit names the exchange after the
/// type, not the URN). `#[message(entity_name = "...")]` calls it when the type is first
/// used. The name is used as given (a Kafka transport still makes it a valid topic name).
///
/// ```
/// use busway_core::Urn;
/// use busway_core::urn::{EntityNameStyle, set_entity_name};
///
/// let urn = Urn::new("urn:message:order-placed");
/// set_entity_name(&urn, "Contracts:OrderPlaced");
/// assert_eq!(urn.entity_name(&EntityNameStyle::COLONS), "Contracts:OrderPlaced");
/// // Its fault is named after the override, as MassTransit names `Fault<T>` after T's type.
/// assert_eq!(
///     urn.fault().entity_name(&EntityNameStyle::COLONS),
///     "MassTransit:Fault--Contracts:OrderPlaced--"
/// );
/// ```
pub fn set_entity_name(message_type: &Urn, entity_name: &str) {
    let overrides = OVERRIDES.get_or_init(Default::default);
    let mut map = overrides.write().unwrap_or_else(|e| e.into_inner());
    if map.get(message_type).map(|n| &**n) == Some(entity_name) {
        return;
    }
    map.insert(message_type.clone(), Arc::from(entity_name));
    // Names made before (of the type, and of types naming it, such as its fault) are stale.
    if let Some(cache) = NAME_CACHE.get() {
        cache.write().unwrap_or_else(|e| e.into_inner()).clear();
    }
    OVERRIDES_GENERATION.fetch_add(1, Ordering::Release);
}

/// The contracts each message type declares it implements directly.
static DIRECT_CONTRACTS: OnceLock<RwLock<HashMap<Urn, Arc<[Urn]>>>> = OnceLock::new();

/// Records the contracts `message_type` declares directly (`#[message(implements(..))]`
/// calls it when the type is first used), for transports that keep MassTransit's contract
/// hierarchy in their topology (Service Bus forwards each topic to its direct bases' topics).
pub fn set_direct_contracts(message_type: &Urn, contracts: Vec<Urn>) {
    DIRECT_CONTRACTS
        .get_or_init(Default::default)
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(message_type.clone(), Arc::from(contracts));
}

/// The contracts `message_type` declares directly, if it was recorded with
/// [`set_direct_contracts`].
pub fn direct_contracts(message_type: &Urn) -> Option<Arc<[Urn]>> {
    DIRECT_CONTRACTS
        .get()?
        .read()
        .ok()?
        .get(message_type)
        .cloned()
}

impl PartialEq for Urn {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Urn {}

impl Hash for Urn {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Urn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Urn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Borrow<str> for Urn {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Urn {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Urn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Urn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Urn {
    fn from(s: &str) -> Self {
        Urn::new(s)
    }
}

impl From<String> for Urn {
    fn from(s: String) -> Self {
        Urn(Repr::Shared(Arc::from(s)))
    }
}

impl Serialize for Urn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Urn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UrnVisitor;

        impl serde::de::Visitor<'_> for UrnVisitor {
            type Value = Urn;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message type URN")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Urn, E> {
                Ok(Urn::new(v))
            }
        }

        deserializer.deserialize_str(UrnVisitor)
    }
}

/// A .NET-style type name parsed from a URN: namespace, name (with `+` for nested types) and
/// generic arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeName {
    /// The namespace (`Company.Project`), if any.
    pub namespace: Option<String>,
    /// The type name; nested types are joined with `+` (`Outer+Inner`).
    pub name: String,
    /// Generic arguments, in order.
    pub arguments: Vec<TypeName>,
}

impl TypeName {
    /// The longest type name [`TypeName::parse`] reads, in bytes. Message types come off the
    /// wire: a bound keeps a hostile one from costing more than a real one.
    pub const MAX_LEN: usize = 2048;

    /// The deepest nesting of generic arguments [`TypeName::parse`] reads (`A[[B[[C]]]]` is
    /// 2). Parsing recurses once per level, so the bound is also a stack bound.
    pub const MAX_DEPTH: usize = 16;

    /// Parses the part of a URN after `urn:message:`: `Ns:Type`, `Type`,
    /// `Ns:Generic[[ArgNs:Arg],[ArgNs2:Arg2]]`. Text longer than [`TypeName::MAX_LEN`] or
    /// nested deeper than [`TypeName::MAX_DEPTH`] does not parse.
    pub fn parse(text: &str) -> Option<TypeName> {
        if text.len() > Self::MAX_LEN {
            return None;
        }
        Self::parse_at(text, 0)
    }

    fn parse_at(text: &str, depth: usize) -> Option<TypeName> {
        if depth > Self::MAX_DEPTH {
            return None;
        }
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let (head, args) = match text.find('[') {
            Some(open) => {
                let args_text = text[open..].strip_prefix('[')?.strip_suffix(']')?;
                (&text[..open], Some(args_text))
            }
            None => (text, None),
        };
        let (namespace, name) = match head.rfind(':') {
            Some(colon) => (Some(head[..colon].to_string()), &head[colon + 1..]),
            None => (None, head),
        };
        if name.is_empty() || namespace.as_deref() == Some("") {
            return None;
        }
        let mut arguments = Vec::new();
        if let Some(args_text) = args {
            for part in split_top_level(args_text)? {
                let inner = part.strip_prefix('[')?.strip_suffix(']')?;
                arguments.push(TypeName::parse_at(inner, depth + 1)?);
            }
        }
        Some(TypeName {
            namespace,
            name: name.to_string(),
            arguments,
        })
    }
}

/// Splits `[a],[b[[c]]]` into `[a]` and `[b[[c]]]`, honouring nesting.
fn split_top_level(text: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

/// The separators of MassTransit's message name formatter (`DefaultMessageNameFormatter`):
/// how a transport turns a type name into an entity name.
///
/// Each transport crate defines its own style next to the rest of its naming (RabbitMQ's
/// `Ns:Type` in `busway_rabbitmq::naming`, Service Bus's `Ns/Type` in
/// `busway_azure_servicebus::naming`); the in-memory transport's is
/// [`crate::inmemory::ENTITY_NAMES`].
///
/// ```
/// use busway_core::urn::{EntityNameStyle, Urn};
/// const DOTTED: EntityNameStyle = EntityNameStyle::new("..", "--", ".", "-");
/// let urn = Urn::new("urn:message:Acme:FileReceived");
/// assert_eq!(urn.entity_name(&DOTTED), "Acme.FileReceived");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityNameStyle {
    /// Between generic arguments (`::` on RabbitMQ).
    pub argument_separator: &'static str,
    /// Around the generic argument list (`--`).
    pub generic_separator: &'static str,
    /// Between namespace and type name (`:` on RabbitMQ, `/` on Service Bus).
    pub namespace_separator: &'static str,
    /// Replaces `+` between nested type names (`-`).
    pub nested_separator: &'static str,
}

impl EntityNameStyle {
    /// A style with these separators, in the order of MassTransit's
    /// `DefaultMessageNameFormatter` constructor: generic argument, generic type, namespace,
    /// nested type.
    pub const fn new(
        argument_separator: &'static str,
        generic_separator: &'static str,
        namespace_separator: &'static str,
        nested_separator: &'static str,
    ) -> Self {
        Self {
            argument_separator,
            generic_separator,
            namespace_separator,
            nested_separator,
        }
    }

    /// `Ns:Type`, `MassTransit:Fault--Ns:T--`: the separators of MassTransit's RabbitMQ
    /// formatter, which the in-memory transport uses and a transport that names no style of
    /// its own gets ([`crate::transport::TransportProfile::entity_names`]).
    pub const COLONS: EntityNameStyle = EntityNameStyle::new("::", "--", ":", "-");

    /// Formats a type name with these separators.
    pub fn format(&self, name: &TypeName) -> String {
        let mut out = String::new();
        self.write(name, None, &mut out);
        out
    }

    fn write(&self, name: &TypeName, enclosing_ns: Option<&str>, out: &mut String) {
        if let Some(ns) = &name.namespace
            && enclosing_ns != Some(ns.as_str())
        {
            out.push_str(ns);
            out.push_str(self.namespace_separator);
        }
        out.push_str(&name.name.replace('+', self.nested_separator));
        if !name.arguments.is_empty() {
            out.push_str(self.generic_separator);
            for (i, arg) in name.arguments.iter().enumerate() {
                if i > 0 {
                    out.push_str(self.argument_separator);
                }
                self.write(arg, name.namespace.as_deref(), out);
            }
            out.push_str(self.generic_separator);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // MassTransit's RabbitMqMessageNameFormatter and ServiceBusMessageNameFormatter separators.
    const RABBITMQ: EntityNameStyle = EntityNameStyle::new("::", "--", ":", "-");
    const SERVICE_BUS: EntityNameStyle = EntityNameStyle::new("---", "--", "/", "-");

    #[test]
    fn default_urn_uses_dotted_namespace() {
        let urn = Urn::from_module_path("my_app::contracts", "OrderPlaced");
        assert_eq!(urn.as_str(), "urn:message:my_app.contracts:OrderPlaced");
    }

    #[test]
    fn fault_urn_wraps_the_type() {
        let urn = Urn::from_static("urn:message:Company.Project:SubmitOrder");
        assert_eq!(
            urn.fault().as_str(),
            "urn:message:MassTransit:Fault[[Company.Project:SubmitOrder]]"
        );
        assert_eq!(urn.fault().faulted_type(), Some(urn));
    }

    #[test]
    fn rabbitmq_entity_names_match_masstransit() {
        let style = RABBITMQ;
        let easy = Urn::new("urn:message:MassTransit.RabbitMqTransport.Tests:NameEasy");
        assert_eq!(
            easy.entity_name(&style),
            "MassTransit.RabbitMqTransport.Tests:NameEasy"
        );
        let nested = Urn::new("urn:message:Ns:Outer+Nested");
        assert_eq!(nested.entity_name(&style), "Ns:Outer-Nested");
        let generic = Urn::new("urn:message:Ns:NameGeneric[[System:String]]");
        assert_eq!(
            generic.entity_name(&style),
            "Ns:NameGeneric--System:String--"
        );
        let double = Urn::new("urn:message:Ns:NameDoubleGeneric[[System:String],[Ns:NameEasy]]");
        assert_eq!(
            double.entity_name(&style),
            "Ns:NameDoubleGeneric--System:String::NameEasy--"
        );
        let fault = Urn::new("urn:message:Acme:ProcessFile").fault();
        assert_eq!(
            fault.entity_name(&style),
            "MassTransit:Fault--Acme:ProcessFile--"
        );
        let nested_generic = Urn::new(
            "urn:message:Ns:NameDoubleGeneric[[Ns:NameGeneric[[Ns:NameEasyToo]]],[Ns:NameEasy]]",
        );
        assert_eq!(
            nested_generic.entity_name(&style),
            "Ns:NameDoubleGeneric--NameGeneric--NameEasyToo--::NameEasy--"
        );
    }

    #[test]
    fn service_bus_entity_names_use_slashes() {
        let urn = Urn::new("urn:message:Acme:FileReceived");
        assert_eq!(urn.entity_name(&SERVICE_BUS), "Acme/FileReceived");
    }

    #[test]
    fn unparseable_urns_are_sanitised() {
        let urn = Urn::new("custom:thing with spaces");
        assert_eq!(urn.entity_name(&RABBITMQ), "custom:thing-with-spaces");
        assert!(TypeName::parse("Ns:G[[A:B]").is_none());
    }

    #[test]
    fn hostile_type_names_are_bounded() {
        // 3,000 levels (21 KB) overflowed the stack while a fault's type names were built.
        let levels = 3_000;
        let deep = format!(
            "urn:message:{}A:B{}",
            "A:B[[".repeat(levels),
            "]]".repeat(levels)
        );
        let urn = Urn::new(&deep);
        assert!(urn.type_name().is_none());
        // Still usable: the entity name falls back to the sanitised text, and the fault URN
        // is built without parsing.
        assert!(urn.entity_name(&RABBITMQ).len() > 20_000);
        assert!(urn.fault().as_str().ends_with("]]]]"));
        // Just inside the bounds still parses.
        let depth = TypeName::MAX_DEPTH;
        let ok = format!("A:B{}{}", "[[A:B".repeat(depth), "]]".repeat(depth));
        assert!(TypeName::parse(&ok).is_some());
        let too_deep = format!("A:B{}{}", "[[A:B".repeat(depth + 1), "]]".repeat(depth + 1));
        assert!(TypeName::parse(&too_deep).is_none());
        assert!(TypeName::parse(&format!("Ns:{}", "x".repeat(TypeName::MAX_LEN))).is_none());
    }
}
