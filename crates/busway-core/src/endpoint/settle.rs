//! The end of a delivery: run it through the pipeline, then ack it, requeue it, or move it to
//! `_error` / `_skipped` (publishing the fault), holding it while a move keeps failing.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::context::ReceiveContext;
use crate::endpoint::EndpointRuntime;
use crate::error::{ConsumeError, ConsumeErrorKind, Error};
use crate::fault::{ExceptionInfo, FAULT_URN, Fault, FaultDetails};
use crate::headers::{Headers, names};
use crate::message::new_id;
use crate::observer::Observers;
use crate::outgoing::SendTarget;
use crate::send::{MessageDefaults, SendOptions, build_outgoing};
use crate::transport::{Backoff, Delivery, MoveKind, Settlement, TransportMessage};
use crate::urn::Urn;

/// How long a failed move to `_error` / `_skipped` waits before its `attempt`-th retry:
/// 100 ms doubling to 30 s. The delivery is held meanwhile (not redelivered), so the
/// consumers do not run again and the fault is not published again.
pub(crate) fn move_backoff(attempt: u32) -> Duration {
    backoff(attempt, Duration::from_millis(100), Duration::from_secs(30))
}

/// How long a delivery the consumer handed back ("cancelled" while the bus is not stopping)
/// waits before it returns to the broker: 50 ms doubling to 5 s over consecutive hand-backs
/// at the endpoint. Requeuing at once would redeliver it at once, a hot loop.
pub(crate) fn hand_back_delay(consecutive: u32) -> Duration {
    backoff(
        consecutive,
        Duration::from_millis(50),
        Duration::from_secs(5),
    )
}

fn backoff(attempt: u32, first: Duration, max: Duration) -> Duration {
    Backoff::delay_for(attempt, first, max)
}

