//! HTTP payload → job → stanza: text, form and JSON bodies with any content
//! type and query string. Nothing may panic; whatever is accepted must
//! serialise to XML that parses back.
#![no_main]

use herald_ingress::payload::{self, RawMessage};
use herald_ingress::routes::build_jobs;
use herald_ingress::users::Users;
use herald_shared::Sender;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const CONTENT_TYPES: [&str; 6] = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "application/json",
    "application/json; charset=latin1",
    "multipart/form-data",
];

fn users() -> &'static Users {
    static USERS: OnceLock<Users> = OnceLock::new();
    USERS.get_or_init(|| {
        Users::parse("[[users]]\njid = \"bot@example.com\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$WnHQp6Ojyh1hMgrlCuNeyjYYyNuTvBJh9oiEzpFOdTk\"\n")
            .expect("users")
    })
}

fuzz_target!(|input: &[u8]| {
    // First byte: content type; then the query string up to the first
    // newline; the rest is the body.
    let Some((&selector, rest)) = input.split_first() else { return };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let split = rest.iter().position(|b| *b == b'\n').unwrap_or(0);
    let (query, body) = rest.split_at(split);
    let Ok(query) = std::str::from_utf8(query) else { return };
    let Ok(query) = payload::parse_query(Some(query)) else { return };
    let Ok(raw) = payload::parse(Some(content_type), body, query) else { return };
    let _ = raw.clone();
    let user = users().get(&Sender::parse("bot@example.com").expect("jid")).expect("user");
    let fallback = RawMessage { to: vec!["ops".into()], ..raw.clone() };
    for raw in [raw, fallback] {
        let Ok(jobs) = build_jobs(user, raw, 64 * 1024) else { continue };
        for job in jobs {
            let xml = String::from(&minidom::Element::from(herald_relay::xmpp::stanza::message(&job)));
            let element: minidom::Element = xml.parse().expect("accepted jobs serialise to well-formed XML");
            xmpp_parsers::message::Message::try_from(element).expect("and to a valid message");
        }
    }
});
