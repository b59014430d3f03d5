//! Scheduled sends as MassTransit knows them: a token (`MT-Scheduling-TokenId`) on the
//! message and a handle to cancel it, and MassTransit's scheduler contracts, so a busway
//! service can schedule through a .NET scheduler endpoint (Quartz, Hangfire).
//!
//! - [`crate::Bus::schedule_send`] uses the transport's delayed delivery (MassTransit's
//!   `DelayedMessageScheduler`); [`crate::Bus::cancel_scheduled_send`] drops the message when
//!   it reaches an endpoint of the same bus (a token check on arrival: brokers cannot take a
//!   delayed message back).
//! - [`crate::Bus::schedule_send_via`] sends a [`ScheduleMessage`] to a scheduler endpoint,
//!   which sends the payload at the time; [`crate::Bus::cancel_scheduled_send_via`] sends it a
//!   [`CancelScheduledMessage`].
//!
//! The contracts' shapes are MassTransit 8's (`MassTransit.Abstractions/Contracts/Scheduling`,
//! `ScheduleMessageCommand<T>`, `EndpointScheduleMessageProvider`).

use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::message::Message;
use crate::urn::Urn;

/// A scheduled send: what to cancel it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledMessage {
    /// The scheduling token (`MT-Scheduling-TokenId`; the `correlationId` of a
    /// [`ScheduleMessage`]).
    pub token_id: Uuid,
    /// When the message is due.
    pub scheduled_time: DateTime<Utc>,
    /// Where it goes.
    pub destination: String,
}

/// MassTransit's `ScheduleMessage` command (`urn:message:MassTransit.Scheduling:ScheduleMessage`):
/// send `payload` (of the types `payload_type`) to `destination` at `scheduled_time`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleMessage {
    /// The scheduling token; MassTransit's schedulers key the job by it.
    pub correlation_id: Uuid,
    /// When to send, in UTC.
    pub scheduled_time: DateTime<Utc>,
    /// The payload's message type URNs, most specific first.
    pub payload_type: Vec<String>,
    /// The full address to send the payload to.
    pub destination: String,
    /// The message, as JSON.
    pub payload: Box<RawValue>,
}

impl Message for ScheduleMessage {
    fn message_type() -> &'static Urn {
        static URN: Urn = Urn::from_static("urn:message:MassTransit.Scheduling:ScheduleMessage");
        &URN
    }
}

/// MassTransit's `CancelScheduledMessage` command
/// (`urn:message:MassTransit.Scheduling:CancelScheduledMessage`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelScheduledMessage {
    /// The command's own id.
    pub correlation_id: Uuid,
    /// When it was sent.
    pub timestamp: DateTime<Utc>,
    /// The token of the scheduled send to cancel.
    pub token_id: Uuid,
}

impl Message for CancelScheduledMessage {
    fn message_type() -> &'static Urn {
        static URN: Urn =
            Urn::from_static("urn:message:MassTransit.Scheduling:CancelScheduledMessage");
        &URN
    }
}

/// What a scheduler does with a recurring send it missed while it was down (MassTransit's
/// `MissedEventPolicy`; written as its number, as MassTransit's serializer writes enums).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MissedEventPolicy {
    /// The scheduler's own default (`0`).
    #[default]
    Default,
    /// Skip it and wait for the next time (`1`).
    Skip,
    /// Send it at once, then keep to the schedule (`2`).
    Send,
}

impl MissedEventPolicy {
    fn number(self) -> u8 {
        match self {
            Self::Default => 0,
            Self::Skip => 1,
            Self::Send => 2,
        }
    }
}

impl Serialize for MissedEventPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.number())
    }
}

impl<'de> Deserialize<'de> for MissedEventPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match u8::deserialize(deserializer)? {
            0 => Ok(Self::Default),
            1 => Ok(Self::Skip),
            2 => Ok(Self::Send),
            n => Err(serde::de::Error::custom(format!(
                "{n} is not a MissedEventPolicy (0 Default, 1 Skip, 2 Send)"
            ))),
        }
    }
}

/// MassTransit's `RecurringSchedule`: when a recurring send fires (a Quartz cron expression
/// in a time zone, between a start and an optional end), and the id and group that name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecurringSchedule {
    /// The time zone the cron expression is read in (a .NET `TimeZoneInfo` id: `UTC`,
    /// `Europe/Paris`).
    pub time_zone_id: String,
    /// When the schedule starts.
    #[serde(with = "crate::dotnet::date_time_offset")]
    pub start_time: DateTime<FixedOffset>,
    /// When it ends; `None` repeats forever.
    #[serde(default, with = "crate::dotnet::date_time_offset::option")]
    pub end_time: Option<DateTime<FixedOffset>>,
    /// The schedule's name within its group; cancelling, pausing and resuming use it.
    pub schedule_id: String,
    /// The group the schedule belongs to.
    pub schedule_group: String,
    /// A Quartz cron expression (`seconds minutes hours day-of-month month day-of-week`).
    pub cron_expression: String,
    /// A description for people.
    #[serde(default)]
    pub description: Option<String>,
    /// What to do with a missed send.
    #[serde(default)]
    pub misfire_policy: MissedEventPolicy,
}

