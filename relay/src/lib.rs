//! herald-relay: consumes jobs from RabbitMQ and delivers them over XMPP
//! client sessions, acking a job only once the XMPP server acknowledged its
//! stanza.
//!
//! A job's way reads top to bottom, every import pointing down:
//! `broker` (the only code that speaks AMQP: consume, settle, ack, `dead`)
//! → `delivery` (a job in, a `Settlement` out: duplicates, retry policy,
//! bounces) → `xmpp` (accounts, login, one session task per account,
//! rooms, stanzas).

pub mod allocator;
pub mod app;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod error;
pub mod metrics;
pub mod xmpp;

pub use app::Application;
pub use error::{DeliveryError, Error};
