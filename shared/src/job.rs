//! The job that travels from the ingress to the relay through RabbitMQ.
//!
//! It is a tagged enum so that a later version can be added as a new variant
//! while jobs of the old one are still queued during a rolling upgrade: a
//! relay must always be able to read every version an ingress of the same or
//! the previous release writes.

use crate::domain::{Body, MessageKind, Recipient, Sender, ShortText};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// The AMQP `content-type` of an encoded job.
pub const CONTENT_TYPE: &str = "application/vnd.herald.job+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum Job {
    #[serde(rename = "1")]
    V1(JobV1),
}

/// Version 1: one message to one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobV1 {
    /// Also the stanza `id` and the AMQP `message-id`, so a duplicate can be
    /// recognised downstream.
    pub id: Uuid,
    pub from: Sender,
    pub to: Recipient,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    pub body: Body,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<ShortText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<ShortText>,
    /// When the ingress accepted it, in milliseconds since the Unix epoch.
    pub accepted_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("job cannot be decoded: {0}")]
pub struct JobDecodeError(#[from] serde_json::Error);

/// Job ids derived from a client's idempotency key: the same user, key and
/// recipient always give the same id (UUID v5), so a repeated request
/// becomes the same job, and the same stanza id, whichever ingress replica
/// takes it.
pub fn idempotent_id(user: &Sender, key: &str, to: &Recipient) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x5d1f_3c2e_8b6a_4f07_9e41_2a7c_d0b3_96e8);
    Uuid::new_v5(&NAMESPACE, format!("{user}\n{key}\n{to}").as_bytes())
}

impl Job {
    /// A new job with a fresh time-ordered id, accepted now.
    pub fn new_v1(
        from: Sender,
        to: Recipient,
        kind: MessageKind,
        body: Body,
        subject: Option<ShortText>,
        thread: Option<ShortText>,
    ) -> Self {
        Job::V1(JobV1 { id: Uuid::now_v7(), from, to, kind, body, subject, thread, accepted_at_ms: now_ms() })
    }

    /// The same job under another id (see [`idempotent_id`]).
    #[must_use]
    pub fn with_id(self, id: Uuid) -> Self {
        match self {
            Job::V1(job) => Job::V1(JobV1 { id, ..job }),
        }
    }

    /// The same job with another body (a notification cut to fit).
    pub fn with_body(self, body: Body) -> Self {
        match self {
            Job::V1(job) => Job::V1(JobV1 { body, ..job }),
        }
    }

    pub fn id(&self) -> Uuid {
        match self {
            Job::V1(job) => job.id,
        }
    }

    pub fn sender(&self) -> &Sender {
        match self {
            Job::V1(job) => &job.from,
        }
    }

