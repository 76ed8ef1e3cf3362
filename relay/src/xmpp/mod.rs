//! Everything XMPP: the accounts the relay sends from, logging in, one
//! session task per account, the rooms it joins and the stanzas it builds.
//! Nothing here knows about the broker.

pub mod accounts;
pub mod login;
mod rooms;
pub mod session;
pub mod stanza;

pub use accounts::Account;
pub use session::{Bounce, SessionHandle, SessionSettings};
