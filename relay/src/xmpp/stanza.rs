//! Job → `<message/>`. xmpp-parsers serialises every field, so text can never
//! add elements or attributes to the stanza.

use herald_shared::{Job, MessageKind};
use xmpp_parsers::message::{Id, Lang, Message, MessageType, Thread};

pub fn message(job: &Job) -> Message {
    let Job::V1(job) = job;
    let mut message = Message::new_with_type(kind(job.kind), Some(job.to.jid().clone()));
    message.id = Some(Id(job.id.to_string()));
    message.from = Some(job.from.jid().clone().into());
    message.bodies.insert(Lang::default(), job.body.as_str().to_owned());
    if let Some(subject) = &job.subject {
        message.subjects.insert(Lang::default(), subject.as_str().to_owned());
    }
    if let Some(thread) = &job.thread {
        message.thread = Some(Thread { parent: None, id: thread.as_str().to_owned() });
    }
    message
}

const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// The `type` and defined condition of an error message, as the XML names
/// (`("cancel", "service-unavailable")`), or "unknown" where missing.
pub fn error_condition(message: &Message) -> (String, String) {
    error_in(&message.payloads)
}

/// The `(type, condition)` of the `<error/>` among a stanza's payloads,
/// each one of the values RFC 6120 defines, or "unknown": they become
/// metric labels and log fields, and whoever sends the error picks them.
pub fn error_in(payloads: &[xmpp_parsers::minidom::Element]) -> (String, String) {
    let error = payloads.iter().find(|p| p.name() == "error");
    let kind = error.and_then(|e| e.attr("type")).filter(|k| ERROR_TYPES.contains(k)).unwrap_or("unknown").to_owned();
    let condition = error
        .and_then(|e| e.children().find(|c| c.ns() == STANZAS_NS && c.name() != "text"))
        .map(|c| c.name())
        .filter(|c| CONDITIONS.contains(c))
        .unwrap_or("unknown")
        .to_owned();
    (kind, condition)
}

/// RFC 6120, 8.3.2.
const ERROR_TYPES: [&str; 5] = ["auth", "cancel", "continue", "modify", "wait"];
/// RFC 6120, 8.3.3.
const CONDITIONS: [&str; 22] = [
    "bad-request",
    "conflict",
    "feature-not-implemented",
    "forbidden",
    "gone",
    "internal-server-error",
    "item-not-found",
    "jid-malformed",
    "not-acceptable",
    "not-allowed",
    "not-authorized",
    "policy-violation",
    "recipient-unavailable",
    "redirect",
    "registration-required",
    "remote-server-not-found",
    "remote-server-timeout",
    "resource-constraint",
    "service-unavailable",
    "subscription-required",
    "undefined-condition",
    "unexpected-request",
];

fn kind(kind: MessageKind) -> MessageType {
    match kind {
        MessageKind::Chat => MessageType::Chat,
        MessageKind::Normal => MessageType::Normal,
        MessageKind::Headline => MessageType::Headline,
        MessageKind::Groupchat => MessageType::Groupchat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::domain::ShortText;
    use herald_shared::{Body, Recipient, Sender};
    use xmpp_parsers::minidom::Element;

    #[test]
    fn reads_the_condition_of_a_bounce() {
        let xml = "<message xmlns='jabber:client' type='error' id='j1' from='nobody@localhost'>\
                   <body>hi</body><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
                   <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>gone</text></error></message>";
        let message = Message::try_from(xml.parse::<Element>().expect("xml")).expect("message");
        assert_eq!(error_condition(&message), ("cancel".into(), "service-unavailable".into()));
        let bare = Message::new(None);
        assert_eq!(error_condition(&bare), ("unknown".into(), "unknown".into()));
        // Invented names do not become metric labels.
        let invented = "<message xmlns='jabber:client' type='error' id='j2'><error type='x-whatever'>\
                        <made-up-1 xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>";
        let message = Message::try_from(invented.parse::<Element>().expect("xml")).expect("message");
        assert_eq!(error_condition(&message), ("unknown".into(), "unknown".into()));
    }

    #[test]
    fn hostile_text_stays_text() {
        let from = Sender::parse("bot@example.com").expect("valid");
        let to = Recipient::parse("ops", from.domain()).expect("valid");
        let evil = "</body><body xmlns='x'>pwned</body>\"' &amp; ]]>";
        let body = Body::parse(evil.into(), 1000).expect("valid");
        let subject = ShortText::parse_optional("subject", Some(evil.into()), 1000).expect("valid");
        let job = Job::new_v1(from, to, MessageKind::Headline, body, subject, None);
        let xml = String::from(&Element::from(message(&job)));
        let parsed: Element = xml.parse().expect("well-formed");
        let back = Message::try_from(parsed).expect("a message");
        assert_eq!(back.bodies.get(&Lang::default()).map(String::as_str), Some(evil));
        assert_eq!(back.subjects.get(&Lang::default()).map(String::as_str), Some(evil));
        assert_eq!(back.type_, MessageType::Headline);
        assert_eq!(back.id.map(|i| i.0), Some(job.id().to_string()));
        assert_eq!(back.to.map(|j| j.to_string()).as_deref(), Some("ops@example.com"));
    }
}
