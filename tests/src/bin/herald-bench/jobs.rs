//! Message bodies and jobs of the size Herald carries.

use herald_shared::{Body, Job, MessageKind, Recipient, Sender};

/// A body of exactly `bytes` bytes (at least the tag) that starts with `tag`.
pub fn body(tag: &str, bytes: usize) -> String {
    let mut text = format!("{tag} ");
    let padding = bytes.saturating_sub(text.len());
    text.extend(std::iter::repeat_n('x', padding));
    text
}

/// A job as the ingress would build it for `from` → `to`.
pub fn job(from: &str, to: &str, body_text: String) -> Job {
    let from = Sender::parse(from).expect("sender JID is valid");
    let to = Recipient::parse(to, from.domain()).expect("recipient JID is valid");
    let body = Body::parse(body_text, herald_shared::domain::DEFAULT_MAX_BODY_BYTES).expect("body is valid");
    Job::new_v1(from, to, MessageKind::parse(None).expect("default kind"), body, None, None)
}
