//! Turning a request body into message fields: `text/plain`,
//! `application/x-www-form-urlencoded` and `application/json`, with the
//! fields of mod_post_msg (`to`, `type`, `body`) plus `subject` and `thread`.
//! `to` may name several recipients: a JSON array, or a repeated form or
//! query field.
//!
//! This module only extracts; `routes` turns the fields into validated domain
//! types.

use crate::error::Error;
use serde::Deserialize;

/// The message fields as the client sent them, not yet validated.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct RawMessage {
    /// Recipients in the order given; empty if none was.
    #[serde(default, deserialize_with = "one_or_many")]
    pub to: Vec<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub body: Option<String>,
    pub subject: Option<String>,
    pub thread: Option<String>,
    /// Set by the ingress, never by a client: the body may be cut to fit
    /// the stanza limit (a rendered notification) rather than refused.
    #[serde(skip)]
    pub cut_to_fit: bool,
}

impl RawMessage {
    /// Fields given elsewhere (the query string) fill what the body left out.
    fn or(self, other: RawMessage) -> RawMessage {
        RawMessage {
            to: if self.to.is_empty() { other.to } else { self.to },
            kind: self.kind.or(other.kind),
            body: self.body.or(other.body),
            subject: self.subject.or(other.subject),
            thread: self.thread.or(other.thread),
            cut_to_fit: self.cut_to_fit || other.cut_to_fit,
        }
    }
}

/// Parses a body according to its `Content-Type`. `query` holds fields given
/// in the URL; the body's own fields take precedence.
pub fn parse(content_type: Option<&str>, body: &[u8], query: RawMessage) -> Result<RawMessage, Error> {
    let content_type = content_type.ok_or_else(|| {
        Error::UnsupportedMediaType(
            "a Content-Type is required: text/plain, application/x-www-form-urlencoded or application/json".into(),
        )
    })?;
    let mime: mime::Mime = content_type
        .parse()
        .map_err(|_| Error::UnsupportedMediaType(format!("cannot parse Content-Type {content_type:?}")))?;
    match (mime.type_(), mime.subtype()) {
        (mime::TEXT, mime::PLAIN) => {
            check_charset(&mime)?;
            let text =
                std::str::from_utf8(body).map_err(|e| Error::Malformed(format!("body is not valid UTF-8: {e}")))?;
            Ok(RawMessage { body: Some(text.to_owned()), ..query })
        }
        (mime::APPLICATION, mime::WWW_FORM_URLENCODED) => Ok(parse_form(body, "form")?.or(query)),
        (mime::APPLICATION, mime::JSON) => {
            check_charset(&mime)?;
            // serde would also read a struct from an array of its fields in
            // order; only an object is a message.
            if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|b| *b != b'{') {
                return Err(Error::Invalid(herald_shared::ValidationError::WrongType(
                    "the JSON body must be an object".into(),
                )));
            }
            let fields: RawMessage = serde_json::from_slice(body).map_err(|e| match e.classify() {
                serde_json::error::Category::Data => {
                    Error::Invalid(herald_shared::ValidationError::WrongType(e.to_string()))
                }
                _ => Error::Malformed(format!("cannot parse JSON: {e}")),
            })?;
            Ok(fields.or(query))
        }
        _ => Err(Error::UnsupportedMediaType(format!(
            "unsupported Content-Type {}; use text/plain, application/x-www-form-urlencoded or application/json",
            mime.essence_str()
        ))),
    }
}

/// `"a"` or `["a", "b"]` (or `null`: none).
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(OneOrMany::One(to)) => vec![to],
        Some(OneOrMany::Many(to)) => to,
    })
}

/// Form fields (a body or a query string): `to` may repeat, the others may
/// not; unknown fields are ignored.
fn parse_form(bytes: &[u8], what: &str) -> Result<RawMessage, Error> {
    check_form_utf8(bytes)?;
    let mut raw = RawMessage::default();
    for (key, value) in form_urlencoded::parse(bytes) {
        let slot = match &*key {
            "to" => {
                raw.to.push(value.into_owned());
                continue;
            }
            "type" => &mut raw.kind,
            "body" => &mut raw.body,
            "subject" => &mut raw.subject,
            "thread" => &mut raw.thread,
            _ => continue,
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(Error::Malformed(format!("the {what} has the field {key:?} more than once")));
        }
    }
    Ok(raw)
}

/// Form decoding replaces invalid UTF-8 with U+FFFD without a word; refuse
/// it instead, as for the other formats.
fn check_form_utf8(body: &[u8]) -> Result<(), Error> {
    for part in body.split(|b| *b == b'&' || *b == b'=') {
        let part: Vec<u8> = part.iter().map(|b| if *b == b'+' { b' ' } else { *b }).collect();
        percent_encoding::percent_decode(&part)
            .decode_utf8()
            .map_err(|e| Error::Malformed(format!("form field is not valid UTF-8: {e}")))?;
    }
    Ok(())
}

