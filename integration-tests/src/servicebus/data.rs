//! The stand-in's data plane: sending (broker and custom properties, scheduling, fan-out
//! through topics and `ForwardTo`), peek-lock and receive-and-delete, and settling on a
//! message's lock `Location` (complete, unlock, renew).

use super::*;

/// Returns a message whose lock ended: back to the front of its queue, or to the dead-letter
/// queue when it has been delivered `MaxDeliveryCount` times.
pub(super) fn release(e: &mut Entities, counters: &Counters, queue: &str, mut m: Stored) {
    let Some(q) = e.queues.get_mut(queue) else {
        return;
    };
    if m.delivery_count >= q.max_delivery_count {
        let (lock, max) = (q.lock_duration, q.max_delivery_count);
        m.custom.retain(|(k, _)| {
            !k.eq_ignore_ascii_case("DeadLetterReason")
                && !k.eq_ignore_ascii_case("DeadLetterErrorDescription")
        });
        m.custom.push((
            "DeadLetterReason".into(),
            "\"MaxDeliveryCountExceeded\"".into(),
        ));
        m.custom.push((
            "DeadLetterErrorDescription".into(),
            format!("\"Message could not be consumed after {max} delivery attempts.\""),
        ));
        counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        e.queues
            .entry(format!("{queue}/$DeadLetterQueue"))
            .or_insert_with(|| Queue::new(lock, u32::MAX))
            .active
            .push_back(m);
    } else {
        q.active.push_front(m);
    }
}

/// Request headers that are HTTP's, not custom message properties.
pub(super) const NOT_CUSTOM: [&str; 17] = [
    "authorization",
    "content-type",
    "content-length",
    "brokerproperties",
    "host",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "user-agent",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "expect",
    "te",
    "cache-control",
    "pragma",
];

/// `path` with the protocol's own segments in one spelling: Service Bus reads `Messages`,
/// `Head`, `Subscriptions` and `$DeadLetterQueue` without regard to case (Microsoft's
/// clients write `Messages` and `Subscriptions`; busway writes them in lower case).
pub(super) fn canonical(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let after_messages = i > 0 && segments[i - 1].eq_ignore_ascii_case("messages");
        out.push(if segment.eq_ignore_ascii_case("messages") && i > 0 {
            "messages"
        } else if segment.eq_ignore_ascii_case("subscriptions") && i > 0 {
            "subscriptions"
        } else if segment.eq_ignore_ascii_case("head") && after_messages {
            "head"
        } else if segment.eq_ignore_ascii_case("$deadletterqueue") && i > 0 {
            "$DeadLetterQueue"
        } else {
            segment
        });
    }
    out.join("/")
}

pub(super) fn send(
    state: &State,
    entity: &str,
    headers: &hyper::HeaderMap,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let properties: Map<String, Value> = match headers.get("brokerproperties").map(|v| v.to_str()) {
        None => Map::new(),
        Some(Ok(text)) => match serde_json::from_str(text) {
            Ok(map) => map,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("BrokerProperties is not a JSON object: {e}"),
                );
            }
        },
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "BrokerProperties is not ASCII"),
    };
    let mut custom = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        if NOT_CUSTOM.contains(&name) || name.starts_with("x-ms-") {
            continue;
        }
        let Ok(value) = value.to_str() else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the value of custom property `{name}` is not ASCII"),
            );
        };
        custom.push((name.to_string(), value.to_string()));
    }
    let scheduled = match properties
        .get("ScheduledEnqueueTimeUtc")
        .and_then(Value::as_str)
    {
        None => None,
        Some(text) => match chrono::DateTime::parse_from_rfc2822(text) {
            Ok(at) => Some(at.with_timezone(&chrono::Utc)),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("ScheduledEnqueueTimeUtc `{text}`: {e}"),
                );
            }
        },
    };
    let ttl = properties.get("TimeToLive").and_then(Value::as_f64);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut e = state.lock();
    let targets = match targets(&e, entity, 0) {
        Ok(t) => t,
        Err(response) => return *response,
    };
    for target in targets {
        e.next_sequence += 1;
        let now = chrono::Utc::now();
        let stored = Stored {
            sequence: e.next_sequence,
            body: body.clone(),
            content_type: content_type.clone(),
            properties: properties.clone(),
            custom: custom.clone(),
            delivery_count: 0,
            enqueued: now,
            expires: ttl
                .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e9)
                .map(|t| Instant::now() + Duration::from_secs_f64(t)),
        };
        let Some(q) = e.queues.get_mut(&target) else {
            continue;
        };
        match scheduled {
            Some(at) if at > now => {
                let wait = (at - now).to_std().unwrap_or_default();
                q.scheduled.push((Instant::now() + wait, stored));
            }
            _ => q.active.push_back(stored),
        }
    }
    drop(e);
    state.counters.sent.fetch_add(1, Ordering::Relaxed);
    state.changed.notify_waiters();
    respond(StatusCode::CREATED, Bytes::new())
}

/// The queues a message sent to `entity` lands in (a queue itself; a topic's subscriptions,
/// following `ForwardTo`).
pub(super) fn targets(e: &Entities, entity: &str, depth: u8) -> Result<Vec<String>, Refused> {
    if e.queues.contains_key(entity) {
        return Ok(vec![entity.to_string()]);
    }
    let Some(subs) = e.topics.get(entity) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            &format!(
                "MessagingEntityNotFound: entity `{entity}` does not exist in namespace `{NAMESPACE}`."
            ),
        )));
    };
    let mut out = Vec::new();
    for (name, sub) in subs {
        match &sub.forward_to {
            Some(to) if depth < 4 => {
                if let Ok(more) = targets(e, to, depth + 1) {
                    out.extend(more);
                }
            }
            Some(_) => {}
            None => out.push(format!("{entity}/subscriptions/{name}")),
        }
    }
    Ok(out)
}

