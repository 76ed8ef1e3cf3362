//! A TCP proxy in front of the broker that can tell its clients their
//! connection is blocked (`connection.blocked`, then `connection.unblocked`),
//! as RabbitMQ does during a memory or disk alarm, without raising an alarm
//! on the machine's shared broker. Frames from the broker are forwarded
//! whole, and the notices are slipped in between two of them.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

pub struct Blocker {
    pub port: u16,
    blocked: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// AMQP 0-9-1 frame: type, channel, size, payload, frame end.
const FRAME_END: u8 = 0xCE;
const METHOD: u8 = 1;
const CONNECTION_CLASS: u16 = 10;
const BLOCKED: u16 = 60;
const UNBLOCKED: u16 = 61;

impl Blocker {
    /// Listens on a free local port and forwards every connection to
    /// `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the blocker");
        let port = listener.local_addr().expect("addr").port();
        let (blocked, blocked_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                tokio::spawn(forward(client, server, blocked_rx.clone()));
            }
        });
        Self { port, blocked, task }
    }

    /// `amqp://…` URL `url` with its host and port replaced by this proxy.
    pub fn amqp_url(&self, url: &str) -> String {
        crate::proxy::amqp_url_via(url, self.port)
    }

    /// Tells every open connection it is blocked (`true`) or unblocked.
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.send_replace(blocked);
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, mut blocked: watch::Receiver<bool>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
    // Whole frames from the broker, read apart from writing so that a
    // notice never lands inside a frame.
    let (frames_tx, mut frames) = mpsc::channel::<Vec<u8>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let mut header = [0u8; 7];
            if server_read.read_exact(&mut header).await.is_err() {
                return;
            }
            let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
            let mut frame = header.to_vec();
            frame.resize(7 + size + 1, 0);
            if server_read.read_exact(&mut frame[7..]).await.is_err() || frames_tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    loop {
        let bytes = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            changed = blocked.changed() => match changed {
                Ok(()) => notice(*blocked.borrow_and_update()),
                Err(_) => break,
            },
        };
        if client_write.write_all(&bytes).await.is_err() {
            break;
        }
    }
    reader.abort();
    upstream.abort();
}

/// A `connection.blocked` (with a reason) or `connection.unblocked` frame.
fn notice(blocked: bool) -> Vec<u8> {
    let mut payload = CONNECTION_CLASS.to_be_bytes().to_vec();
    if blocked {
        payload.extend(BLOCKED.to_be_bytes());
        let reason = b"low on memory (herald-tests)";
        payload.push(reason.len() as u8);
        payload.extend(reason);
    } else {
        payload.extend(UNBLOCKED.to_be_bytes());
    }
    let mut frame = vec![METHOD, 0, 0];
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(payload);
    frame.push(FRAME_END);
    frame
}
