//! What the ingress and the relay must agree on: the job schema, the
//! validated domain types it is built from, the AMQP topology, and the
//! process plumbing (telemetry, shutdown, TLS provider) both binaries share.

pub mod admin;
pub mod amqp;
pub mod domain;
pub mod job;
pub mod outcomes;
pub mod recently;
pub mod shutdown;
pub mod telemetry;
pub mod topology;

pub use domain::{Body, MessageKind, Recipient, Sender, ValidationError};
pub use job::{Job, JobDecodeError, JobV1};
pub use topology::Topology;
