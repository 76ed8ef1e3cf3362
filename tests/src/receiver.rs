//! A plain XMPP client that receives what Herald sends: it logs in, sends
//! initial presence, and collects every `<message/>` that carries a body.

use crate::prosody::{Prosody, XmppAccount};
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, Stanza};

/// What arrived, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub id: Option<String>,
    pub from: String,
    pub to: String,
    pub kind: MessageType,
    pub body: String,
    pub subject: Option<String>,
    pub thread: Option<String>,
}

pub struct Receiver {
    pub account: XmppAccount,
    messages: mpsc::UnboundedReceiver<Received>,
    /// Presences from others (rooms, their occupants) and iq answers.
    others: mpsc::UnboundedReceiver<Stanza>,
    outgoing: mpsc::UnboundedSender<Stanza>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Receiver {
    /// Logs in as `account` and waits until the server has reflected its
    /// initial presence back: only then do messages to the bare JID reach it.
    ///
    /// A login that has not got there within `ATTEMPT` is dropped and tried
    /// again on a new connection (saying how far it got): on a loaded
    /// machine one in a few hundred logins stalled before it was online,
    /// and the tests are about Herald, not about the receiver's login.
    pub async fn connect(prosody: &Prosody, account: &XmppAccount) -> Self {
        Self::connect_to(prosody.port, account).await
    }

    /// As `connect`, to the server on `port` of 127.0.0.1 (without TLS).
    pub async fn connect_to(port: u16, account: &XmppAccount) -> Self {
        const ATTEMPT: Duration = Duration::from_secs(10);
        const ATTEMPTS: u32 = 3;
        herald_shared::telemetry::install_crypto_provider();
        for attempt in 1..=ATTEMPTS {
            let (tx, messages) = mpsc::unbounded_channel();
            let (others_tx, others) = mpsc::unbounded_channel();
            let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (online_tx, online_rx) = tokio::sync::oneshot::channel();
            let (stage_tx, stage) = tokio::sync::watch::channel("connecting");
            let channels = Channels { messages: tx, others: others_tx, outgoing: outgoing_rx, stopped };
            tokio::spawn(run(port, account.clone(), online_tx, stage_tx, channels));
            match tokio::time::timeout(ATTEMPT, online_rx).await {
                Ok(Ok(())) => return Self { account: account.clone(), messages, others, outgoing, stop: Some(stop) },
                Ok(Err(_)) => eprintln!(
                    "receiver {}: its task ended at stage {:?}; attempt {attempt}",
                    account.jid,
                    *stage.borrow()
                ),
                Err(_) => eprintln!(
                    "receiver {}: not online after {ATTEMPT:?}, at stage {:?}; attempt {attempt}",
                    account.jid,
                    *stage.borrow()
                ),
            }
            let _ = stop.send(());
        }
        panic!("receiver {} could not get online in {ATTEMPTS} attempts", account.jid);
    }

    /// Joins (creating it if need be) the group chat `room` as `nick`, with
    /// no history, and returns once the room answered with our own presence.
    pub async fn join_room(&mut self, room: &str, nick: &str) {
        let occupant: tokio_xmpp::jid::Jid = format!("{room}/{nick}").parse().expect("occupant JID");
        let mut presence = Presence::available().with_to(occupant.clone());
        presence.add_payload(
            tokio_xmpp::parsers::muc::Muc::new()
                .with_history(tokio_xmpp::parsers::muc::muc::History::new().with_maxstanzas(0)),
        );
        self.outgoing.send(presence.into()).expect("receiver task alive");
        let joined = async {
            while let Some(stanza) = self.others.recv().await {
                if let Stanza::Presence(p) = stanza
                    && p.from.as_ref() == Some(&occupant)
                {
                    assert_ne!(
                        p.type_,
                        tokio_xmpp::parsers::presence::Type::Error,
                        "{} cannot join {room}",
                        self.account.jid
                    );
                    return;
                }
            }
            panic!("receiver task ended");
        };
        tokio::time::timeout(Duration::from_secs(20), joined).await.expect("joined the room within 20 s");
    }

    /// Submits the owner's configuration form of `room` (XEP-0045 §10.2)
    /// with these `muc#roomconfig_*` fields, and waits for the room's
    /// answer.
    pub async fn configure_room(&mut self, room: &str, fields: &[(&str, &str)]) {
        use tokio_xmpp::parsers::iq::Iq;
        let fields: String = fields
            .iter()
            .map(|(var, value)| format!("<field var='muc#roomconfig_{var}'><value>{value}</value></field>"))
            .collect();
        let form = format!(
            "<query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>{fields}</x></query>"
        );
        let id = format!("config-{}", uuid::Uuid::new_v4().simple());
        let to: tokio_xmpp::jid::Jid = room.parse().expect("room JID");
        let iq = Iq::Set { from: None, to: Some(to), id: id.clone(), payload: form.parse().expect("form XML") };
        self.outgoing.send(iq.into()).expect("receiver task alive");
        let answered = async {
            while let Some(stanza) = self.others.recv().await {
                match stanza {
                    Stanza::Iq(Iq::Result { id: answer, .. }) if answer == id => return,
                    Stanza::Iq(Iq::Error { id: answer, error, .. }) if answer == id => {
                        panic!("{room} refused the configuration: {error:?}")
                    }
                    _ => {}
                }
            }
            panic!("receiver task ended");
        };
        tokio::time::timeout(Duration::from_secs(20), answered).await.expect("the room answered within 20 s");
    }

    /// Sends any stanza as this client, as a misbehaving recipient could.
    pub fn send(&self, stanza: Stanza) {
        self.outgoing.send(stanza).expect("receiver task alive");
    }

    /// Waits for the next message, up to `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> Option<Received> {
        tokio::time::timeout(deadline, self.messages.recv()).await.ok().flatten()
    }

