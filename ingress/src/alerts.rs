//! Alertmanager and Grafana notifications, rendered into one message each
//! by a Jinja template (minijinja): Herald's defaults in `templates/`, or
//! an operator's file (`HERALD_ALERTMANAGER_TEMPLATE`,
//! `HERALD_GRAFANA_TEMPLATE`).
//!
//! A template sees the notification exactly as its sender posted it (so
//! every field their documentation lists is there, under the same name),
//! plus `firing` and `resolved` (the alerts by status) and, for
//! Alertmanager, `silenceURL` (a new silence matching the group's labels).

use crate::error::Error;
use herald_shared::domain::xml_text_len;
use minijinja::value::Serde;
use minijinja::{Environment, Value, context};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

const ALERTMANAGER_DEFAULT: &str = include_str!("../templates/alertmanager.j2");
const GRAFANA_DEFAULT: &str = include_str!("../templates/grafana.j2");

/// Where a notification comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Alertmanager,
    Grafana,
}

impl Source {
    /// For messages: "an Alertmanager notification".
    fn a_notification(self) -> &'static str {
        match self {
            Source::Alertmanager => "an Alertmanager notification",
            Source::Grafana => "a Grafana notification",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Source::Alertmanager => "alertmanager",
            Source::Grafana => "grafana",
        }
    }
}

/// A notification rendered: the message, and the key that makes a repeat
/// of the same notification the same job.
#[derive(Debug)]
pub struct Rendered {
    pub text: String,
    /// Source and a digest of the group key, the status and each alert's
    /// fingerprint, status and start, when the notification has a group key.
    pub key: Option<String>,
}

/// The compiled templates, one per source.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

/// What every notification must have, checked before rendering so that a
/// template can rely on it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    version: Option<String>,
    status: String,
    alerts: Vec<AlertShape>,
    #[serde(default)]
    group_labels: BTreeMap<String, String>,
    #[serde(default, rename = "externalURL")]
    external_url: Option<String>,
    #[serde(default)]
    group_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AlertShape {
    status: String,
    #[serde(default)]
    fingerprint: String,
    #[serde(default, rename = "startsAt")]
    starts_at: String,
    // Checked for their type (string → string) only.
    #[serde(default)]
    #[allow(dead_code)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

impl Templates {
    /// Herald's defaults, or the given files. A template that does not
    /// compile stops the ingress at start-up, not at the first alert.
    pub fn load(alertmanager: Option<&Path>, grafana: Option<&Path>) -> Result<Self, Error> {
        let mut env = Environment::new();
        // Plain text for a chat message: no HTML escaping; keep the last newline out.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
        for (source, file, default) in
            [(Source::Alertmanager, alertmanager, ALERTMANAGER_DEFAULT), (Source::Grafana, grafana, GRAFANA_DEFAULT)]
        {
            let text = match file {
                None => default.to_owned(),
                Some(path) => std::fs::read_to_string(path).map_err(|e| {
                    Error::Config(format!("cannot read the {} template {}: {e}", source.name(), path.display()))
                })?,
            };
            env.add_template_owned(source.name(), text)
                .map_err(|e| Error::Config(format!("the {} template does not compile: {e:#}", source.name())))?;
        }
        Ok(Self { env })
    }

    /// The message text for a notification posted as `body`.
    pub fn render(&self, source: Source, body: &[u8]) -> Result<Rendered, Error> {
        let payload: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| Error::Malformed(format!("cannot parse {}: {e}", source.a_notification())))?;
        let shape = Shape::deserialize(&payload)
            .map_err(|e| Error::Malformed(format!("not {}: {e}", source.a_notification())))?;
        check(source, &shape)?;
        let by_status = |status: &str| -> Vec<serde_json::Value> {
            payload["alerts"].as_array().into_iter().flatten().filter(|a| a["status"] == status).cloned().collect()
        };
        let silence_url = match (source, &shape.external_url) {
            (Source::Alertmanager, Some(base)) if !base.is_empty() => Some(silence_url(base, &shape.group_labels)),
            _ => None,
        };
        let ctx = context! {
            firing => Value::from(Serde(by_status("firing"))),
            resolved => Value::from(Serde(by_status("resolved"))),
            silenceURL => silence_url,
            ..Value::from(Serde(&payload))
        };
        let template = self.env.get_template(source.name()).map_err(|e| Error::Render(e.to_string()))?;
        let text = template.render(ctx).map_err(|e| Error::Render(format!("{e:#}")))?;
        Ok(Rendered { text: text.trim().to_owned(), key: key(source, &shape) })
    }
}

