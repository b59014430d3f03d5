//! Host information written into envelopes and fault headers (MassTransit's `HostInfo`).

use std::sync::OnceLock;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::headers::{Headers, names};

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

fn take_ci(map: &mut Map<String, Value>, name: &str) -> Option<Value> {
    let key = map.keys().find(|k| k.eq_ignore_ascii_case(name))?.clone();
    map.remove(&key)
}

fn as_text(value: Option<Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl<'de> Deserialize<'de> for HostInfo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = Map::<String, Value>::deserialize(deserializer)?;
        let process_id = match take_ci(&mut map, "processId") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        Ok(HostInfo {
            machine_name: as_text(take_ci(&mut map, "machineName")),
            process_name: as_text(take_ci(&mut map, "processName")),
            process_id,
            assembly: as_text(take_ci(&mut map, "assembly")),
            assembly_version: as_text(take_ci(&mut map, "assemblyVersion")),
            framework_version: as_text(take_ci(&mut map, "frameworkVersion")),
            mass_transit_version: as_text(take_ci(&mut map, "massTransitVersion")),
            operating_system_version: as_text(take_ci(&mut map, "operatingSystemVersion")),
        })
    }
}
