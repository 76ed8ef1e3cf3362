//! Logs in to an XMPP server as a recipient and waits for a message: the
//! check at the end of the container runs (deploy/), which prove that a POST
//! to the ingress image reached a person through the relay image.
//!
//!     SSL_CERT_FILE=ca.pem herald-xmpp-receive --jid bob@localhost --password bob-xmpp-pw \
//!         --server 127.0.0.1:15222 --expect 'db-7 is down'
//!
//! Exits 0 once, for each `--expect` (repeatable), a message whose body
//! contains it has arrived and been printed (messages the server kept
//! offline arrive at login), 1 if not all arrived within `--timeout`. The connection uses STARTTLS (the CA from
//! `SSL_CERT_FILE`, as the relay does) unless `--plaintext`.

use clap::Parser;
use futures::StreamExt;
use std::process::ExitCode;
use std::time::Duration;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, Stanza};

#[derive(Parser)]
#[command(about = "Wait for an XMPP message whose body contains a text")]
struct Args {
    /// The recipient's JID.
    #[arg(long)]
    jid: String,
    #[arg(long)]
    password: String,
    /// host:port of the server's c2s listener.
    #[arg(long)]
    server: String,
    /// A text a message body must contain; repeat for several messages
    /// (any one message if not given).
    #[arg(long)]
    expect: Vec<String>,
    /// How long to wait, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// No TLS (only for a server on loopback that offers none).
    #[arg(long)]
    plaintext: bool,
    /// Create this file once online, when the server has reflected the
    /// recipient's presence (from then on, messages arrive live): a script
    /// can wait for it before it posts.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    herald_shared::telemetry::install_crypto_provider();
    let Some((host, port)) = args.server.rsplit_once(':').and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
    else {
        eprintln!("--server must be host:port, not {:?}", args.server);
        return ExitCode::from(2);
    };
    let jid: tokio_xmpp::jid::Jid = match args.jid.parse() {
        Ok(jid) => jid,
        Err(e) => {
            eprintln!("--jid {:?}: {e}", args.jid);
            return ExitCode::from(2);
        }
    };
    let dns = DnsConfig::NoSrv { host, port, resolver: None };
    let client = if args.plaintext {
        Client::new_plaintext(jid, args.password, dns, Timeouts::tight())
    } else {
        Client::new_starttls(jid, args.password, dns, Timeouts::tight())
    };
    let mut missing = if args.expect.is_empty() { vec![String::new()] } else { args.expect };
    let jid = args.jid;
    let mut online = Online { bare_jid: jid.clone(), ready_file: args.ready_file };
    let outcome = tokio::time::timeout(args.timeout, async {
        let mut client = client;
        while !missing.is_empty() {
            let Some((from, body)) = next_message(&mut client, &mut online).await else { break };
            if let Some(i) = missing.iter().position(|text| body.contains(text.as_str())) {
                println!("{jid} received from {from}: {body}");
                missing.swap_remove(i);
            }
        }
        let _ = client.send_end().await;
    })
    .await;
    if outcome.is_err() {
        eprintln!("timed out after {:?}", args.timeout);
    }
    if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("no message arrived containing {missing:?}");
        ExitCode::FAILURE
    }
}

/// Who we are, and the file that says we are online.
struct Online {
    bare_jid: String,
    ready_file: Option<std::path::PathBuf>,
}

/// The sender and body of the next message with a body; goes online (with
/// presence, which releases offline messages) whenever connected.
async fn next_message(client: &mut Client, online: &mut Online) -> Option<(String, String)> {
    while let Some(event) = client.next().await {
        match event {
            Event::Online { .. } => {
                if let Err(e) = client.send_stanza(Presence::available().into()).await {
                    eprintln!("cannot send presence: {e}");
                }
            }
            Event::Stanza(Stanza::Presence(presence))
                if presence.from.as_ref().is_some_and(|f| f.to_bare().to_string() == online.bare_jid) =>
            {
                if let Some(path) = online.ready_file.take()
                    && let Err(e) = std::fs::write(&path, "online\n")
                {
                    eprintln!("cannot write {}: {e}", path.display());
                }
            }
            Event::Stanza(Stanza::Message(message)) => {
                let from = message.from.as_ref().map(|f| f.to_string()).unwrap_or_default();
                if let Some(body) = message.bodies.values().next() {
                    return Some((from, body.clone()));
                }
            }
            Event::Disconnected(e) => eprintln!("disconnected ({e}); reconnecting"),
            _ => {}
        }
    }
    None
}
