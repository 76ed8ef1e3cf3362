//! `Idempotency-Key`: a request repeated with the same key (by the same
//! user, within the window) gets the same jobs, and is delivered once.
//!
//! Three layers, each with its own reach:
//! - job ids derive from user, key and recipient (UUID v5), so a repeat is
//!   the same job and the same stanza id on every ingress replica;
//! - every replica learns the jobs accepted under a key from the outcomes
//!   stream (`crate::jobs`), and answers a repeat whose jobs were all
//!   accepted within the window with those jobs, publishing nothing;
//! - every relay learns the idempotent ids delivered from the same stream,
//!   and does not send one twice (`herald_relay::delivery::seen`).

use crate::error::Error;

pub const HEADER: &str = "idempotency-key";
/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 256;

/// Reads the header: visible ASCII, 1 to 256 bytes, given once. Two keys
/// are refused rather than one of them chosen: either could be the one the
/// client meant to repeat with.
pub fn key_from(headers: &axum::http::HeaderMap) -> Result<Option<String>, Error> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Error::Malformed("Idempotency-Key is given more than once".into()));
    }
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_BYTES && k.bytes().all(|b| b.is_ascii_graphic()));
    match key {
        Some(key) => Ok(Some(key.to_owned())),
        None => Err(Error::Malformed(format!("Idempotency-Key must be 1 to {MAX_KEY_BYTES} visible ASCII characters"))),
    }
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
    fn a_key_given_twice_is_refused() {
        let mut headers = HeaderMap::new();
        headers.append(HEADER, HeaderValue::from_static("deploy-42"));
        headers.append(HEADER, HeaderValue::from_static("deploy-42"));
        assert!(key_from(&headers).is_err(), "the same key twice");
        headers.insert(HEADER, HeaderValue::from_static("deploy-42"));
        headers.append(HEADER, HeaderValue::from_static("deploy-43"));
        assert!(key_from(&headers).is_err(), "two keys");
    }
}
