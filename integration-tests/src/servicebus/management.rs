//! The stand-in's management API: creating, deleting and describing queues, topics and
//! subscriptions as Atom entries.

use super::*;

/// `PT300S`, `PT2.500S`, `PT5M`, `PT1H30M`, `P1D`.
pub(super) fn iso_duration(text: &str) -> Option<Duration> {
    let rest = text.strip_prefix('P')?;
    let (days, time) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut secs = 0f64;
    if let Some(d) = days.strip_suffix('D') {
        secs += d.parse::<f64>().ok()? * 86_400.0;
    }
    let mut number = String::new();
    for c in time.chars() {
        match c {
            'H' | 'M' | 'S' => {
                let n: f64 = number.parse().ok()?;
                secs += n * match c {
                    'H' => 3600.0,
                    'M' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            _ => number.push(c),
        }
    }
    Some(Duration::from_secs_f64(secs))
}

pub(super) fn create(state: &State, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let xml = String::from_utf8_lossy(body);
    let lock = element(&xml, "LockDuration")
        .and_then(iso_duration)
        .unwrap_or(Duration::from_secs(60));
    let max = element(&xml, "MaxDeliveryCount")
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let mut e = state.lock();
    let exists = e.queues.contains_key(path) || e.topics.contains_key(path);
    if xml.contains("<SubscriptionDescription") {
        let Some((topic, name)) = path.split_once("/subscriptions/") else {
            return error(
                StatusCode::BAD_REQUEST,
                "a subscription path is {topic}/subscriptions/{name}",
            );
        };
        if name.len() > 50 {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the subscription name `{name}` is longer than 50 characters"),
            );
        }
        let forward_to = element(&xml, "ForwardTo").map(|f| {
            let f = f
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            // ForwardTo may be given as a full URL.
            f.strip_prefix(&service_url(""))
                .map(str::to_string)
                .unwrap_or(f)
        });
        let Some(subs) = e.topics.get_mut(topic) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!("MessagingEntityNotFound: topic `{topic}` does not exist."),
            );
        };
        if subs.contains_key(name) {
            return error(
                StatusCode::CONFLICT,
                &format!("MessagingEntityAlreadyExists: subscription `{name}`."),
            );
        }
        subs.insert(name.to_string(), Subscription { forward_to });
        e.queues.insert(path.to_string(), Queue::new(lock, max));
    } else if exists {
        return error(
            StatusCode::CONFLICT,
            &format!("MessagingEntityAlreadyExists: `{path}`."),
        );
    } else if xml.contains("<QueueDescription") {
        if path.len() > 260 {
            return error(
                StatusCode::BAD_REQUEST,
                "an entity path is at most 260 characters",
            );
        }
        e.queues.insert(path.to_string(), Queue::new(lock, max));
    } else if xml.contains("<TopicDescription") {
        e.topics.insert(path.to_string(), HashMap::new());
    } else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a QueueDescription, TopicDescription or SubscriptionDescription entry",
        );
    }
    drop(e);
    describe(state, path, StatusCode::CREATED)
}

pub(super) fn delete(state: &State, path: &str) -> Response<Full<Bytes>> {
    let mut e = state.lock();
    if let Some((topic, name)) = path.split_once("/subscriptions/") {
        let removed = e
            .topics
            .get_mut(topic)
            .and_then(|subs| subs.remove(name))
            .is_some();
        e.queues.remove(path);
        return if removed {
            respond(StatusCode::OK, Bytes::new())
        } else {
            error(StatusCode::NOT_FOUND, "MessagingEntityNotFound")
        };
    }
    if e.queues.remove(path).is_some() {
        e.queues.remove(&format!("{path}/$DeadLetterQueue"));
        return respond(StatusCode::OK, Bytes::new());
    }
    if let Some(subs) = e.topics.remove(path) {
        for name in subs.keys() {
            e.queues.remove(&format!("{path}/subscriptions/{name}"));
        }
        return respond(StatusCode::OK, Bytes::new());
    }
    error(StatusCode::NOT_FOUND, "MessagingEntityNotFound")
}