fn check(source: Source, shape: &Shape) -> Result<(), Error> {
    let bad = |what: String| Err(Error::Malformed(format!("not {}: {what}", source.a_notification())));
    if source == Source::Alertmanager && shape.version.as_deref() != Some("4") {
        return bad(format!("version {:?}, expected \"4\"", shape.version));
    }
    let known = |s: &str| matches!(s, "firing" | "resolved");
    if !known(&shape.status) {
        return bad(format!("status {:?}", shape.status));
    }
    if shape.alerts.is_empty() {
        return bad("no alerts".into());
    }
    if let Some(alert) = shape.alerts.iter().find(|a| !known(&a.status)) {
        return bad(format!("alert status {:?}", alert.status));
    }
    Ok(())
}

/// The same group, status and alerts, each in the same state since the same
/// start: the same notification (Alertmanager sends it again at every
/// `repeat_interval`, and each peer of an HA pair sends it once). One alert
/// of a firing group resolving, or resolving and firing again, is a new
/// notification. A digest, so that a group of many alerts makes a short key.
fn key(source: Source, shape: &Shape) -> Option<String> {
    use blake2::digest::{Digest, consts::U32};
    let group = shape.group_key.as_deref().filter(|g| !g.is_empty())?;
    let mut alerts: Vec<[&str; 3]> =
        shape.alerts.iter().map(|a| [a.fingerprint.as_str(), a.status.as_str(), a.starts_at.as_str()]).collect();
    alerts.sort_unstable();
    let mut digest = blake2::Blake2b::<U32>::new();
    for part in [group, shape.status.as_str()].into_iter().chain(alerts.iter().flatten().copied()) {
        // Length-prefixed, so that no two different lists hash alike.
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part.as_bytes());
    }
    Some(format!("{}:{:x}", source.name(), digest.finalize()))
}

/// Alertmanager's "new silence" page, filled with the group's labels.
fn silence_url(base: &str, group_labels: &BTreeMap<String, String>) -> String {
    let matchers: Vec<String> =
        group_labels.iter().map(|(k, v)| format!("{k}={}", serde_json::Value::from(v.as_str()))).collect();
    let filter = format!("{{{}}}", matchers.join(","));
    let filter: String = form_urlencoded::byte_serialize(filter.as_bytes()).collect();
    format!("{}/#/silences/new?filter={filter}", base.trim_end_matches('/'))
}