    /// Collects messages until `n` have arrived or `deadline` passed since
    /// the last one, and returns what arrived.
    pub async fn collect(&mut self, n: usize, idle_deadline: Duration) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next(idle_deadline).await {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A receiver task's ends of its channels.
struct Channels {
    messages: mpsc::UnboundedSender<Received>,
    others: mpsc::UnboundedSender<Stanza>,
    outgoing: mpsc::UnboundedReceiver<Stanza>,
    stopped: tokio::sync::oneshot::Receiver<()>,
}

/// One connection of a receiver: reports how far it got on `stage`, says
/// when it is online, then forwards every message with a body and every
/// presence from others, and sends what it is given.
async fn run(
    port: u16,
    account: XmppAccount,
    online: tokio::sync::oneshot::Sender<()>,
    stage: tokio::sync::watch::Sender<&'static str>,
    channels: Channels,
) {
    let Channels { messages: tx, others, mut outgoing, mut stopped } = channels;
    let dns = DnsConfig::Addr { addr: format!("127.0.0.1:{port}") };
    let jid: tokio_xmpp::jid::Jid = account.jid.parse().expect("jid");
    let mut client = Client::new_plaintext(jid, account.password.clone(), dns, Timeouts::tight());
    let mut online = Some(online);
    loop {
        let event = tokio::select! {
            _ = &mut stopped => break,
            Some(stanza) = outgoing.recv() => {
                if let Err(e) = client.send_stanza(stanza).await {
                    eprintln!("receiver {}: cannot send: {e}", account.jid);
                }
                continue;
            }
            event = client.next() => match event { Some(e) => e, None => return },
        };
        match event {
            Event::Online { .. } => {
                stage.send_replace("online, sending presence");
                // After a reconnect too: presence is what gets messages routed here.
                if let Err(e) = client.send_stanza(Presence::available().into()).await {
                    eprintln!("receiver {}: cannot send presence: {e}", account.jid);
                }
                stage.send_replace("presence sent, waiting for it to come back");
            }
            Event::Stanza(Stanza::Presence(p))
                if p.from.as_ref().is_some_and(|f| f.to_bare().to_string() == account.jid) =>
            {
                if let Some(online) = online.take() {
                    stage.send_replace("ready");
                    let _ = online.send(());
                }
            }
            Event::Stanza(Stanza::Message(m)) if !m.bodies.is_empty() => {
                let _ = tx.send(reduce(m));
            }
            Event::Stanza(stanza @ (Stanza::Presence(_) | Stanza::Iq(_))) => {
                let _ = others.send(stanza);
            }
            // tokio-xmpp reconnects on its own; say why, for a test that
            // then times out.
            Event::Disconnected(e) => {
                stage.send_replace("disconnected, reconnecting");
                eprintln!("receiver {}: disconnected ({e}); reconnecting", account.jid);
            }
            _ => {}
        }
    }
    let _ = client.send_end().await;
}

fn reduce(m: Message) -> Received {
    Received {
        id: m.id.map(|i| i.0),
        from: m.from.map(|j| j.to_string()).unwrap_or_default(),
        to: m.to.map(|j| j.to_string()).unwrap_or_default(),
        kind: m.type_,
        body: m.bodies.values().next().cloned().unwrap_or_default(),
        subject: m.subjects.values().next().cloned(),
        thread: m.thread.map(|t| t.id),
    }
}
