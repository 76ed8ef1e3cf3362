//! Everything XMPP: the accounts the relay sends from, logging in, one
//! session task per account (opened at start or on first use), the rooms it joins and the stanzas it builds.
//! Nothing here knows about the broker.

pub mod accounts;
mod connect;
pub mod login;
mod rooms;
pub mod session;
mod sessions;
pub mod stanza;

pub use accounts::Account;
pub use session::{Bounce, SessionHandle, SessionSettings};
pub use sessions::Sessions;
