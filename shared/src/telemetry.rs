//! Logging set-up shared by both binaries, and the one TLS provider.

use tracing_subscriber::EnvFilter;

/// The settings both binaries read from the environment only, for their
/// `--help`.
pub const ENVIRONMENT_HELP: &str = "\
Also read from the environment:
  RUST_LOG            log filter, tracing EnvFilter syntax [default: info; lapin and tokio_xmpp stay off
                      unless named]
  HERALD_LOG_FORMAT   json for one JSON object per line [default: text]
  SSL_CERT_FILE       a PEM file of CA certificates to trust instead of the system store (XMPP TLS, amqps://)
  SSL_CERT_DIR        a directory of such files";

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`), and
/// `HERALD_LOG_FORMAT=json` switches to one JSON object per line.
pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(with_quiet_crates(&directives)),
        _ => EnvFilter::new(default_filter()),
    };
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_ansi(ansi);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    // A second call (tests running several apps in one process) is harmless.
    drop(result);
}

/// `info` for Herald. tokio-xmpp logs every failed reconnect at `error`,
/// and lapin every reset connection and every refused passive declare, all
/// of which a remote party can cause: both are silenced by default, and
/// Herald says once per lost connection what happened, and again when it is
/// back (`RUST_LOG=info,lapin=debug` brings lapin's lines back).
fn default_filter() -> &'static str {
    "info,tokio_xmpp=off,xmpp_parsers=warn,lapin=off"
}

/// `RUST_LOG` as given, with tokio-xmpp and lapin silenced unless it names
/// them: `RUST_LOG=info` must not bring back their `error` lines.
fn with_quiet_crates(directives: &str) -> String {
    let mut out = directives.trim().to_owned();
    for quiet in ["tokio_xmpp", "lapin"] {
        if !directives.contains(quiet) {
            out.push_str(&format!(",{quiet}=off"));
        }
    }
    out
}

/// A log line for an event that repeats with traffic (a 503 for every
/// request while the broker is away): at most one line per interval, with
/// how many events it stands for, so that log volume does not grow with
/// traffic during an outage.
#[derive(Debug)]
pub struct Repeated {
    interval: std::time::Duration,
    state: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl Repeated {
    pub const fn new(interval: std::time::Duration) -> Self {
        Self { interval, state: std::sync::Mutex::new(None) }
    }

    /// Counts one event; `Some(n)` when a line is due now, `n` being the
    /// events since the last line, this one included.
    pub fn tick(&self) -> Option<u64> {
        self.tick_at(std::time::Instant::now())
    }

    fn tick_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *state {
            Some((last, count)) if now.duration_since(*last) < self.interval => {
                *count += 1;
                None
            }
            Some((last, count)) => {
                let n = *count + 1;
                (*last, *count) = (now, 0);
                Some(n)
            }
            None => {
                *state = Some((now, 0));
                Some(1)
            }
        }
    }
}

/// Installs ring as the process-wide rustls provider, before any TLS
/// connection is made (XMPP STARTTLS and `amqps://` both use it).
pub fn install_crypto_provider() {
    // Err means one was already installed, by an earlier call in this process.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn rust_log_keeps_the_noisy_crates_quiet_unless_it_names_them() {
        assert_eq!(with_quiet_crates("info"), "info,tokio_xmpp=off,lapin=off");
        assert_eq!(with_quiet_crates("debug,lapin=debug"), "debug,lapin=debug,tokio_xmpp=off");
    }

    #[test]
    fn one_line_per_interval_with_the_count() {
        let repeated = Repeated::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(repeated.tick_at(start), Some(1), "the first event is logged at once");
        for ms in [10, 200, 900] {
            assert_eq!(repeated.tick_at(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(repeated.tick_at(start + Duration::from_millis(1000)), Some(4), "three held back, and this one");
        assert_eq!(repeated.tick_at(start + Duration::from_millis(1500)), None);
        assert_eq!(repeated.tick_at(start + Duration::from_secs(5)), Some(2));
    }
}
