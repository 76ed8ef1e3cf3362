//! The AMQP properties and headers of the copies the relay publishes: a
//! retry (to a delay queue), a parked job, a replayed one.

use herald_shared::{job::CONTENT_TYPE, topology::headers};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::delivery::retry;
use std::time::Duration;

/// The properties of a job the relay rebuilt from its bytes (one that
/// bounced after its delivery was settled).
pub fn rebuilt(id: &str, timestamp: Option<u64>) -> BasicProperties {
    let properties = BasicProperties::default().with_content_type(CONTENT_TYPE.into()).with_message_id(id.into());
    match timestamp {
        Some(timestamp) => properties.with_timestamp(timestamp),
        None => properties,
    }
}

/// A retry copy: the attempt count and reason, and a jittered expiration
/// within the delay queue's TTL.
pub fn retry(
    original: &BasicProperties,
    delay: Duration,
    attempt: u32,
    reason: &str,
    bounced: bool,
) -> BasicProperties {
    let mut table = carried_headers(original, bounced);
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempt));
    table.insert(headers::REASON.into(), AMQPValue::LongString(reason.into()));
    let expiration = retry::jittered(delay).as_millis().to_string();
    copy_properties(original).with_headers(table).with_expiration(expiration.into())
}

/// A parked copy: the attempt count, reason and when.
pub fn parked(original: &BasicProperties, attempts: u32, reason: &str, bounced: bool) -> BasicProperties {
    let mut table = carried_headers(original, bounced);
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempts));
    table.insert(headers::REASON.into(), AMQPValue::LongString(reason.into()));
    table.insert(headers::PARKED_AT.into(), AMQPValue::Timestamp(herald_shared::job::now_ms()));
    copy_properties(original).with_headers(table)
}

/// A replayed copy: without the attempt count, reason and the broker's
/// death records, so that it starts its schedule afresh.
pub fn replayed(parked: &BasicProperties) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in headers_of(parked) {
        if !k.as_str().starts_with("x-herald-") && !is_death_record(k.as_str()) {
            table.insert(k.clone(), v.clone());
        }
    }
    table.insert(headers::REPLAYED_AT.into(), AMQPValue::Timestamp(herald_shared::job::now_ms()));
    copy_properties(parked).with_headers(table)
}

/// The properties a republished job keeps (not its headers).
fn copy_properties(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    out.with_app_id("herald-relay".into())
}

/// Headers to keep on a republished job, without the broker's own `x-death`
/// bookkeeping (it would grow with every retry); marked `x-herald-bounced`
/// if it is republished over a bounce (and kept so on later retries).
fn carried_headers(p: &BasicProperties, bounced: bool) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers_of(p) {
        if !is_death_record(k.as_str()) {
            table.insert(k.clone(), v.clone());
        }
    }
    if bounced {
        table.insert(headers::BOUNCED.into(), AMQPValue::Boolean(true));
    }
    table
}

fn is_death_record(name: &str) -> bool {
    name.starts_with("x-death") || name.starts_with("x-first-death") || name.starts_with("x-last-death")
}

fn headers_of(p: &BasicProperties) -> impl Iterator<Item = (&ShortString, &AMQPValue)> {
    p.headers().iter().flat_map(|h| h.inner().iter())
}

/// A header's value.
pub fn header(p: &BasicProperties, name: &str) -> Option<AMQPValue> {
    p.headers().as_ref().and_then(|h| h.inner().get(&ShortString::from(name)).cloned())
}

/// Whether the header is there at all.
pub fn has_header(p: &BasicProperties, name: &str) -> bool {
    p.headers().as_ref().is_some_and(|h| h.inner().contains_key(&ShortString::from(name)))
}

/// A header as a count: 0 when missing or not a number, clamped to `u32`.
pub fn header_u32(p: &BasicProperties, name: &str) -> u32 {
    header(p, name).and_then(as_u64).map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX))
}

pub fn as_u64(v: AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::LongUInt(v) => Some(u64::from(v)),
        AMQPValue::LongInt(v) => Some(u64::try_from(v).unwrap_or(0)),
        AMQPValue::LongLongInt(v) => Some(u64::try_from(v).unwrap_or(0)),
        AMQPValue::Timestamp(v) => Some(v),
        AMQPValue::ShortUInt(v) => Some(u64::from(v)),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(v)),
        _ => None,
    }
}

pub fn as_text(v: AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_attempt_header_is_clamped() {
        let with = |v: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert(headers::ATTEMPT.into(), v);
            BasicProperties::default().with_headers(t)
        };
        assert_eq!(header_u32(&with(AMQPValue::LongLongInt(-5)), headers::ATTEMPT), 0);
        assert_eq!(header_u32(&with(AMQPValue::LongLongInt(i64::MAX)), headers::ATTEMPT), u32::MAX);
        assert_eq!(header_u32(&with(AMQPValue::LongString("3".into())), headers::ATTEMPT), 0);
        assert_eq!(header_u32(&with(AMQPValue::ShortShortUInt(3)), headers::ATTEMPT), 3);
        assert_eq!(header_u32(&BasicProperties::default(), headers::ATTEMPT), 0);
    }

    #[test]
    fn republished_copies_drop_the_brokers_death_records() {
        let mut t = FieldTable::default();
        t.insert("x-death".into(), AMQPValue::LongString("…".into()));
        t.insert("x-first-death-reason".into(), AMQPValue::LongString("expired".into()));
        t.insert(headers::IDEMPOTENT.into(), AMQPValue::Boolean(true));
        let original = BasicProperties::default().with_headers(t).with_message_id("id".into());
        let retried = retry(&original, Duration::from_secs(1), 2, "why", false);
        let h = retried.headers().clone().expect("headers");
        assert!(!h.inner().contains_key(&ShortString::from("x-death")));
        assert!(!h.inner().contains_key(&ShortString::from("x-first-death-reason")));
        assert!(h.inner().contains_key(&ShortString::from(headers::IDEMPOTENT)));
        assert_eq!(header_u32(&retried, headers::ATTEMPT), 2);
        assert!(!has_header(&retried, headers::BOUNCED));
        let replay = replayed(&parked(&original, 3, "why", false));
        assert_eq!(header(&replay, headers::ATTEMPT), None, "a replay starts afresh");
        assert_eq!(replay.message_id().as_ref().map(ToString::to_string).as_deref(), Some("id"));
        assert!(has_header(&replay, headers::REPLAYED_AT));
    }

    #[test]
    fn a_copy_made_over_a_bounce_is_marked_and_stays_marked() {
        let original = BasicProperties::default().with_message_id("id".into());
        let bounced = retry(&original, Duration::from_secs(1), 1, "bounced", true);
        assert!(has_header(&bounced, headers::BOUNCED));
        assert!(has_header(&retry(&bounced, Duration::from_secs(5), 2, "timeout", false), headers::BOUNCED));
        assert!(has_header(&parked(&original, 1, "bounced", true), headers::BOUNCED));
    }
}