/// Cuts `text` to at most `max` bytes as XML text (as `Body::parse` counts)
/// on a character boundary, saying so.
pub fn fit(text: String, max: usize) -> String {
    const MARK: &str = "\n…(truncated)";
    if xml_text_len(&text) <= max {
        return text;
    }
    // Measured as XML, as `Body::parse` measures it.
    let budget = max.saturating_sub(xml_text_len(MARK));
    let mut used = 0;
    let end = text
        .char_indices()
        .find(|(_, c)| {
            used += xml_text_len(c.encode_utf8(&mut [0; 4]));
            used > budget
        })
        .map_or(text.len(), |(i, _)| i);
    format!("{}{MARK}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn templates() -> Templates {
        Templates::load(None, None).expect("the defaults compile")
    }

    const FIRING: &str = r#"{
      "version": "4", "groupKey": "{}:{alertname=\"HighLatency\"}", "truncatedAlerts": 0,
      "status": "firing", "receiver": "herald",
      "groupLabels": {"alertname": "HighLatency", "job": "api"},
      "commonLabels": {"alertname": "HighLatency", "job": "api", "severity": "critical"},
      "commonAnnotations": {}, "externalURL": "http://am.example.com:9093",
      "alerts": [
        {"status": "firing", "labels": {"alertname": "HighLatency", "instance": "api-1", "job": "api", "severity": "critical"},
         "annotations": {"summary": "p99 latency above 500 ms", "description": "api-1 answers in 730 ms"},
         "startsAt": "2026-11-25T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
         "generatorURL": "http://prom.example.com/graph?g0.expr=x", "fingerprint": "a1"},
        {"status": "resolved", "labels": {"alertname": "HighLatency", "instance": "api-2", "job": "api", "severity": "critical"},
         "annotations": {"summary": "p99 latency above 500 ms"},
         "startsAt": "2026-11-25T09:00:00Z", "endsAt": "2026-11-25T10:01:00Z", "generatorURL": "", "fingerprint": "b2"}
      ]
    }"#;

    #[test]
    fn the_default_alertmanager_message_reads_well() {
        let rendered = templates().render(Source::Alertmanager, FIRING.as_bytes()).expect("renders");
        assert!(rendered.key.as_deref().is_some_and(|k| k.starts_with("alertmanager:")), "{:?}", rendered.key);
        let text = rendered.text;
        let expected = "🔥 FIRING:1 HighLatency (job=api)\n\
            • HighLatency [critical]: p99 latency above 500 ms\n  api-1 answers in 730 ms\n  http://prom.example.com/graph?g0.expr=x\n\
            ✓ HighLatency [critical]: p99 latency above 500 ms\n\
            Silence: http://am.example.com:9093/#/silences/new?filter=%7Balertname%3D%22HighLatency%22%2Cjob%3D%22api%22%7D";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_notification_keys_itself_by_what_changed() {
        let key = |payload: &str| {
            templates().render(Source::Alertmanager, payload.as_bytes()).expect("renders").key.expect("key")
        };
        let first = key(FIRING);
        assert_eq!(key(FIRING), first, "a repeat (HA peer, repeat_interval) is the same notification");
        let reordered = FIRING.replacen(r#""fingerprint": "a1""#, r#""fingerprint": "TMP""#, 1).replacen(
            r#""fingerprint": "b2""#,
            r#""fingerprint": "a1""#,
            1,
        );
        assert_ne!(key(&reordered), first, "other alerts");
        // The group stays firing while one of its alerts resolves, or
        // resolves and fires again: each is news.
        let a1_resolved = FIRING.replacen(r#"{"status": "firing", "labels""#, r#"{"status": "resolved", "labels""#, 1);
        assert_ne!(key(&a1_resolved), first);
        let b2_refired = FIRING
            .replacen(r#"{"status": "resolved", "labels""#, r#"{"status": "firing", "labels""#, 1)
            .replacen("2026-11-25T09:00:00Z", "2026-11-25T10:05:00Z", 1);
        let b2_firing_again =
            FIRING.replacen(r#"{"status": "resolved", "labels""#, r#"{"status": "firing", "labels""#, 1);
        assert_ne!(key(&b2_refired), key(&b2_firing_again), "a new start is a new alert");
        // endsAt moves with every evaluation of a firing alert: not part of the key.
        let later_end = FIRING.replacen("2026-11-25T10:01:00Z", "2026-11-25T10:09:00Z", 1);
        assert_ne!(later_end, FIRING);
        assert_eq!(key(&later_end), first);
        let other_group = FIRING.replacen(
            r#""groupKey": "{}:{alertname=\"HighLatency\"}""#,
            r#""groupKey": "{}:{alertname=\"Other\"}""#,
            1,
        );
        assert_ne!(key(&other_group), first);
    }

    #[test]
    fn notifications_are_checked_before_rendering() {
        let t = templates();
        for bad in [
            FIRING.replace(r#""version": "4""#, r#""version": "3""#),
            FIRING.replace(r#""status": "firing", "receiver""#, r#""status": "burning", "receiver""#),
            r#"{"version": "4", "status": "firing", "alerts": []}"#.to_owned(),
            r#"{"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": {"a": 1}}]}"#.to_owned(),
            "[1]".to_owned(),
        ] {
            assert!(matches!(t.render(Source::Alertmanager, bad.as_bytes()), Err(Error::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn an_operator_template_replaces_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("am.j2");
        std::fs::write(&path, "{{ status }} {{ alerts | length }} {{ commonLabels.severity }} {{ nothing.at.all }}<b>")
            .expect("write");
        let t = Templates::load(Some(&path), None).expect("compiles");
        assert_eq!(t.render(Source::Alertmanager, FIRING.as_bytes()).expect("renders").text, "firing 2 critical <b>");
        std::fs::write(&path, "{% if %}").expect("write");
        assert!(matches!(Templates::load(Some(&path), None), Err(Error::Config(_))));
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let text = "é".repeat(100);
        let cut = fit(text, 50);
        assert!(cut.len() <= 50 && cut.ends_with("…(truncated)"), "{cut}");
        let ampersands = fit("&".repeat(100), 50);
        assert!(xml_text_len(&ampersands) <= 50 && ampersands.starts_with("&&"), "{ampersands}");
        assert_eq!(fit("short".into(), 50), "short");
    }
}
