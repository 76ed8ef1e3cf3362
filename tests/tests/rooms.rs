//! Group chat rooms: the relay joins a room as its account's nick before its
//! first message there, and a room that refuses the join parks the job with
//! the room's condition instead of reporting success.

use crate::{ALERTMANAGER, ARRIVAL, GRAFANA};
use herald_shared::topology::headers;
use herald_tests::broker::header_text;
use herald_tests::prosody::ROOMS;
use herald_tests::{Receiver, Stack, StackOptions, poll};
use std::time::Duration;
use tokio_xmpp::parsers::message::MessageType;

#[tokio::test(flavor = "multi_thread")]
async fn messages_and_notifications_reach_a_room_the_relay_joins() {
    let stack = Stack::start(StackOptions::default()).await;
    let admin = stack.prosody.room_admin();
    let mut watcher = Receiver::connect(&stack.prosody, &admin).await;
    let room = format!("ops@{ROOMS}");
    watcher.join_room(&room, "watcher").await;

    let json = serde_json::json!({ "to": room, "type": "groupchat", "body": "db-7 is down" });
    let response = stack.post("/msg", Some("application/json"), json.to_string()).await;
    assert_eq!(response.status(), 202);
    let m = watcher.next(ARRIVAL).await.expect("the room relays the message");
    let nick = stack.sender.jid.split('@').next().expect("local part");
    assert_eq!(
        (m.kind.clone(), m.body.as_str(), m.from.as_str()),
        (MessageType::Groupchat, "db-7 is down", format!("{room}/{nick}").as_str())
    );

    // An Alertmanager notification to the same room: already joined.
    let path = format!("/alertmanager/{room}?type=groupchat");
    assert_eq!(stack.post(&path, Some("application/json"), ALERTMANAGER).await.status(), 202);
    let m = watcher.next(ARRIVAL).await.expect("the notification reaches the room");
    assert!(m.body.starts_with("🔥 FIRING:2 PostgresReplicationLag"), "{}", m.body);
    let path = format!("/grafana/{room}?type=groupchat");
    assert_eq!(stack.post(&path, Some("application/json"), GRAFANA).await.status(), 202);
    let m = watcher.next(ARRIVAL).await.expect("the Grafana notification reaches the room");
    assert!(m.body.starts_with("🔥 [FIRING:1] Disk almost full"), "{}", m.body);
    assert!(watcher.next(Duration::from_millis(500)).await.is_none(), "no history replayed, nothing twice");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_room_that_refuses_the_join_parks_the_job_with_its_condition() {
    let stack = Stack::start(StackOptions::default()).await;
    let dead = stack.broker.topology().dead_queue();
    // Only the admin may create rooms here, so joining a new one is refused.
    let json = serde_json::json!({ "to": format!("nosuch@{ROOMS}"), "type": "groupchat", "body": "lost?" });
    let response = stack.post("/msg", Some("application/json"), json.to_string()).await;
    assert_eq!(response.status(), 202);
    poll::until("the refused job to be parked", ARRIVAL, || async {
        (stack.broker.ready(&dead).await == 1).then_some(())
    })
    .await;
    let parked = stack.broker.get(&dead).await.expect("parked job");
    let reason = header_text(&parked.delivery.properties, headers::REASON).expect("reason");
    assert!(reason.contains("refused the join") && reason.contains("not-allowed"), "{reason}");

    // The session is fine: an ordinary message still arrives.
    let account = stack.prosody.register("after");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    assert_eq!(stack.post(&format!("/msg/{}", account.jid), Some("text/plain"), "still here").await.status(), 202);
    assert_eq!(rx.next(ARRIVAL).await.expect("delivered").body, "still here");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_room_that_refuses_the_message_parks_it_with_its_condition() {
    let stack = Stack::start(StackOptions::default()).await;
    let dead = stack.broker.topology().dead_queue();
    let admin = stack.prosody.room_admin();
    let mut watcher = Receiver::connect(&stack.prosody, &admin).await;
    let room = format!("quiet@{ROOMS}");
    watcher.join_room(&room, "watcher").await;
    // Moderated: the relay joins as a visitor, and visitors may not speak.
    watcher.configure_room(&room, &[("moderatedroom", "1")]).await;

    let json = serde_json::json!({ "to": room, "type": "groupchat", "body": "can anyone hear me?" });
    assert_eq!(stack.post("/msg", Some("application/json"), json.to_string()).await.status(), 202);
    poll::until("the refused message to be parked", ARRIVAL, || async {
        (stack.broker.ready(&dead).await == 1).then_some(())
    })
    .await;
    let parked = stack.broker.get(&dead).await.expect("parked job");
    let reason = header_text(&parked.delivery.properties, headers::REASON).expect("reason");
    assert!(reason.contains("bounced: forbidden"), "{reason}");
    assert!(watcher.next(Duration::from_millis(500)).await.is_none(), "the room did not relay it");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_server_restarts_the_relay_joins_the_room_again() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let admin = stack.prosody.room_admin();
    let room = format!("ops@{ROOMS}");
    let mut watcher = Receiver::connect(&stack.prosody, &admin).await;
    watcher.join_room(&room, "watcher").await;
    let post = |body: &'static str| serde_json::json!({ "to": room, "type": "groupchat", "body": body }).to_string();
    assert_eq!(stack.post("/msg", Some("application/json"), post("before")).await.status(), 202);
    assert_eq!(watcher.next(ARRIVAL).await.expect("before the restart").body, "before");
    drop(watcher);

    // A restart ends every session and every room: the relay's stream is
    // new, not resumed, and the room must be joined anew.
    stack.prosody.restart().await;
    let mut watcher = Receiver::connect(&stack.prosody, &admin).await;
    watcher.join_room(&room, "watcher").await;
    assert_eq!(stack.post("/msg", Some("application/json"), post("after")).await.status(), 202);
    assert_eq!(watcher.next(ARRIVAL).await.expect("after the restart").body, "after");
    stack.stop().await;
}
