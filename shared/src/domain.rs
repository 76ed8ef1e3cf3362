//! Domain types that validate once, at the edge, so that everything behind
//! them (the queue, the relay, the XMPP stream) only ever sees values that can
//! become a well-formed stanza.

use jid::{BareJid, DomainRef, Jid};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest body accepted by default: well below Prosody's default c2s stanza
/// size limit (256 KiB), so that an accepted job can always be sent.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest subject accepted.
pub const MAX_SUBJECT_BYTES: usize = 1024;
/// Largest thread id accepted.
pub const MAX_THREAD_BYTES: usize = 256;

/// Why a value was refused. The message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("recipient is missing")]
    MissingRecipient,
    #[error("{count} recipients in one request; the limit is {max}")]
    TooManyRecipients { count: usize, max: usize },
    #[error("recipient {input:?} is not a valid JID: {reason}")]
    InvalidRecipient { input: String, reason: String },
    #[error("body is empty")]
    EmptyBody,
    #[error("{field} is {len} bytes long; the limit is {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("body is {len} bytes long as XML (where & takes 5 bytes, < and > take 4, CR takes 5); the limit is {max}")]
    BodyTooLong { len: usize, max: usize },
    #[error("{field} contains the character U+{code:04X}, which XML cannot carry")]
    NotXmlText { field: &'static str, code: u32 },
    #[error("unknown message type {0:?}; expected chat, normal, headline or groupchat")]
    UnknownKind(String),
    #[error("a field has the wrong type: {0}")]
    WrongType(String),
    #[error("sender {input:?} is not a valid bare JID: {reason}")]
    InvalidSender { input: String, reason: String },
}

/// Refuses characters that XML 1.0 cannot carry (control characters other
/// than tab, newline and carriage return; U+FFFE and U+FFFF). Rust strings
/// cannot hold surrogates, so everything else is a legal `Char`.
fn check_xml_text(field: &'static str, text: &str) -> Result<(), ValidationError> {
    // Nearly every alert is printable ASCII, tabs and newlines: one pass
    // without an early exit, which the compiler vectorises.
    let plain = text.bytes().fold(true, |ok, b| ok & ((0x20..0x80).contains(&b) | matches!(b, b'\t' | b'\n' | b'\r')));
    if plain {
        return Ok(());
    }
    match text.chars().find(|&c| !is_xml_char(c)) {
        Some(c) => Err(ValidationError::NotXmlText { field, code: c as u32 }),
        None => Ok(()),
    }
}

/// Bytes `text` takes as XML character data, escaped as the stanza writer
/// (rxml) escapes it: `&` as `&amp;`, `<` and `>` as `&lt;` and `&gt;`, a
/// carriage return as `&#xd;`.
pub fn xml_text_len(text: &str) -> usize {
    let bytes = text.as_bytes();
    let markup: usize =
        memchr::memchr3_iter(b'&', b'<', b'>', bytes).map(|at| if bytes[at] == b'&' { 4 } else { 3 }).sum();
    text.len() + markup + 4 * memchr::memchr_iter(b'\r', bytes).count()
}

/// `text` with every character XML cannot carry replaced by U+FFFD: for
/// text Herald composes from someone else's data (a notification's labels
/// and annotations), where refusing the whole message would lose an alert.
pub fn xml_safe(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().all(is_xml_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars().map(|c| if is_xml_char(c) { c } else { char::REPLACEMENT_CHARACTER }).collect(),
    )
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

fn check_len(field: &'static str, text: &str, max: usize) -> Result<(), ValidationError> {
    if text.len() > max {
        return Err(ValidationError::TooLong { field, len: text.len(), max });
    }
    Ok(())
}

/// The recipient of a message: a JID that passed stringprep and the length
/// limits. `user` without `@host` takes the sender's domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Recipient(Jid);

impl Recipient {
    /// Parses what a client wrote. A bare local part (`alice`) becomes
    /// `alice@<default_domain>`, fixing mod_post_msg's habit of treating it
    /// as a domain.
    pub fn parse(input: &str, default_domain: &DomainRef) -> Result<Self, ValidationError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ValidationError::MissingRecipient);
        }
        let full = if input.contains('@') {
            input.to_owned()
        } else {
            // `alice` or `alice/phone`: the domain goes between the two.
            match input.split_once('/') {
                Some((node, resource)) => format!("{node}@{default_domain}/{resource}"),
                None => format!("{input}@{default_domain}"),
            }
        };
        Self::try_from(full).map_err(|e| match e {
            ValidationError::InvalidRecipient { reason, .. } => {
                ValidationError::InvalidRecipient { input: input.to_owned(), reason }
            }
            other => other,
        })
    }

    pub fn jid(&self) -> &Jid {
        &self.0
    }
}

