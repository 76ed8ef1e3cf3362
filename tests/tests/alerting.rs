//! Alertmanager and Grafana notifications, as recorded from their webhook
//! payloads (tests/fixtures/), through the real stack: one message each,
//! rendered by the default templates, to one or several recipients.

use crate::{ALERTMANAGER, ARRIVAL, GRAFANA};
use herald_tests::{Receiver, Stack, StackOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn an_alertmanager_notification_arrives_as_one_readable_message() {
    let stack = Stack::start(StackOptions::default()).await;
    let (oncall, backup) = (stack.prosody.register("oncall"), stack.prosody.register("backup"));
    let mut oncall_rx = Receiver::connect(&stack.prosody, &oncall).await;
    let mut backup_rx = Receiver::connect(&stack.prosody, &backup).await;

    let response = stack.post(&format!("/alertmanager/{}", oncall.jid), Some("application/json"), ALERTMANAGER).await;
    assert_eq!(response.status(), 202);
    let m = oncall_rx.next(ARRIVAL).await.expect("the notification arrives");
    let expected = "🔥 FIRING:2 PostgresReplicationLag (cluster=db-eu)\n\
        • PostgresReplicationLag [critical]: Replication lag above 60 s\n\
        \x20 db-7 is 94 s behind its primary.\n\
        \x20 http://prometheus.example.com:9090/graph?g0.expr=pg_replication_lag_seconds+%3E+60&g0.tab=1\n\
        • PostgresReplicationLag [warning]: Replication lag above 60 s\n\
        \x20 db-9 is 61 s behind its primary.\n\
        \x20 http://prometheus.example.com:9090/graph?g0.expr=pg_replication_lag_seconds+%3E+60&g0.tab=1\n\
        Silence: http://alertmanager.example.com:9093/#/silences/new?filter=%7Balertname%3D%22PostgresReplicationLag%22%2Ccluster%3D%22db-eu%22%7D";
    assert_eq!(m.body, expected);
    assert!(oncall_rx.next(Duration::from_millis(300)).await.is_none(), "one message per notification");

    // Several recipients in the query string; the type too.
    let path = format!("/alertmanager?to={}&to={}&type=headline", oncall.jid, backup.jid);
    let response =
        stack.post(&path, Some("application/json"), ALERTMANAGER.replace("\"firing\"", "\"resolved\"")).await;
    assert_eq!(response.status(), 202);
    for rx in [&mut oncall_rx, &mut backup_rx] {
        let m = rx.next(ARRIVAL).await.expect("each recipient gets the resolved notification");
        assert!(m.body.starts_with("✅ RESOLVED PostgresReplicationLag (cluster=db-eu)\n✓ "), "{}", m.body);
        assert!(!m.body.contains("Silence:"), "no silence link once resolved: {}", m.body);
        assert_eq!(m.kind, tokio_xmpp::parsers::message::MessageType::Headline);
    }

    // A terminal colour code in someone's annotation: XML cannot carry ESC,
    // and refusing the notification would lose the alert.
    let coloured = ALERTMANAGER.replace("db-7 is 94 s behind", "db-7 is \\u001b[31m94 s\\u001b[0m behind");
    assert_ne!(coloured, ALERTMANAGER);
    // (To backup: for oncall it would be a repeat of the first notification,
    // whose key leaves annotations out.)
    let response = stack.post(&format!("/alertmanager/{}", backup.jid), Some("application/json"), coloured).await;
    assert_eq!(response.status(), 202);
    let m = backup_rx.next(ARRIVAL).await.expect("the notification arrives");
    assert!(m.body.contains("db-7 is \u{fffd}[31m94 s\u{fffd}[0m behind"), "{}", m.body);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grafana_notification_arrives_as_one_readable_message() {
    let stack = Stack::start(StackOptions::default()).await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;
    let response = stack.post(&format!("/grafana/{}", oncall.jid), Some("application/json"), GRAFANA).await;
    assert_eq!(response.status(), 202);
    let m = rx.next(ARRIVAL).await.expect("the notification arrives");
    let expected = "🔥 [FIRING:1] Disk almost full Storage (backup-3 warning)\n\
        • Disk almost full [warning]: Disk usage above 90 %\n\
        \x20 /var/backups on backup-3 is 93 % full.\n\
        \x20 values: [ var='A' labels={host=backup-3} value=93.4 ], [ var='C' labels={host=backup-3} value=1 ]\n\
        \x20 https://grafana.example.com/d/storage01?orgId=1&viewPanel=4\n\
        \x20 silence: https://grafana.example.com/alerting/silence/new?alertmanager=grafana&matcher=alertname%3DDisk+almost+full&matcher=host%3Dbackup-3";
    assert_eq!(m.body, expected);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_notification_is_refused_and_queues_nothing() {
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let work = stack.broker.topology().work_queue();
    let cases = [
        ("/alertmanager/ops", Some("text/plain"), ALERTMANAGER.to_owned(), 415),
        (
            "/alertmanager/ops",
            Some("application/json"),
            ALERTMANAGER.replace("\"version\": \"4\"", "\"version\": \"3\""),
            400,
        ),
        ("/alertmanager/ops", Some("application/json"), "{\"version\": \"4\"".to_owned(), 400),
        (
            "/grafana/ops",
            Some("application/json"),
            GRAFANA.replace("\"status\": \"firing\",\n  \"orgId\"", "\"status\": \"on fire\",\n  \"orgId\""),
            400,
        ),
        ("/alertmanager", Some("application/json"), ALERTMANAGER.to_owned(), 422),
    ];
    for (path, content_type, body, status) in cases {
        let response = stack.post(path, content_type, body).await;
        assert_eq!(response.status().as_u16(), status, "{path} {content_type:?}");
    }
    let anonymous = stack
        .http
        .post(format!("{}/alertmanager/ops", stack.ingress_url))
        .body(ALERTMANAGER)
        .send()
        .await
        .expect("HTTP");
    assert_eq!(anonymous.status(), 401, "authenticated like every other route");
    // Authenticated before its body is read: an anonymous upload announcing
    // more than the limit is answered 401 without a byte of it being read.
    for path in ["/alertmanager/ops", "/msg/ops"] {
        assert_eq!(status_of_headers_only(&stack.ingress_url, path, 2 * 1024 * 1024).await, 401, "{path}");
    }
    assert_eq!(stack.broker.ready(&work).await, 0, "nothing refused was queued");
    stack.stop().await;
}

/// Sends only the head of an anonymous POST announcing `length` bytes, and
/// returns the status the ingress answers before any of them.
async fn status_of_headers_only(base: &str, path: &str, length: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(authority).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut answer = vec![0; 64];
    let n =
        tokio::time::timeout(ARRIVAL, tcp.read(&mut answer)).await.expect("an answer before the body").expect("read");
    let line = String::from_utf8_lossy(&answer[..n]).into_owned();
    line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {line:?}"))
}
