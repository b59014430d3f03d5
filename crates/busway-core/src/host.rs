//! Host information written into envelopes and fault headers (MassTransit's `HostInfo`).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::headers::{Headers, names};
use crate::keys::KeyIn;

/// Where a message was produced or faulted: machine, process, application and versions.
///
/// Field names on the wire are MassTransit's (`machineName`, `processName`, `processId`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    /// Machine (host) name.
    pub machine_name: Option<String>,
    /// Process (executable) name.
    pub process_name: Option<String>,
    /// Process id.
    pub process_id: Option<i64>,
    /// The application (MassTransit: entry assembly).
    pub assembly: Option<String>,
    /// The application's version.
    pub assembly_version: Option<String>,
    /// The runtime (`Rust`).
    pub framework_version: Option<String>,
    /// The messaging framework and version (`busway 0.1.0`).
    #[serde(rename = "massTransitVersion")]
    pub mass_transit_version: Option<String>,
    /// Operating system and kernel version.
    pub operating_system_version: Option<String>,
}

impl HostInfo {
    /// Information about the current process, computed once.
    pub fn current() -> &'static HostInfo {
        static CURRENT: OnceLock<HostInfo> = OnceLock::new();
        CURRENT.get_or_init(|| {
            let process_name = std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()));
            let os_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            let os = if os_release.is_empty() {
                std::env::consts::OS.to_string()
            } else {
                format!("{} {}", std::env::consts::OS, os_release)
            };
            HostInfo {
                machine_name: Some(gethostname::gethostname().to_string_lossy().into_owned()),
                assembly: process_name.clone(),
                process_name,
                process_id: Some(i64::from(std::process::id())),
                assembly_version: None,
                framework_version: Some("Rust".to_string()),
                mass_transit_version: Some(format!("busway {}", env!("CARGO_PKG_VERSION"))),
                operating_system_version: Some(os),
            }
        })
    }

    /// Writes the `MT-Host-*` headers MassTransit adds to moved messages.
    pub fn write_headers(&self, headers: &mut Headers) {
        let pairs = [
            (names::HOST_MACHINE_NAME, &self.machine_name),
            (names::HOST_PROCESS_NAME, &self.process_name),
            (names::HOST_ASSEMBLY, &self.assembly),
            (names::HOST_ASSEMBLY_VERSION, &self.assembly_version),
            (names::HOST_MASSTRANSIT_VERSION, &self.mass_transit_version),
            (names::HOST_FRAMEWORK_VERSION, &self.framework_version),
            (
                names::HOST_OPERATING_SYSTEM_VERSION,
                &self.operating_system_version,
            ),
        ];
        for (name, value) in pairs {
            if let Some(v) = value {
                headers.insert(name, v.as_str());
            }
        }
        if let Some(pid) = self.process_id {
            headers.insert(names::HOST_PROCESS_ID, pid.to_string());
        }
    }
}

/// A host object as read off the wire, borrowing from the input where it can. Field names
/// match in any case; text fields accept numbers and booleans (written as text), and the
/// process id accepts a number or a numeric string.
#[derive(Default)]
struct HostFields<'a> {
    machine_name: Option<Cow<'a, str>>,
    process_name: Option<Cow<'a, str>>,
    process_id: Option<i64>,
    assembly: Option<Cow<'a, str>>,
    assembly_version: Option<Cow<'a, str>>,
    framework_version: Option<Cow<'a, str>>,
    mass_transit_version: Option<Cow<'a, str>>,
    operating_system_version: Option<Cow<'a, str>>,
}

impl HostFields<'_> {
    fn to_owned_info(&self) -> HostInfo {
        let own = |v: &Option<Cow<'_, str>>| v.as_deref().map(str::to_string);
        HostInfo {
            machine_name: own(&self.machine_name),
            process_name: own(&self.process_name),
            process_id: self.process_id,
            assembly: own(&self.assembly),
            assembly_version: own(&self.assembly_version),
            framework_version: own(&self.framework_version),
            mass_transit_version: own(&self.mass_transit_version),
            operating_system_version: own(&self.operating_system_version),
        }
    }
}

/// A JSON scalar as text: strings as they are, numbers and booleans written out, null as none.
struct LenientText<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for LenientText<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LenientText<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text, a number, a boolean or null")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LenientText(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LenientText(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(LenientText(Some(Cow::Owned(v))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(LenientText(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(LenientText(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(LenientText(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(LenientText(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LenientText(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LenientText(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Copy)]
enum HostField {
    MachineName,
    ProcessName,
    ProcessId,
    Assembly,
    AssemblyVersion,
    FrameworkVersion,
    MassTransitVersion,
    OperatingSystemVersion,
}