impl TryFrom<String> for Recipient {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let jid = without_final_dot(&value);
        if jid.split('/').next().is_some_and(|bare| bare.ends_with('.')) {
            return Err(ValidationError::InvalidRecipient { input: value, reason: "empty domain label".into() });
        }
        Jid::new(&jid)
            .map(Recipient)
            .map_err(|e| ValidationError::InvalidRecipient { input: value, reason: e.to_string() })
    }
}

/// `bob@example.com.` is `bob@example.com`: RFC 7622 (3.2) has the final
/// dot of a domainpart stripped before a JID is compared or used, and the
/// `jid` crate checks the domain without it but keeps it, so the two
/// spellings would be two recipients (and two messages).
fn without_final_dot(jid: &str) -> std::borrow::Cow<'_, str> {
    // The first `/` ends the bare JID: neither part before it may hold one.
    let (bare, resource) = jid.split_at(jid.find('/').unwrap_or(jid.len()));
    match bare.strip_suffix('.') {
        Some(bare) => format!("{bare}{resource}").into(),
        None => jid.into(),
    }
}

impl From<Recipient> for String {
    fn from(value: Recipient) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The account a message is sent from: a bare JID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sender(BareJid);

impl Sender {
    pub fn parse(input: &str) -> Result<Self, ValidationError> {
        Self::try_from(input.to_owned())
    }

    pub fn jid(&self) -> &BareJid {
        &self.0
    }

    pub fn domain(&self) -> &DomainRef {
        self.0.domain()
    }
}

impl TryFrom<String> for Sender {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        match BareJid::new(value.trim()) {
            Ok(jid) if jid.node().is_some() => Ok(Sender(jid)),
            Ok(_) => Err(ValidationError::InvalidSender { input: value, reason: "it has no user part".into() }),
            Err(e) => Err(ValidationError::InvalidSender { input: value, reason: e.to_string() }),
        }
    }
}

impl From<Sender> for String {
    fn from(value: Sender) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A message body: not blank, XML-safe, within the size limit. Knows its
/// length as XML, which the relay checks against the stanza limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Body {
    text: String,
    xml_len: usize,
}

