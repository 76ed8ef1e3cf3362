//! The integration tests, one module per concern, linked into one binary
//! (each file here used to be its own binary; linking thirteen copies of the
//! dependency tree cost minutes and gigabytes). `cargo nextest` still runs
//! every test in its own process.

mod alerting;
mod bench;
mod binaries;
mod e2e;
mod failures;
mod hostile;
mod idempotency;
mod operations;
mod policy;
mod properties;
mod recipients;
mod rooms;
mod tls;