const HOST_FIELDS: [(&str, HostField); 8] = [
    ("machineName", HostField::MachineName),
    ("processName", HostField::ProcessName),
    ("processId", HostField::ProcessId),
    ("assembly", HostField::Assembly),
    ("assemblyVersion", HostField::AssemblyVersion),
    ("frameworkVersion", HostField::FrameworkVersion),
    ("massTransitVersion", HostField::MassTransitVersion),
    ("operatingSystemVersion", HostField::OperatingSystemVersion),
];

impl<'de> Deserialize<'de> for HostFields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HostFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a host object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut h = HostFields::default();
                let next = std::cell::Cell::new(0);
                while let Some(field) = map.next_key_seed(KeyIn::new(&HOST_FIELDS, &next))? {
                    let slot = match field {
                        None => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        Some(HostField::ProcessId) => {
                            let text = map.next_value::<LenientText<'de>>()?.0;
                            h.process_id = text.and_then(|t| t.trim().parse::<i64>().ok());
                            continue;
                        }
                        Some(HostField::MachineName) => &mut h.machine_name,
                        Some(HostField::ProcessName) => &mut h.process_name,
                        Some(HostField::Assembly) => &mut h.assembly,
                        Some(HostField::AssemblyVersion) => &mut h.assembly_version,
                        Some(HostField::FrameworkVersion) => &mut h.framework_version,
                        Some(HostField::MassTransitVersion) => &mut h.mass_transit_version,
                        Some(HostField::OperatingSystemVersion) => &mut h.operating_system_version,
                    };
                    *slot = map.next_value::<LenientText<'de>>()?.0;
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for HostInfo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(HostFields::deserialize(deserializer)?.to_owned_info())
    }
}

/// An envelope's `host`, read so that a run of messages from one producer shares a single
/// `Arc<HostInfo>`: each thread keeps the text of the last host it read and hands out the
/// same `Arc` while the text repeats, without parsing it or allocating (the host block is a
/// third of a small envelope). Needs serde_json reading from a slice or a string.
pub(crate) struct SharedHost(pub(crate) Option<Arc<HostInfo>>);

impl<'de> Deserialize<'de> for SharedHost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        thread_local! {
            static LAST: RefCell<Option<(String, Arc<HostInfo>)>> = const { RefCell::new(None) };
        }
        let Some(raw) = Option::<&'de RawValue>::deserialize(d)? else {
            return Ok(SharedHost(None));
        };
        let text = raw.get();
        LAST.with(|last| {
            if let Some((seen, host)) = last.borrow().as_ref()
                && seen == text
            {
                return Ok(SharedHost(Some(host.clone())));
            }
            let fields: Option<HostFields<'_>> =
                serde_json::from_str(text).map_err(de::Error::custom)?;
            let Some(fields) = fields else {
                return Ok(SharedHost(None));
            };
            let host = Arc::new(fields.to_owned_info());
            *last.borrow_mut() = Some((text.to_string(), host.clone()));
            Ok(SharedHost(Some(host)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Option<Arc<HostInfo>> {
        serde_json::from_str::<SharedHost>(json).expect("host").0
    }

    #[test]
    fn a_repeated_host_is_shared_and_a_new_one_is_read() {
        let text = r#"{"machineName":"a","processName":"svc","processId":7}"#;
        let first = read(text).expect("a host");
        let again = read(text).expect("a host");
        assert!(Arc::ptr_eq(&first, &again), "the same text shares one Arc");
        assert_eq!(first.machine_name.as_deref(), Some("a"));
        assert_eq!(first.process_id, Some(7));

        // Any case, a process id as text, unknown fields ignored.
        let other = read(r#"{"MachineName":"b","PROCESSID":"12","extra":[1]}"#).expect("a host");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(other.machine_name.as_deref(), Some("b"));
        assert_eq!(other.process_id, Some(12));
        assert_eq!(other.process_name, None);

        assert!(read("null").is_none());
        assert!(serde_json::from_str::<SharedHost>(r#"{"machineName":"#).is_err());
        assert!(serde_json::from_str::<SharedHost>("[1]").is_err());
    }
}
