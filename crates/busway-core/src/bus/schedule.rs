//! The bus's scheduling methods: delayed sends with a cancel token, and the commands of
//! MassTransit's scheduler contracts ([`crate::scheduling`]) for a scheduler endpoint.

use serde_json::value::RawValue;

use super::Bus;
use crate::address::IntoAddress;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::scheduling::{
    CancelScheduledMessage, CancelScheduledRecurringMessage, PauseScheduledRecurringMessage,
    RecurringSchedule, ResumeScheduledRecurringMessage, ScheduleMessage, ScheduleRecurringMessage,
    ScheduledMessage, ScheduledRecurringMessage,
};

impl Bus {
    /// Sends `message` to `address` after `delay` through the transport's delayed delivery,
    /// with a scheduling token (`MT-Scheduling-TokenId`) in its headers; the handle cancels it
    /// with [`Bus::cancel_scheduled_send`].
    pub async fn schedule_send<M: Message>(
        &self,
        address: impl IntoAddress,
        delay: std::time::Duration,
        message: M,
    ) -> Result<ScheduledMessage> {
        let address = address.into_address()?;
        let token_id = crate::message::new_id();
        let destination = self.full_address(&address);
        let scheduled_time = chrono::Duration::from_std(delay)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_add_signed(d))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        self.send(address, message)
            .delay(delay)
            .header(
                crate::headers::names::SCHEDULING_TOKEN_ID,
                token_id.to_string(),
            )
            .await?;
        Ok(ScheduledMessage {
            token_id,
            scheduled_time,
            destination,
        })
    }

    /// Cancels a send scheduled with [`Bus::schedule_send`]: when the message arrives at an
    /// endpoint of this bus, it is acknowledged and not consumed. Brokers cannot take back a
    /// delayed message, and another bus does not know of the cancellation (MassTransit's own
    /// delayed scheduler cannot cancel at all); a scheduler endpoint can
    /// ([`Bus::cancel_scheduled_send_via`]).
    pub fn cancel_scheduled_send(&self, scheduled: &ScheduledMessage) {
        self.shared.cancelled_schedules.cancel(scheduled.token_id);
    }

    /// Schedules `message` through a scheduler endpoint (a MassTransit Quartz or Hangfire
    /// service at `scheduler`): sends it a [`ScheduleMessage`] that says to
    /// send `message` to `destination` at `at`.
    pub async fn schedule_send_via<M: Message>(
        &self,
        scheduler: impl IntoAddress,
        destination: impl IntoAddress,
        at: chrono::DateTime<chrono::Utc>,
        message: M,
    ) -> Result<ScheduledMessage> {
        let destination = self.full_address(&destination.into_address()?);
        let (payload, payload_type) = payload_of(&message)?;
        let token_id = crate::message::new_id();
        let command = ScheduleMessage {
            correlation_id: token_id,
            scheduled_time: at,
            payload_type,
            destination: destination.clone(),
            payload,
        };
        self.send(scheduler, command)
            .correlation_id(token_id)
            .await?;
        Ok(ScheduledMessage {
            token_id,
            scheduled_time: at,
            destination,
        })
    }

    /// Cancels a send scheduled with [`Bus::schedule_send_via`]: sends the scheduler a
    /// [`CancelScheduledMessage`] with its token.
    pub async fn cancel_scheduled_send_via(
        &self,
        scheduler: impl IntoAddress,
        scheduled: &ScheduledMessage,
    ) -> Result<()> {
        let command = CancelScheduledMessage {
            correlation_id: crate::message::new_id(),
            timestamp: chrono::Utc::now(),
            token_id: scheduled.token_id,
        };
        self.send(scheduler, command).await
    }

    /// Schedules `message` to be sent to `destination` each time `schedule` fires, through a
    /// scheduler endpoint that runs recurring schedules (MassTransit's Quartz or Hangfire
    /// service at `scheduler`): sends it a [`ScheduleRecurringMessage`]. busway's own
    /// [`crate::BusBuilder::message_scheduler_endpoint`] does not run recurring schedules.
    pub async fn schedule_recurring_send_via<M: Message>(
        &self,
        scheduler: impl IntoAddress,
        destination: impl IntoAddress,
        schedule: RecurringSchedule,
        message: M,
    ) -> Result<ScheduledRecurringMessage> {
        let destination = self.full_address(&destination.into_address()?);
        let (payload, payload_type) = payload_of(&message)?;
        let command = ScheduleRecurringMessage {
            correlation_id: crate::message::new_id(),
            schedule: schedule.clone(),
            payload_type,
            destination: destination.clone(),
            payload,
        };
        self.send(scheduler, command).await?;
        Ok(ScheduledRecurringMessage {
            schedule,
            destination,
        })
    }

    /// Removes a recurring schedule from the scheduler at `scheduler` (a
    /// [`CancelScheduledRecurringMessage`] for its id and group).
    pub async fn cancel_scheduled_recurring_send_via(
        &self,
        scheduler: impl IntoAddress,
        scheduled: &ScheduledRecurringMessage,
    ) -> Result<()> {
        let s = &scheduled.schedule;
        let command = CancelScheduledRecurringMessage::new(&s.schedule_id, &s.schedule_group);
        self.send(scheduler, command).await
    }

    /// Stops a recurring schedule firing until it is resumed (a
    /// [`PauseScheduledRecurringMessage`]).
    pub async fn pause_scheduled_recurring_send_via(
        &self,
        scheduler: impl IntoAddress,
        scheduled: &ScheduledRecurringMessage,
    ) -> Result<()> {
        let s = &scheduled.schedule;
        let command = PauseScheduledRecurringMessage::new(&s.schedule_id, &s.schedule_group);
        self.send(scheduler, command).await
    }

    /// Lets a paused recurring schedule fire again (a [`ResumeScheduledRecurringMessage`]).
    pub async fn resume_scheduled_recurring_send_via(
        &self,
        scheduler: impl IntoAddress,
        scheduled: &ScheduledRecurringMessage,
    ) -> Result<()> {
        let s = &scheduled.schedule;
        let command = ResumeScheduledRecurringMessage::new(&s.schedule_id, &s.schedule_group);
        self.send(scheduler, command).await
    }

    /// A full address on this bus's transport for `address` (short forms become the
    /// transport's endpoint address), as MassTransit's `destination` fields are.
    fn full_address(&self, address: &crate::address::Address) -> String {
        match address.kind() {
            crate::address::AddressKind::Uri => address.to_string(),
            _ => self.transport().endpoint_address(address.name()),
        }
    }
}

/// A scheduler command's `payload` and `payloadType`: the message as JSON and its URNs, most
/// specific first (MassTransit's `MessageTypeCache<T>.MessageTypeNames`).
fn payload_of<M: Message>(message: &M) -> Result<(Box<RawValue>, Vec<String>)> {
    let payload = serde_json::value::to_raw_value(message).map_err(|e| {
        Error::with_source(
            ErrorKind::Serialize,
            format!("could not serialize {}", M::message_type()),
            e,
        )
    })?;
    let payload_type = std::iter::once(M::message_type())
        .chain(M::implemented_types())
        .map(|u| u.as_str().to_string())
        .collect();
    Ok((payload, payload_type))
}