impl RecurringSchedule {
    /// A schedule `group`/`id` that fires on `cron_expression` in UTC from now on, forever.
    pub fn new(
        schedule_id: impl Into<String>,
        schedule_group: impl Into<String>,
        cron_expression: impl Into<String>,
    ) -> Self {
        RecurringSchedule {
            time_zone_id: "UTC".to_string(),
            start_time: Utc::now().fixed_offset(),
            end_time: None,
            schedule_id: schedule_id.into(),
            schedule_group: schedule_group.into(),
            cron_expression: cron_expression.into(),
            description: None,
            misfire_policy: MissedEventPolicy::Default,
        }
    }
}

/// MassTransit's `ScheduleRecurringMessage` command
/// (`urn:message:MassTransit.Scheduling:ScheduleRecurringMessage`, as
/// `ScheduleRecurringMessageCommand<T>` writes it): send `payload` to `destination` each time
/// `schedule` fires.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRecurringMessage {
    /// The command's own id.
    pub correlation_id: Uuid,
    /// When to send.
    pub schedule: RecurringSchedule,
    /// The payload's message type URNs, most specific first.
    pub payload_type: Vec<String>,
    /// The full address to send the payload to.
    pub destination: String,
    /// The message, as JSON.
    pub payload: Box<RawValue>,
}

impl Message for ScheduleRecurringMessage {
    fn message_type() -> &'static Urn {
        static URN: Urn =
            Urn::from_static("urn:message:MassTransit.Scheduling:ScheduleRecurringMessage");
        &URN
    }
}

/// A recurring send scheduled through a scheduler endpoint: the schedule that names it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledRecurringMessage {
    /// The schedule as sent (its id and group cancel, pause and resume it).
    pub schedule: RecurringSchedule,
    /// Where each send goes.
    pub destination: String,
}

/// The three commands that act on a recurring schedule by its id and group; each is
/// MassTransit's contract of the same name, with the same four fields.
macro_rules! schedule_command {
    ($(#[$doc:meta])* $name:ident, $urn:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// The command's own id.
            pub correlation_id: Uuid,
            /// When it was sent.
            pub timestamp: DateTime<Utc>,
            /// The schedule's id.
            pub schedule_id: String,
            /// The schedule's group.
            pub schedule_group: String,
        }

        impl $name {
            /// The command for the schedule `group`/`id`, sent now.
            pub fn new(schedule_id: impl Into<String>, schedule_group: impl Into<String>) -> Self {
                $name {
                    correlation_id: crate::message::new_id(),
                    timestamp: Utc::now(),
                    schedule_id: schedule_id.into(),
                    schedule_group: schedule_group.into(),
                }
            }
        }

        impl Message for $name {
            fn message_type() -> &'static Urn {
                static URN: Urn = Urn::from_static($urn);
                &URN
            }
        }
    };
}

schedule_command!(
    /// MassTransit's `CancelScheduledRecurringMessage`: remove a recurring schedule.
    CancelScheduledRecurringMessage,
    "urn:message:MassTransit.Scheduling:CancelScheduledRecurringMessage"
);
schedule_command!(
    /// MassTransit's `PauseScheduledRecurringMessage`: stop a recurring schedule firing
    /// until it is resumed.
    PauseScheduledRecurringMessage,
    "urn:message:MassTransit.Scheduling:PauseScheduledRecurringMessage"
);
schedule_command!(
    /// MassTransit's `ResumeScheduledRecurringMessage`: let a paused schedule fire again.
    ResumeScheduledRecurringMessage,
    "urn:message:MassTransit.Scheduling:ResumeScheduledRecurringMessage"
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule as MassTransit's System.Text.Json writes a `DefaultRecurringSchedule`
    /// (enums as numbers, `DateTimeOffset` with its offset, a null `EndTime`).
    #[test]
    fn recurring_schedule_reads_and_writes_masstransit_json() {
        let dotnet = r#"{"timeZoneId":"UTC","startTime":"2026-12-03T10:00:00+01:00","endTime":null,"scheduleId":"DailyReport","scheduleGroup":"Reports","cronExpression":"0 0 6 * * ?","description":null,"misfirePolicy":2}"#;
        let schedule: RecurringSchedule = serde_json::from_str(dotnet).expect("MassTransit's form");
        assert_eq!(schedule.misfire_policy, MissedEventPolicy::Send);
        assert_eq!(schedule.start_time.offset().local_minus_utc(), 3600);
        assert_eq!(serde_json::to_string(&schedule).expect("JSON"), dotnet);
        let bad = dotnet.replace(r#""misfirePolicy":2"#, r#""misfirePolicy":7"#);
        let err = serde_json::from_str::<RecurringSchedule>(&bad).expect_err("7 is no policy");
        assert!(err.to_string().contains("not a MissedEventPolicy"), "{err}");
    }
}