pub(super) fn rfc1123(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

pub(super) async fn receive(
    state: &State,
    entity: &str,
    host: &str,
    wait: Duration,
    peek_lock: bool,
) -> Response<Full<Bytes>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let changed = state.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut e = state.lock();
            let Some(q) = e.queues.get_mut(entity) else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "MessagingEntityNotFound: `{entity}` does not exist in namespace `{NAMESPACE}`."
                    ),
                );
            };
            let now = Instant::now();
            while q
                .active
                .front()
                .is_some_and(|m| m.expires.is_some_and(|x| x <= now))
            {
                q.active.pop_front();
            }
            if let Some(mut m) = q.active.pop_front() {
                m.delivery_count += 1;
                state.counters.received.fetch_add(1, Ordering::Relaxed);
                let token = Uuid::new_v4();
                let until = chrono::Utc::now()
                    + chrono::Duration::from_std(q.lock_duration).unwrap_or_default();
                if peek_lock {
                    q.locked.insert(token, (m.clone(), now + q.lock_duration));
                }
                let mut response = delivered(entity, host, &m, token, until, peek_lock);
                let garbled = peek_lock
                    && state
                        .garble
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                if garbled {
                    response.headers_mut().remove("BrokerProperties");
                }
                return response;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return respond(StatusCode::NO_CONTENT, Bytes::new()),
            _ = &mut changed => {}
        }
    }
}

pub(super) fn delivered(
    entity: &str,
    host: &str,
    m: &Stored,
    token: Uuid,
    until: chrono::DateTime<chrono::Utc>,
    peek_lock: bool,
) -> Response<Full<Bytes>> {
    let mut props = m.properties.clone();
    props.remove("ScheduledEnqueueTimeUtc");
    props
        .entry("MessageId")
        .or_insert_with(|| Value::String(Uuid::new_v4().simple().to_string()));
    props
        .entry("TimeToLive")
        .or_insert(Value::from(922_337_203_685.477_6_f64));
    props.insert("DeliveryCount".into(), Value::from(m.delivery_count));
    props.insert("EnqueuedSequenceNumber".into(), Value::from(0));
    props.insert("EnqueuedTimeUtc".into(), Value::String(rfc1123(m.enqueued)));
    props.insert("SequenceNumber".into(), Value::from(m.sequence));
    props.insert("State".into(), Value::String("Active".into()));
    if peek_lock {
        props.insert("LockToken".into(), Value::String(token.to_string()));
        props.insert("LockedUntilUtc".into(), Value::String(rfc1123(until)));
    } else {
        props.insert("LockToken".into(), Value::String(String::new()));
        props.insert(
            "LockedUntilUtc".into(),
            Value::String(rfc1123(chrono::Utc::now())),
        );
    }
    let mut r = respond(
        if peek_lock {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        m.body.clone(),
    );
    let h = r.headers_mut();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_str(value),
        ) {
            h.append(n, v);
        }
    };
    put("BrokerProperties", &Value::Object(props).to_string());
    if let Some(ct) = &m.content_type {
        put("Content-Type", ct);
    }
    if peek_lock {
        put(
            "Location",
            &format!("http://{host}/{entity}/messages/{}/{token}", m.sequence),
        );
    }
    for (k, v) in &m.custom {
        put(k, v);
    }
    r
}

pub(super) fn settle(
    state: &State,
    entity: &str,
    method: &Method,
    lock: &str,
) -> Response<Full<Bytes>> {
    let mut parts = lock.trim_start_matches('/').split('/');
    let (Some(_sequence), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected /messages/{sequence}/{lock-token}",
        );
    };
    let Ok(token) = Uuid::parse_str(token) else {
        return error(StatusCode::BAD_REQUEST, "the lock token is not a GUID");
    };
    let mut e = state.lock();
    let Some(q) = e.queues.get_mut(entity) else {
        return error(
            StatusCode::GONE,
            &format!("MessagingEntityNotFound: `{entity}` does not exist."),
        );
    };
    let lost = || {
        error(
            StatusCode::NOT_FOUND,
            "MessageLockLost: the lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.",
        )
    };
    match *method {
        Method::DELETE => {
            if q.locked.remove(&token).is_none() {
                return lost();
            }
            state.counters.completed.fetch_add(1, Ordering::Relaxed);
            respond(StatusCode::OK, Bytes::new())
        }
        Method::POST => {
            let duration = q.lock_duration;
            let Some((_, until)) = q.locked.get_mut(&token) else {
                return lost();
            };
            *until = Instant::now() + duration;
            state.counters.renewed.fetch_add(1, Ordering::Relaxed);
            respond(StatusCode::OK, Bytes::new())
        }
        Method::PUT => {
            let Some((m, _)) = q.locked.remove(&token) else {
                return lost();
            };
            state.counters.unlocked.fetch_add(1, Ordering::Relaxed);
            release(&mut e, &state.counters, entity, m);
            drop(e);
            state.changed.notify_waiters();
            respond(StatusCode::OK, Bytes::new())
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "unsupported lock operation"),
    }
}