fn check_charset(mime: &mime::Mime) -> Result<(), Error> {
    match mime.get_param(mime::CHARSET) {
        None => Ok(()),
        Some(c) if c == mime::UTF_8 || c.as_str().eq_ignore_ascii_case("us-ascii") => Ok(()),
        Some(c) => Err(Error::UnsupportedMediaType(format!("charset {c} is not supported; send UTF-8"))),
    }
}

/// The query string's message fields; unknown parameters are ignored.
pub fn parse_query(query: Option<&str>) -> Result<RawMessage, Error> {
    match query {
        None | Some("") => Ok(RawMessage::default()),
        Some(q) => parse_form(q.as_bytes(), "query string"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(to: &str, body: &str) -> RawMessage {
        RawMessage { to: vec![to.into()], body: Some(body.into()), ..Default::default() }
    }

    #[test]
    fn form_fields_must_be_utf8() {
        let q = RawMessage::default();
        assert!(matches!(
            parse(Some("application/x-www-form-urlencoded"), b"to=a&body=%FF%FE", q.clone()),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse(Some("application/x-www-form-urlencoded"), b"to=a&body=\xff", q.clone()),
            Err(Error::Malformed(_))
        ));
        let ok = parse(Some("application/x-www-form-urlencoded"), b"to=a&body=caf%C3%A9+%E2%9C%93", q).expect("utf-8");
        assert_eq!(ok.body.as_deref(), Some("caf\u{e9} \u{2713}"));
    }

    #[test]
    fn text_plain_takes_the_whole_body() {
        let m = parse(Some("text/plain; charset=UTF-8"), "a=b&c\n{}".as_bytes(), RawMessage::default()).expect("ok");
        assert_eq!(m.body.as_deref(), Some("a=b&c\n{}"));
    }

    #[test]
    fn form_and_json_read_the_same_fields() {
        let form = parse(
            Some("application/x-www-form-urlencoded"),
            b"to=bob&body=hi+there&type=headline&subject=s&thread=t",
            RawMessage::default(),
        )
        .expect("form");
        let json = parse(
            Some("application/json"),
            br#"{"to":"bob","body":"hi there","type":"headline","subject":"s","thread":"t","extra":1}"#,
            RawMessage::default(),
        )
        .expect("json");
        assert_eq!(form, json);
        assert_eq!(form.kind.as_deref(), Some("headline"));
    }

    #[test]
    fn body_fields_win_over_the_query() {
        let m = parse(Some("application/json"), br#"{"body":"x","to":"a"}"#, fields("b", "y")).expect("ok");
        assert_eq!(m, fields("a", "x"));
    }

    #[test]
    fn several_recipients() {
        let q = RawMessage::default();
        let form = parse(Some("application/x-www-form-urlencoded"), b"to=a&body=x&to=b%40c", q.clone()).expect("form");
        assert_eq!(form.to, ["a", "b@c"]);
        let json = parse(Some("application/json"), br#"{"to":["a","b@c"],"body":"x"}"#, q.clone()).expect("json");
        assert_eq!(json, form);
        let query = parse_query(Some("to=a&to=b%40c")).expect("query");
        assert_eq!(parse(Some("text/plain"), b"x", query).expect("text").to, ["a", "b@c"]);
        assert!(parse(Some("application/json"), br#"{"to":null,"body":"x"}"#, q.clone()).expect("null").to.is_empty());
        assert!(matches!(
            parse(Some("application/json"), br#"{"to":["a",1],"body":"x"}"#, q.clone()),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            parse(Some("application/x-www-form-urlencoded"), b"to=a&body=x&body=y", q),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn refusals() {
        assert!(matches!(parse(None, b"x", RawMessage::default()), Err(Error::UnsupportedMediaType(_))));
        assert!(matches!(parse(Some("text/html"), b"x", RawMessage::default()), Err(Error::UnsupportedMediaType(_))));
        assert!(matches!(
            parse(Some("text/plain; charset=latin1"), b"x", RawMessage::default()),
            Err(Error::UnsupportedMediaType(_))
        ));
        assert!(matches!(parse(Some("text/plain"), b"\xff", RawMessage::default()), Err(Error::Malformed(_))));
        assert!(matches!(parse(Some("application/json"), b"{", RawMessage::default()), Err(Error::Malformed(_))));
        assert!(matches!(
            parse(Some("application/json"), br#"{"body": 5}"#, RawMessage::default()),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(parse(Some("application/json"), b"[1]", RawMessage::default()), Err(Error::Invalid(_))));
        assert!(matches!(
            parse(Some("application/json"), br#" ["a@b", null, "body"]"#, RawMessage::default()),
            Err(Error::Invalid(_))
        ));
    }
}