/// The Atom entry describing the queue, topic or subscription at `path` (`status` on
/// success), as Service Bus writes it: `id`, `title`, `updated` and the description with the
/// entity's settings and counts.
pub(super) fn describe(state: &State, path: &str, status: StatusCode) -> Response<Full<Bytes>> {
    let e = state.lock();
    let (kind, name, inner) = if let Some(q) = e.queues.get(path) {
        let dead = e
            .queues
            .get(&format!("{path}/$DeadLetterQueue"))
            .map(|d| d.active.len())
            .unwrap_or(0);
        let counts = format!(
            "<MessageCount>{}</MessageCount><CountDetails xmlns:d2p1=\"http://schemas.microsoft.com/netservices/2011/06/servicebus\"><d2p1:ActiveMessageCount>{}</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>{dead}</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>{}</d2p1:ScheduledMessageCount><d2p1:TransferMessageCount>0</d2p1:TransferMessageCount><d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount></CountDetails>",
            q.active.len() + q.locked.len() + q.scheduled.len(),
            q.active.len(),
            q.scheduled.len(),
        );
        let lock = format!(
            "<LockDuration>PT{}S</LockDuration>",
            q.lock_duration.as_secs_f64()
        );
        let expiry = "<DefaultMessageTimeToLive>P10675199DT2H48M5.4775807S</DefaultMessageTimeToLive><DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration>";
        let delivery = format!(
            "<MaxDeliveryCount>{}</MaxDeliveryCount><EnableBatchedOperations>true</EnableBatchedOperations>",
            q.max_delivery_count
        );
        match path.split_once("/subscriptions/") {
            Some((topic, name)) => {
                let forward = e
                    .topics
                    .get(topic)
                    .and_then(|subs| subs.get(name))
                    .and_then(|s| s.forward_to.clone())
                    .map(|f| format!("<ForwardTo>{}</ForwardTo>", service_url(&f)))
                    .unwrap_or_default();
                (
                    "SubscriptionDescription",
                    name.to_string(),
                    format!(
                        "{lock}<RequiresSession>false</RequiresSession>{expiry}{delivery}{counts}<Status>Active</Status>{forward}"
                    ),
                )
            }
            None => (
                "QueueDescription",
                path.to_string(),
                format!(
                    "{lock}<MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><RequiresSession>false</RequiresSession>{expiry}{delivery}<SizeInBytes>0</SizeInBytes>{counts}<Status>Active</Status>"
                ),
            ),
        }
    } else if let Some(subs) = e.topics.get(path) {
        (
            "TopicDescription",
            path.to_string(),
            format!(
                "<DefaultMessageTimeToLive>P10675199DT2H48M5.4775807S</DefaultMessageTimeToLive><MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><EnableBatchedOperations>true</EnableBatchedOperations><SizeInBytes>0</SizeInBytes><Status>Active</Status><SubscriptionCount>{}</SubscriptionCount>",
                subs.len()
            ),
        )
    } else {
        return error(StatusCode::NOT_FOUND, "MessagingEntityNotFound");
    };
    let updated = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut r = respond(
        status,
        format!(
            "<entry xmlns=\"http://www.w3.org/2005/Atom\"><id>{}</id><title type=\"text\">{name}</title><published>{updated}</published><updated>{updated}</updated><link rel=\"self\" href=\"{}\"/><content type=\"application/xml\"><{kind} xmlns=\"http://schemas.microsoft.com/netservices/2010/10/servicebus/connect\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">{inner}</{kind}></content></entry>",
            service_url(path),
            service_url(path),
        ),
    );
    r.headers_mut().insert(
        "content-type",
        "application/atom+xml;type=entry;charset=utf-8"
            .parse()
            .expect("a header value"),
    );
    r
}
