//! The stand-in's SAS token check: which key signed a request, for which audience, and
//! whether it may manage entities.

use super::*;

pub(super) fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

pub(super) fn service_url(path: &str) -> String {
    format!("https://{NAMESPACE}.servicebus.windows.net/{path}")
}

pub(super) fn authorize(
    state: &State,
    header: Option<&str>,
    path: &str,
    manage: bool,
) -> Result<(), Refused> {
    let deny = |detail: &str| {
        state.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
        Err(Box::new(error(StatusCode::UNAUTHORIZED, detail)))
    };
    let Some(token) = header.and_then(|h| h.strip_prefix("SharedAccessSignature ")) else {
        return deny(
            "MissingToken: the request has no SharedAccessSignature authorization header.",
        );
    };
    let mut raw: HashMap<&str, &str> = HashMap::new();
    for part in token.split('&') {
        if let Some((k, v)) = part.split_once('=') {
            raw.insert(k, v);
        }
    }
    let (Some(sr), Some(sig), Some(se), Some(skn)) =
        (raw.get("sr"), raw.get("sig"), raw.get("se"), raw.get("skn"))
    else {
        return deny("MalformedToken: the token needs sr, sig, se and skn.");
    };
    let Some(key) = state.keys.get(*skn) else {
        return deny("InvalidSignature: the token refers to an unknown shared access key.");
    };
    let Ok(expiry) = se.parse::<i64>() else {
        return deny("MalformedToken: se is not a number.");
    };
    if expiry < chrono::Utc::now().timestamp() {
        return deny("ExpiredToken: the token has expired.");
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.secret.as_bytes()) else {
        return deny("InvalidSignature: unusable key.");
    };
    mac.update(format!("{sr}\n{se}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if percent_decode(sig) != expected {
        return deny("InvalidSignature: The token has an invalid signature.");
    }
    // The audience is a URL (any of sb, http, https; the query, if signed, is not part of
    // it) that must be the namespace or a prefix of the entity, compared without case.
    let audience = percent_decode(sr).to_ascii_lowercase();
    let audience = audience.split('?').next().unwrap_or_default();
    let audience = ["sb://", "https://", "http://"]
        .iter()
        .find_map(|scheme| audience.strip_prefix(scheme))
        .unwrap_or(audience)
        .trim_end_matches('/');
    let path = path.to_ascii_lowercase();
    let covered = [
        format!("{NAMESPACE}.servicebus.windows.net"),
        state.addr.clone(),
    ]
    .iter()
    .any(|host| {
        let resource = format!("{host}/{path}");
        audience == host || resource == audience || resource.starts_with(&format!("{audience}/"))
    });
    if !covered {
        return deny("InvalidAudience: the token's audience does not cover this entity.");
    }
    if manage && !key.manage {
        return deny("Unauthorized: Manage,EntityRead claims are required for this operation.");
    }
    Ok(())
}
