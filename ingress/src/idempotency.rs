//! `Idempotency-Key`: a request repeated with the same key (by the same
//! user, within the window) gets the same jobs, and is delivered once.
//!
//! Three layers, each with its own reach:
//! - job ids derive from user, key and recipient (UUID v5), so a repeat is
//!   the same job and the same stanza id on every ingress replica;
//! - this process remembers the keys it accepted for the window and
//!   answers a repeat with the first answer, publishing nothing;
//! - the relay remembers the idempotent ids it delivered for its window
//!   and does not send one twice (`herald_relay::delivery::seen`).

use crate::error::Error;
use crate::publisher::AcceptedJob;
use herald_shared::Sender;
use herald_shared::recently::Recently;
use std::time::Duration;

pub const HEADER: &str = "idempotency-key";
/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 256;
/// Keys remembered at most, whatever the window.
pub const CAPACITY: usize = 64 * 1024;

/// Reads the header: visible ASCII, 1 to 256 bytes.
pub fn key_from(headers: &axum::http::HeaderMap) -> Result<Option<String>, Error> {
    let Some(value) = headers.get(HEADER) else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_BYTES && k.bytes().all(|b| b.is_ascii_graphic()));
    match key {
        Some(key) => Ok(Some(key.to_owned())),
        None => Err(Error::Malformed(format!("Idempotency-Key must be 1 to {MAX_KEY_BYTES} visible ASCII characters"))),
    }
}

/// The keys this process accepted within the window, with their answers.
///
/// A repeat is the same user, key *and recipients*: the same notification
/// posted to two routes (two `webhook_configs` of one Alertmanager
/// receiver), or a key reused for other recipients, is a new request. Its
/// jobs for recipients in common still get the ids of the first request's,
/// so the relay sends those once.
#[derive(Debug)]
pub struct Accepted(Recently<(Sender, String, Vec<String>), Vec<AcceptedJob>>);

impl Accepted {
    pub fn new(window: Duration) -> Self {
        Self(Recently::new(window, CAPACITY))
    }

    /// The answer given to `user`'s earlier request with `key` to
    /// `recipients` (in any order), if within the window.
    pub fn get(&self, user: &Sender, key: &str, recipients: &[String]) -> Option<Vec<AcceptedJob>> {
        self.0.get(&entry(user, key, recipients))
    }

    /// Remembers the answer to a request the broker confirmed.
    pub fn put(&self, user: &Sender, key: &str, recipients: &[String], jobs: Vec<AcceptedJob>) {
        self.0.insert(entry(user, key, recipients), jobs);
    }
}

fn entry(user: &Sender, key: &str, recipients: &[String]) -> (Sender, String, Vec<String>) {
    let mut recipients = recipients.to_vec();
    recipients.sort_unstable();
    (user.clone(), key.to_owned(), recipients)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        let mut headers = HeaderMap::new();
        assert_eq!(key_from(&headers).expect("none"), None);
        headers.insert(HEADER, HeaderValue::from_static("deploy-42/db-7"));
        assert_eq!(key_from(&headers).expect("ok").as_deref(), Some("deploy-42/db-7"));
        for bad in ["", "two words", &"k".repeat(MAX_KEY_BYTES + 1)] {
            headers.insert(HEADER, HeaderValue::from_str(bad).expect("header value"));
            assert!(key_from(&headers).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn answers_are_per_user_key_and_recipients_within_the_window() {
        let accepted = Accepted::new(Duration::from_secs(3600));
        let (alice, bob) = (Sender::parse("alice@x").expect("jid"), Sender::parse("bob@x").expect("jid"));
        let job = AcceptedJob { id: uuid::Uuid::from_u128(7), to: "ops@x".into() };
        let both = ["ops@x".to_owned(), "dba@x".to_owned()];
        accepted.put(&alice, "k", &both, vec![job.clone()]);
        let reversed = ["dba@x".to_owned(), "ops@x".to_owned()];
        assert_eq!(
            accepted.get(&alice, "k", &reversed).map(|j| j[0].id),
            Some(job.id),
            "the same recipients in another order"
        );
        assert!(accepted.get(&bob, "k", &both).is_none());
        assert!(accepted.get(&alice, "other", &both).is_none());
        assert!(accepted.get(&alice, "k", &both[..1]).is_none(), "other recipients: a new request");
        let forgetful = Accepted::new(Duration::ZERO);
        forgetful.put(&alice, "k", &both, vec![job]);
        assert!(forgetful.get(&alice, "k", &both).is_none());
    }
}
