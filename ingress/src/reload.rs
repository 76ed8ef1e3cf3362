//! Reloading the users file without a restart: on SIGHUP, and whenever its
//! contents change (read every `HERALD_USERS_RELOAD_INTERVAL`, since a
//! Kubernetes Secret volume is updated in place and nobody sends a signal).
//! A file that does not parse is refused with one error line and the last
//! good one stays in force.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    auth::Authenticator,
    metrics::{Metrics, ReloadLabels},
    users::Users,
};

#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    /// The contents last seen (loaded, or refused).
    seen: String,
    /// `None`: only on SIGHUP.
    every: Option<Duration>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    /// For the file `auth` was loaded from just now; `every` zero: only on
    /// SIGHUP.
    pub fn new(path: PathBuf, every: Duration, auth: Arc<Authenticator>, metrics: Arc<Metrics>) -> Self {
        let seen = std::fs::read_to_string(&path).unwrap_or_default();
        Self { path, seen, every: (!every.is_zero()).then_some(every), auth, metrics }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut hangups = hangups();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = next(&mut hangups) => self.reload(true),
                () = tick(self.every) => self.reload(false),
            }
        }
    }

    /// Reads the file and puts it in place if it changed (or, on SIGHUP,
    /// even if it did not).
    fn reload(&mut self, asked: bool) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                if asked {
                    tracing::error!(file = %self.path.display(), error = %e, "cannot read the users file; the last one loaded stays in force");
                }
                return;
            }
        };
        if text == self.seen && !asked {
            return;
        }
        let outcome = match Users::parse(&text) {
            Ok(users) => {
                tracing::info!(file = %self.path.display(), users = users.len(), tokens = users.tokens(), "users file reloaded");
                self.auth.replace_users(users);
                "ok"
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "the users file does not parse; the last one loaded stays in force");
                "failed"
            }
        };
        self.metrics.users_reloads.get_or_create(&ReloadLabels { outcome }).inc();
        self.seen = text;
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangups() -> Hangups {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangups() -> Hangups {}

/// The next SIGHUP; never, where there are none.
async fn next(hangups: &mut Hangups) {
    #[cfg(unix)]
    if let Some(signal) = hangups {
        signal.recv().await;
        return;
    }
    let _ = hangups;
    std::future::pending::<()>().await;
}

async fn tick(every: Option<Duration>) {
    match every {
        Some(every) => tokio::time::sleep(every).await,
        None => std::future::pending().await,
    }
}