impl Body {
    /// `max_bytes` bounds the body as it will be in the stanza, escaped for
    /// XML: a body of `&` takes five times its length there, and the XMPP
    /// server's stanza limit is on what it reads.
    pub fn parse(text: String, max_bytes: usize) -> Result<Self, ValidationError> {
        if text.trim().is_empty() {
            return Err(ValidationError::EmptyBody);
        }
        let xml_len = xml_text_len(&text);
        if xml_len > max_bytes {
            return Err(ValidationError::BodyTooLong { len: xml_len, max: max_bytes });
        }
        check_xml_text("body", &text)?;
        Ok(Body { text, xml_len })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Bytes the body takes as XML character data (see [`xml_text_len`]).
    pub fn xml_len(&self) -> usize {
        self.xml_len
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl TryFrom<String> for Body {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        // A job that is already queued was checked against the ingress's
        // limit; here only what XML needs is re-checked.
        Body::parse(value, usize::MAX)
    }
}

/// Optional short text fields (`subject`, `thread`): XML-safe and bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShortText(String);

impl ShortText {
    /// `None` for an absent or empty field.
    pub fn parse_optional(
        field: &'static str,
        text: Option<String>,
        max_bytes: usize,
    ) -> Result<Option<Self>, ValidationError> {
        match text {
            None => Ok(None),
            Some(t) if t.is_empty() => Ok(None),
            Some(t) => {
                check_len(field, &t, max_bytes)?;
                check_xml_text(field, &t)?;
                Ok(Some(ShortText(t)))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ShortText {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        check_xml_text("text", &value)?;
        Ok(ShortText(value))
    }
}

impl From<ShortText> for String {
    fn from(value: ShortText) -> Self {
        value.0
    }
}

/// The XMPP message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    #[default]
    Chat,
    Normal,
    Headline,
    Groupchat,
}

impl MessageKind {
    /// `None` or an empty string means the default, `chat`.
    pub fn parse(input: Option<&str>) -> Result<Self, ValidationError> {
        match input.map(str::trim) {
            None | Some("") => Ok(Self::default()),
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "chat" => Ok(Self::Chat),
                "normal" => Ok(Self::Normal),
                "headline" => Ok(Self::Headline),
                "groupchat" => Ok(Self::Groupchat),
                _ => Err(ValidationError::UnknownKind(s.to_owned())),
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Normal => "normal",
            Self::Headline => "headline",
            Self::Groupchat => "groupchat",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain() -> BareJid {
        BareJid::new("example.com").expect("valid domain")
    }

    #[test]
    fn bare_user_gets_the_default_domain() {
        let r = Recipient::parse("alice", domain().domain()).expect("valid");
        assert_eq!(r.to_string(), "alice@example.com");
    }

    #[test]
    fn full_jids_and_domains_are_kept() {
        let d = domain();
        assert_eq!(
            Recipient::parse("bob@other.org/phone", d.domain()).expect("valid").to_string(),
            "bob@other.org/phone"
        );
        assert_eq!(
            Recipient::parse("first.last/desk", d.domain()).expect("valid").to_string(),
            "first.last@example.com/desk"
        );
        assert_eq!(
            Recipient::parse("ops@conference.example.com", d.domain()).expect("valid").to_string(),
            "ops@conference.example.com"
        );
    }

    #[test]
    fn a_final_dot_in_the_domain_is_the_same_recipient() {
        let d = domain();
        for (written, meant) in [
            ("bob@example.com.", "bob@example.com"),
            ("bob@example.com./phone", "bob@example.com/phone"),
            ("bob@example.com/ends with a dot.", "bob@example.com/ends with a dot."),
            ("bob/desk.", "bob@example.com/desk."),
            ("ops@conference.example.com.", "ops@conference.example.com"),
        ] {
            let parsed = Recipient::parse(written, d.domain()).expect("valid");
            assert_eq!(parsed, Recipient::parse(meant, d.domain()).expect("valid"), "{written}");
            assert_eq!(parsed.to_string(), meant);
        }
        assert!(Recipient::parse("bob@example.com..", d.domain()).is_err(), "one dot only");
    }

    #[test]
    fn invalid_recipients_are_refused() {
        let d = domain();
        assert_eq!(Recipient::parse("  ", d.domain()), Err(ValidationError::MissingRecipient));
        for bad in ["a@b@c", "@example.com", "alice@", "a b@example.com", "x@exa mple.com"] {
            assert!(Recipient::parse(bad, d.domain()).is_err(), "{bad} should be refused");
        }
        let long = format!("{}@example.com", "a".repeat(1100));
        assert!(Recipient::parse(&long, d.domain()).is_err());
    }

    #[test]
    fn bodies_must_be_xml_text() {
        assert_eq!(Body::parse(" \n".into(), 100), Err(ValidationError::EmptyBody));
        assert_eq!(Body::parse("a\u{1}b".into(), 100), Err(ValidationError::NotXmlText { field: "body", code: 1 }));
        assert!(matches!(Body::parse("x".repeat(101), 100), Err(ValidationError::BodyTooLong { .. })));
        // The limit is on the escaped text: 20 `&` are 100 bytes of XML.
        assert!(Body::parse("&".repeat(20), 100).is_ok());
        assert!(matches!(Body::parse("&".repeat(21), 100), Err(ValidationError::BodyTooLong { len: 105, .. })));
        assert_eq!(xml_text_len("a&b<c>d\r\n"), 9 + 4 + 3 + 3 + 4);
        assert_eq!(xml_safe("red \u{1b}[31m\u{0} ok\n"), "red \u{fffd}[31m\u{fffd} ok\n");
        assert!(matches!(xml_safe("fine\ttext"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(Body::parse("<b>&amp;</b>\ttab ✓".into(), 100).expect("valid").as_str(), "<b>&amp;</b>\ttab ✓");
        // Every character below U+0020 but tab, LF and CR, in ASCII text
        // and in text that is not.
        for code in (0u32..0x20).filter(|c| ![9, 10, 13].contains(c)) {
            let c = char::from_u32(code).expect("a char");
            for text in [format!("ok {c}"), format!("ok ✓ {c}")] {
                assert_eq!(Body::parse(text, 100), Err(ValidationError::NotXmlText { field: "body", code }));
            }
        }
        assert_eq!(Body::parse("a\u{7f}\t\r\n".into(), 100).map(|b| b.xml_len()), Ok(5 + 4));
        assert_eq!(
            Body::parse("✓ \u{fffe}".into(), 100),
            Err(ValidationError::NotXmlText { field: "body", code: 0xfffe })
        );
    }

    #[test]
    fn message_kinds() {
        assert_eq!(MessageKind::parse(None), Ok(MessageKind::Chat));
        assert_eq!(MessageKind::parse(Some("GroupChat")), Ok(MessageKind::Groupchat));
        assert!(MessageKind::parse(Some("error")).is_err());
    }

    #[test]
    fn senders_need_a_user_part() {
        assert!(Sender::parse("alerts@example.com").is_ok());
        assert!(Sender::parse("example.com").is_err());
        assert_eq!(Sender::parse("Alerts@Example.COM").expect("valid").to_string(), "alerts@example.com");
    }
}