pub(crate) async fn handle_delivery(
    rt: Arc<EndpointRuntime>,
    delivery: Delivery,
    cancel: CancellationToken,
) {
    let Delivery {
        message,
        redelivered,
        delivery_count,
        lost,
        settlement,
    } = delivery;
    // A transport that can lose a delivery (a Service Bus lock) says so through `lost`: the
    // consumer's cancellation fires. The watcher ends with the delivery.
    let _watch = lost.map(|lost| {
        let done = CancellationToken::new();
        let (cancel, until) = (cancel.clone(), done.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => cancel.cancel(),
                _ = until.cancelled() => {}
            }
        });
        done.drop_guard()
    });
    let received = match rt.bus.send_context().serializers.deserialize(&message) {
        Ok(received) => received,
        Err(err) => {
            let details = FaultDetails::unreadable(&err, &rt.info.address);
            tracing::error!(endpoint = %rt.info.name, error = %err, "could not read a message; moving it to the error queue");
            // Rare paths are boxed so they do not enlarge every delivery's task.
            Box::pin(move_message(
                &rt,
                settlement,
                MoveKind::Error,
                message,
                &details.message,
                |h| details.write_headers(h),
                &cancel,
            ))
            .await;
            return;
        }
    };
    if rt
        .bus
        .shared()
        .cancelled_schedules
        .take(&received.envelope.headers)
    {
        tracing::info!(endpoint = %rt.info.name, "a scheduled message whose send was cancelled arrived; acknowledging it without consuming it");
        if let Err(err) = settlement.ack().await {
            tracing::warn!(endpoint = %rt.info.name, error = %err, "acknowledging a cancelled scheduled message failed");
        }
        return;
    }
    let rc = ReceiveContext::new(
        rt.bus.clone(),
        rt.info.clone(),
        message,
        received,
        redelivered,
        delivery_count,
        settlement,
        cancel.clone(),
    );
    let fut = AssertUnwindSafe(rt.pipeline.clone().oneshot(rc.clone())).catch_unwind();
    let outcome = tokio::select! {
        r = fut => Some(r),
        _ = cancel.cancelled() => None,
    };
    let settlement = match rc.take_settlement() {
        Ok(settlement) => settlement,
        Err(settled) => {
            // A layer settled the delivery itself and said how (delayed redelivery).
            tracing::debug!(endpoint = %rt.info.name, message_id = ?rc.message_id(), how = ?settled, "the pipeline settled the delivery");
            return;
        }
    };
    let result = match outcome {
        None => {
            tracing::info!(endpoint = %rt.info.name, message_id = ?rc.message_id(), "the delivery was cancelled (shutdown deadline, or its lock was lost); returning the message to the queue");
            settle(&rt, settlement.requeue().await, "requeue");
            return;
        }
        Some(Err(panic)) => Err(ConsumeError::kind_msg(
            ConsumeErrorKind::Panic,
            "panic",
            format!("the consume pipeline panicked: {}", panic_text(panic)),
        )),
        Some(Ok(result)) => result,
    };
    match result {
        Ok(()) => {
            if rt.hand_backs.load(std::sync::atomic::Ordering::Relaxed) != 0 {
                rt.hand_backs.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            settle(&rt, settlement.ack().await, "ack");
        }
        Err(err) if err.kind() == ConsumeErrorKind::NoConsumer => {
            tracing::warn!(endpoint = %rt.info.name, message_id = ?rc.message_id(), error = %err, "moving the message to the skipped queue");
            let message = rc.transport_message().clone();
            Box::pin(move_message(
                &rt,
                settlement,
                MoveKind::Skipped,
                message,
                &err.to_string(),
                |h| {
                    h.insert(names::REASON, "dead-letter");
                },
                &cancel,
            ))
            .await;
        }
        Err(err) if err.kind() == ConsumeErrorKind::Cancelled => {
            if !cancel.is_cancelled() && !rt.stopping.is_cancelled() {
                // Handed back by the consumer while the bus runs: wait before the broker
                // has it again, longer the more hand-backs in a row.
                let n = rt
                    .hand_backs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .saturating_add(1);
                let delay = hand_back_delay(n);
                tracing::debug!(endpoint = %rt.info.name, message_id = ?rc.message_id(), ?delay, "the consumer handed the message back; requeuing it after a delay");
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = rt.stopping.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            settle(&rt, settlement.requeue().await, "requeue");
        }
        Err(err) => Box::pin(fault(&rt, &rc, settlement, err, &cancel)).await,
    }
}

fn settle(rt: &EndpointRuntime, result: crate::error::Result<()>, what: &str) {
    if let Err(err) = result {
        tracing::warn!(endpoint = %rt.info.name, error = %err, "{what} failed; the broker will redeliver the message");
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_string())
}

/// Readies a copy for `_error` / `_skipped`: the reason headers, the host headers, no time
/// to live, and the observers told.
pub(crate) fn prepare_move(
    observers: &Observers,
    host: &crate::host::HostInfo,
    endpoint: &str,
    kind: MoveKind,
    message: &mut TransportMessage,
    reason: &str,
    add_headers: impl FnOnce(&mut Headers),
) {
    add_headers(&mut message.headers);
    host.write_headers(&mut message.headers);
    message.time_to_live = None;
    observers.on_move(endpoint, kind, message, reason);
}

/// Moves a message to the endpoint's error or skipped queue. A failed move is tried again
/// with [`move_backoff`] while the delivery is held, until it succeeds or the endpoint stops
/// (or `cancel`, the shutdown deadline, fires), which returns the message to the broker.
async fn move_message(
    rt: &EndpointRuntime,
    mut settlement: Box<dyn Settlement>,
    kind: MoveKind,
    mut message: TransportMessage,
    reason: &str,
    add_headers: impl FnOnce(&mut Headers),
    cancel: &CancellationToken,
) {
    prepare_move(
        &rt.observers,
        &rt.bus.send_context().host,
        &rt.info.name,
        kind,
        &mut message,
        reason,
        add_headers,
    );
    let mut failures = 0u32;
    loop {
        let err = match settlement.move_to(kind, message.clone()).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(endpoint = %rt.info.name, queue = %kind.queue_name(&rt.info.name), failures, "moved the message after failed tries");
                }
                return;
            }
            Err(err) => err,
        };
        failures = failures.saturating_add(1);
        let Some(held) = err.settlement else {
            tracing::error!(
                endpoint = %rt.info.name,
                queue = %kind.queue_name(&rt.info.name),
                error = %err.error,
                "could not move the message; it stays on the queue and will be redelivered"
            );
            return;
        };
        let backoff = move_backoff(failures);
        if failures == 1 || failures.is_multiple_of(10) {
            tracing::error!(
                endpoint = %rt.info.name,
                queue = %kind.queue_name(&rt.info.name),
                failures,
                ?backoff,
                error = %err.error,
                "could not move the message; holding it and trying again"
            );
        }
        tokio::select! {
            _ = async { tokio::select! { _ = cancel.cancelled() => {}, _ = rt.stopping.cancelled() => {} } } => {
                tracing::warn!(endpoint = %rt.info.name, failures, "the endpoint is stopping while a move keeps failing; returning the message to the queue");
                settle(rt, held.requeue().await, "requeue");
                return;
            }
            _ = tokio::time::sleep(backoff) => {}
        }
        settlement = held;
    }
}

