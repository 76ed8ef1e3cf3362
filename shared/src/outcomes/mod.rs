//! The outcomes stream: what became of each job, readable by every replica.
//!
//! Both services append [`Record`]s to the RabbitMQ stream
//! `<prefix>.outcomes` ([`writer`]) and follow it ([`reader`]):
//!
//! - the ingress records each job the broker confirmed (`accepted`), and
//!   builds from the stream the index `GET /jobs/{id}` answers from, on
//!   whichever replica is asked; the same index tells every replica which
//!   idempotency keys were taken (their job ids are derived from the key);
//! - the relay records each job's outcome (`delivered`, `retrying`,
//!   `parked`), and learns from the stream which idempotent jobs another
//!   relay delivered, so that no relay sends one twice.
//!
//! The stream is a log of facts, not part of the delivery path: a record is
//! written after the fact it states (a job is acked, retried or parked
//! whether or not its record gets out), and one that cannot be written is
//! counted and dropped, never waited for.

pub mod reader;
pub mod writer;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The AMQP `content-type` of a batch of records (a JSON array).
pub const CONTENT_TYPE: &str = "application/vnd.herald.outcomes+json";

/// The AMQP header (a boolean) on each batch that says whether any of its
/// records is one a relay learns from ([`Record::relays_need`]). A relay
/// skips a batch marked `false` unread: after a storm of ordinary
/// deliveries, a starting relay would otherwise decode every one of them,
/// to find none it needs. A batch without the header (an older writer) is
/// read.
pub const RELAYS_NEED_HEADER: &str = "herald-relays-need";

/// Longest reason kept in a record: a bounce or an error text, not a log.
pub const MAX_REASON_BYTES: usize = 512;

/// One fact about one job. New kinds may be added; a reader that does not
/// know a kind skips it (`Unknown`), so a rolling upgrade can add one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The broker confirmed the job (written by the ingress). `owner` is the
    /// authenticated user, the only one who may read the job's status;
    /// `idempotent` says its id came from an `Idempotency-Key`.
    /// JIDs as text: written by the ingress from validated ones, and read
    /// at every replica for every job, where parsing them again is cost.
    Accepted { id: Uuid, owner: String, to: String, at_ms: u64, idempotent: bool },
    /// The XMPP server acknowledged it, at `at_ms` (written by the relay).
    Delivered { id: Uuid, at_ms: u64, attempts: u32, idempotent: bool },
    /// Attempt `attempt` failed for `reason`; the next is due at `next_at_ms`.
    Retrying { id: Uuid, at_ms: u64, attempt: u32, next_at_ms: u64, reason: String },
    /// Parked in the dead queue for `reason` after `attempts` attempts.
    Parked { id: Uuid, at_ms: u64, attempts: u32, reason: String },
    /// A kind this release does not know.
    #[serde(other)]
    Unknown,
}

impl Record {
    pub fn id(&self) -> Option<Uuid> {
        match self {
            Record::Accepted { id, .. }
            | Record::Delivered { id, .. }
            | Record::Retrying { id, .. }
            | Record::Parked { id, .. } => Some(*id),
            Record::Unknown => None,
        }
    }

    /// Whether a relay learns from this record: an idempotent job delivered
    /// (not to be sent again), a job retried or parked (one it may have
    /// remembered as delivered, which must be sent when it comes back), or
    /// a kind this release does not know.
    pub fn relays_need(&self) -> bool {
        match self {
            Record::Delivered { idempotent, .. } => *idempotent,
            Record::Retrying { .. } | Record::Parked { .. } | Record::Unknown => true,
            Record::Accepted { .. } => false,
        }
    }
}

/// A reason cut to [`MAX_REASON_BYTES`] at a character boundary.
pub fn reason(text: &str) -> String {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Encodes a batch of records as one stream message.
pub fn encode(records: &[Record]) -> Vec<u8> {
    // Serialising plain strings, ids and integers cannot fail.
    serde_json::to_vec(records).unwrap_or_default()
}

/// Decodes one stream message. A record that does not decode (a bug, or a
/// message someone else put there) is skipped, not the whole batch; only
/// then is the batch read a second, slower way, record by record.
pub fn decode(bytes: &[u8]) -> Result<Vec<Record>, serde_json::Error> {
    if let Ok(records) = serde_json::from_slice(bytes) {
        return Ok(records);
    }
    let values: Vec<serde_json::Value> = serde_json::from_slice(bytes)?;
    Ok(values.into_iter().filter_map(|v| serde_json::from_value(v).ok()).collect())
}

/// The stream's counters, registered by each service.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub written: Counter,
    pub dropped: Counter,
    pub read: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "herald_outcomes_written",
            "Records this process wrote to the outcomes stream",
            metrics.written.clone(),
        );
        registry.register(
            "herald_outcomes_dropped",
            "Records this process could not write to the outcomes stream (a full buffer or a broker that refused them)",
            metrics.dropped.clone(),
        );
        registry.register(
            "herald_outcomes_read",
            "Records this process read from the outcomes stream",
            metrics.read.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_skip_what_they_do_not_know() {
        let (owner, to) = ("ci@example.com".to_owned(), "ops@example.com".to_owned());
        let records = vec![
            Record::Accepted { id: Uuid::from_u128(1), owner, to, at_ms: 5, idempotent: true },
            Record::Parked { id: Uuid::from_u128(1), at_ms: 9, attempts: 3, reason: "gone".into() },
        ];
        assert_eq!(decode(&encode(&records)).expect("decodes"), records);
        let mixed = br#"[{"kind":"expired","id":"00000000-0000-0000-0000-000000000001"},
            {"kind":"delivered","id":"not a uuid","at_ms":1,"attempts":1,"idempotent":false},
            {"kind":"delivered","id":"00000000-0000-0000-0000-000000000002","at_ms":1,"attempts":1,"idempotent":false}]"#;
        let decoded = decode(mixed).expect("decodes");
        assert_eq!(decoded.len(), 2, "{decoded:?}");
        assert_eq!(decoded[0], Record::Unknown);
        assert_eq!(decoded[1].id(), Some(Uuid::from_u128(2)));
        assert!(decode(b"not json").is_err());
    }

    #[test]
    fn relays_need_idempotent_deliveries_and_bounces_only() {
        let id = Uuid::from_u128(1);
        let delivered = |idempotent| Record::Delivered { id, at_ms: 1, attempts: 1, idempotent };
        assert!(delivered(true).relays_need());
        assert!(!delivered(false).relays_need());
        let accepted = Record::Accepted { id, owner: "a@b".into(), to: "c@d".into(), at_ms: 1, idempotent: true };
        assert!(!accepted.relays_need());
        assert!(Record::Retrying { id, at_ms: 1, attempt: 1, next_at_ms: 2, reason: String::new() }.relays_need());
        assert!(Record::Parked { id, at_ms: 1, attempts: 1, reason: String::new() }.relays_need());
        assert!(Record::Unknown.relays_need());
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.len() >= MAX_REASON_BYTES - 1);
        assert_eq!(reason("short"), "short");
    }
}
