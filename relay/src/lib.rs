//! herald-relay: consumes jobs from RabbitMQ and delivers them over XMPP
//! client sessions, acking a job only once the XMPP server acknowledged its
//! stanza.

pub mod accounts;
pub mod acks;
pub mod app;
pub mod config;
pub mod consumer;
pub mod dead;
pub mod error;
pub mod login;
pub mod metrics;
pub mod recent;
pub mod retry;
pub mod seen;
pub mod session;
pub mod stanza;

pub use app::Application;
pub use error::{DeliveryError, Error};
