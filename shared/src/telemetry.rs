//! Logging set-up shared by both binaries, and the one TLS provider.

use tracing_subscriber::EnvFilter;

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`), and
/// `HERALD_LOG_FORMAT=json` switches to one JSON object per line.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter()));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    // A second call (tests running several apps in one process) is harmless.
    drop(result);
}

/// `info` for Herald. tokio-xmpp logs every failed reconnect at `error`,
/// which a remote server can trigger, so it is silenced by default: the
/// relay reports session state itself.
fn default_filter() -> &'static str {
    "info,tokio_xmpp=off,xmpp_parsers=warn,lapin=warn"
}

/// Installs ring as the process-wide rustls provider, before any TLS
/// connection is made (XMPP STARTTLS and `amqps://` both use it).
pub fn install_crypto_provider() {
    // Err means one was already installed, by an earlier call in this process.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
