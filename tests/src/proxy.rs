//! A TCP proxy between the services and a server (the broker), so that a
//! test can cut and restore the link without touching the shared broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    /// `true` while the link is cut: open connections close, new ones are
    /// refused.
    cut: watch::Sender<bool>,
    /// `true` while the link is frozen: connections stay open but nothing
    /// is forwarded either way (a peer that stopped reading).
    frozen: watch::Sender<bool>,
    /// Connections accepted and not yet closed.
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards every connection to
    /// `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (cut, cut_rx) = watch::channel(false);
        let (frozen, frozen_rx) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let open_accept = Arc::clone(&open);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // Counted before the cut is read, and `cut` sets the cut
                // before it reads the count (the watch's lock orders the
                // two): either `cut` waits for this connection or this
                // connection sees the cut.
                let guard = OpenConnection::new(&open_accept);
                if *cut_rx.borrow() {
                    continue;
                }
                let (upstream, mut cut_rx, mut frozen_rx) = (upstream.clone(), cut_rx.clone(), frozen_rx.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (mut client, mut server) = (client, server);
                    let frozen = tokio::select! {
                        biased;
                        _ = cut_rx.wait_for(|cut| *cut) => false,
                        _ = frozen_rx.wait_for(|frozen| *frozen) => true,
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                    };
                    if frozen {
                        // Hold both ends, forward nothing, until cut.
                        let _ = cut_rx.wait_for(|cut| *cut).await.is_ok();
                    }
                    // Dropping both ends resets the link mid-stream.
                });
            }
        });
        Self { port, cut, frozen, open, task }
    }

    /// `amqp://…` URL `url` with its host and port replaced by this proxy.
    pub fn amqp_url(&self, url: &str) -> String {
        amqp_url_via(url, self.port)
    }

    /// Drops every open connection and refuses new ones; returns once
    /// every connection is closed, so that nothing sent afterwards can still
    /// get through.
    pub async fn cut(&self) {
        self.cut.send_replace(true);
        crate::poll::until("the proxy's connections to close", Duration::from_secs(10), || async {
            (self.open.load(Ordering::SeqCst) == 0).then_some(())
        })
        .await;
    }

    /// Accepts connections again (and forwards again, if frozen).
    pub fn restore(&self) {
        self.frozen.send_replace(false);
        self.cut.send_replace(false);
    }

    /// Stops forwarding on every connection, open or new, while keeping
    /// them open: the peer looks alive but reads nothing. `cut` ends it.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `amqp://…` URL `url` with its host and port replaced by a local proxy's.
pub fn amqp_url_via(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with scheme");
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, String::new()));
    let credentials = authority.rsplit_once('@').map(|(c, _)| format!("{c}@")).unwrap_or_default();
    format!("{scheme}://{credentials}127.0.0.1:{port}{path}")
}

/// `host:port` of an `amqp://` URL.
pub fn amqp_authority(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5672") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amqp_urls() {
        assert_eq!(amqp_authority("amqp://guest:guest@127.0.0.1:5672/%2f"), "127.0.0.1:5672");
        assert_eq!(amqp_authority("amqp://rabbit/%2f"), "rabbit:5672");
    }
}
