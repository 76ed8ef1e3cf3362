//! The test harness: real RabbitMQ, a private Prosody, and Herald's services
//! on free ports, with per-test queue prefixes and fresh XMPP accounts.
//! RabbitMQ and Prosody are the local ones by default, or containers with
//! `HERALD_TEST_BACKEND=containers` (see `containers`).
//!
//! Nothing here sleeps for a fixed time: everything polls with a deadline.

pub mod admin;
pub mod binaries;
pub mod blocker;
pub mod broker;
pub mod cluster;
pub mod containers;
pub mod ejabberd;
pub mod fixture;
pub mod load;
pub mod poll;
pub mod prosody;
pub mod proxy;
pub mod receiver;
pub mod stack;

/// `HERALD_TEST_KEEP=1`: keep the temporary directories (Prosody's config
/// and log, the services' logs of the fault tests and the bench) for a
/// post-mortem.
pub fn keep_files() -> bool {
    std::env::var_os("HERALD_TEST_KEEP").is_some()
}

pub use broker::Broker;
pub use prosody::{Prosody, XmppAccount};
pub use receiver::Receiver;
pub use stack::{Stack, StackOptions};