    /// An upper bound of the bytes the job's `<message/>` takes on the
    /// wire: its text escaped as an XML writer escapes it, its JIDs, and the
    /// markup around them. The ingress refuses (or cuts to fit) what would
    /// exceed the XMPP server's stanza limit; the relay parks it.
    pub fn xml_size(&self) -> usize {
        let Job::V1(job) = self;
        let text = |t: Option<&str>| t.map_or(0, crate::domain::xml_text_len);
        XML_ENVELOPE
            + job.body.xml_len()
            + text(job.subject.as_ref().map(|s| s.as_str()))
            + text(job.thread.as_ref().map(|s| s.as_str()))
            // Attribute values escape quotes and whitespace too: up to 6 bytes each.
            + job.to.jid().as_str().len() * 6
            + job.from.jid().as_str().len() * 6
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain strings, enums and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and re-validates every field: a job that reached the queue
    /// by any route other than the ingress gets the same checks. Version 1
    /// is read in one pass; anything else goes through the tagged enum,
    /// which buffers the whole object before it reads the tag, and gives
    /// the canonical error (see docs/performance.md, "Instructions per
    /// message").
    pub fn decode(bytes: &[u8]) -> Result<Self, JobDecodeError> {
        if let Ok(wire) = serde_json::from_slice::<WireV1>(bytes) {
            return Ok(Job::V1(wire.into()));
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A version 1 job as it is on the wire, tag included: what
/// [`Job::decode`] reads in one pass. The same fields as [`JobV1`], which
/// does not change (a new version is a new variant); the fuzz target and
/// the tests hold the two decoders to the same answer.
#[derive(Deserialize)]
struct WireV1 {
    v: Version1,
    id: Uuid,
    from: Sender,
    to: Recipient,
    #[serde(rename = "type")]
    kind: MessageKind,
    body: Body,
    #[serde(default)]
    subject: Option<ShortText>,
    #[serde(default)]
    thread: Option<ShortText>,
    accepted_at_ms: u64,
}

/// The tag `"v": "1"`, and nothing else.
struct Version1;

impl<'de> Deserialize<'de> for Version1 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let tag = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        if tag == "1" { Ok(Version1) } else { Err(serde::de::Error::custom("not version 1")) }
    }
}

impl From<WireV1> for JobV1 {
    fn from(wire: WireV1) -> Self {
        let WireV1 { v: Version1, id, from, to, kind, body, subject, thread, accepted_at_ms } = wire;
        JobV1 { id, from, to, kind, body, subject, thread, accepted_at_ms }
    }
}

/// The tags, attribute names, namespace, id and type of a `<message/>`, with
/// room to spare.
pub const XML_ENVELOPE: usize = 512;

/// `HERALD_MAX_STANZA_BYTES` when it is not set: Prosody's default
/// `c2s_stanza_size_limit`.
pub const DEFAULT_MAX_STANZA_BYTES: usize = 256 * 1024;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        let from = Sender::parse("alerts@example.com").expect("valid");
        let to = Recipient::parse("ops", from.domain()).expect("valid");
        let body = Body::parse("disk <full> & \"hot\"".into(), 1000).expect("valid");
        let subject = ShortText::parse_optional("subject", Some("s".into()), 10).expect("valid");
        Job::new_v1(from, to, MessageKind::Headline, body, subject, None)
    }

    #[test]
    fn round_trips() {
        let job = job();
        assert_eq!(Job::decode(&job.encode()).expect("decodes"), job);
    }

    #[test]
    fn wire_format_is_tagged_and_stable() {
        let value: serde_json::Value = serde_json::from_slice(&job().encode()).expect("json");
        assert_eq!(value["v"], "1");
        assert_eq!(value["to"], "ops@example.com");
        assert_eq!(value["type"], "headline");
        assert!(value.get("thread").is_none());
    }

    #[test]
    fn the_one_pass_decoder_answers_as_the_tagged_one() {
        let good = String::from_utf8(job().encode()).expect("utf-8");
        let inputs = [
            good.clone(),
            good.replacen("{", r#"{"extra":[1,{"v":"2"}],"#, 1),
            good.replacen(r#""v":"1""#, r#""v":"2""#, 1),
            good.replacen(r#""v":"1""#, r#""v":1"#, 1),
            good.replacen(r#""v":"1""#, r#""v":0"#, 1),
            good.replacen(r#""v":"1""#, r#""v":"\u0031""#, 1),
            good.replacen(r#""v":"1","#, "", 1),
            good.replacen("{", r#"{"v":"1","#, 1),
            good.replacen("{", r#"{"body":"twice","#, 1),
            good.replacen(r#""type":"headline""#, r#""type":"error""#, 1),
            good.replacen(r#""to":"ops@example.com""#, r#""to":null"#, 1),
            r#"["1"]"#.to_owned(),
        ];
        for input in inputs {
            let tagged = serde_json::from_slice::<Job>(input.as_bytes()).ok();
            assert_eq!(Job::decode(input.as_bytes()).ok(), tagged, "{input}");
        }
    }

    #[test]
    fn decoding_revalidates() {
        let mut value: serde_json::Value = serde_json::from_slice(&job().encode()).expect("json");
        value["body"] = "bad \u{0} byte".into();
        assert!(Job::decode(&serde_json::to_vec(&value).expect("json")).is_err());
        value["body"] = "fine".into();
        value["to"] = "a@b@c".into();
        assert!(Job::decode(&serde_json::to_vec(&value).expect("json")).is_err());
        value["to"] = "ops@example.com".into();
        value["v"] = "99".into();
        assert!(Job::decode(&serde_json::to_vec(&value).expect("json")).is_err());
        assert!(Job::decode(b"\xff\xfe not json").is_err());
    }
}
