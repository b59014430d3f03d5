//! MassTransit's `ExceptionInfo`: one error of a fault, as it travels in `Fault<T>` events and
//! request faults.

use serde::{Deserialize, Serialize};

/// MassTransit truncates fault messages and stack traces to this many characters.
pub const FAULT_TEXT_LIMIT: usize = 2048;

/// One error of a fault, in MassTransit's `ExceptionInfo` shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExceptionInfo {
    /// The error's type name.
    pub exception_type: String,
    /// The error this one was caused by.
    pub inner_exception: Option<Box<ExceptionInfo>>,
    /// The error chain as text (Rust errors carry no stack trace).
    pub stack_trace: Option<String>,
    /// The error message.
    pub message: String,
    /// What raised it.
    pub source: Option<String>,
    /// Extra data.
    pub data: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Truncates to [`FAULT_TEXT_LIMIT`] characters.
pub fn truncate(text: &str) -> String {
    match text.char_indices().nth(FAULT_TEXT_LIMIT) {
        Some((idx, _)) => text[..idx].to_string(),
        None => text.to_string(),
    }
}