async fn fault(
    rt: &EndpointRuntime,
    rc: &ReceiveContext,
    settlement: Box<dyn Settlement>,
    err: ConsumeError,
    cancel: &CancellationToken,
) {
    let source = rc.fault_source();
    let details = FaultDetails {
        exception_type: err.type_name().to_string(),
        message: err.to_string(),
        stack_trace: err.chain_text(),
        input_address: rt.info.address.clone(),
        consumer_type: source.as_ref().map(|(c, _)| c.clone()),
        message_type: source.as_ref().map(|(_, m)| m.as_str().to_string()),
        retry_count: rc.retry_attempt(),
        redelivery_count: rc.redelivery_count(),
        timestamp: Utc::now(),
    };
    tracing::error!(
        endpoint = %rt.info.name,
        message_id = ?rc.message_id(),
        retries = details.retry_count,
        redeliveries = details.redelivery_count,
        error = %err,
        "consume faulted; moving the message to the error queue"
    );
    if let Err(publish_err) = send_fault(rt, rc, &err, &details).await {
        tracing::warn!(endpoint = %rt.info.name, error = %publish_err, "could not publish the fault event");
    }
    let message = rc.transport_message().clone();
    move_message(
        rt,
        settlement,
        MoveKind::Error,
        message,
        &details.message,
        |h| details.write_headers(h),
        cancel,
    )
    .await;
}

/// Sends `Fault<T>` to the message's fault or response address, else publishes it (unless
/// the endpoint does not publish faults), through the same envelope builder as every other
/// message: it continues the faulted message's conversation, with its message id as the
/// initiator.
async fn send_fault(
    rt: &EndpointRuntime,
    rc: &ReceiveContext,
    err: &ConsumeError,
    details: &FaultDetails,
) -> crate::error::Result<()> {
    let env = rc.envelope();
    let target = match env
        .fault_address
        .as_deref()
        .or(env.response_address.as_deref())
    {
        Some(address) => SendTarget::Send(crate::address::Address::parse(address)?),
        None if rt.publish_faults => SendTarget::Publish,
        None => return Ok(()),
    };
    let send = rt.bus.send_context();
    let faulted = rc.message_json().to_raw_value();
    let fault = Fault {
        fault_id: new_id(),
        faulted_message_id: env.message_id,
        timestamp: Utc::now(),
        exceptions: vec![ExceptionInfo::from_consume_error(err)],
        host: Some((*send.host).clone()),
        fault_message_types: env.message_type.clone(),
        message: &faulted,
    };
    let body = serde_json::value::to_raw_value(&fault).map_err(|e| {
        Error::with_source(
            crate::error::ErrorKind::Serialize,
            "could not write the fault",
            e,
        )
    })?;
    let mut message_type: Vec<Urn> = env.message_type.iter().map(Urn::fault).collect();
    message_type.push(FAULT_URN);
    let mut options = SendOptions {
        own_headers_only: true,
        request_id: env.request_id,
        initiator_id: env.message_id,
        // A request's fault goes where its response would, by the same transport token.
        reply_to: rc.transport_message().reply_to.clone(),
        ..SendOptions::default()
    };
    if details.retry_count > 0 {
        options
            .headers
            .insert(names::FAULT_RETRY_COUNT, details.retry_count);
    }
    if details.redelivery_count > 0 {
        options
            .headers
            .insert(names::FAULT_REDELIVERY_COUNT, details.redelivery_count);
    }
    let outgoing = build_outgoing(
        send,
        Some(rc.parent()),
        target,
        options,
        message_type,
        body,
        MessageDefaults::default(),
    );
    send.dispatch(outgoing).await
}
