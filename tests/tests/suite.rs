//! The integration tests, one module per concern, linked into one binary
//! (each file here used to be its own binary; linking thirteen copies of the
//! dependency tree cost minutes and gigabytes). `cargo nextest` still runs
//! every test in its own process.

use std::time::Duration;

/// How long a message may take to arrive at its recipient before a test
/// fails (a deadline for polling, never a sleep).
const ARRIVAL: Duration = Duration::from_secs(20);
/// Recorded notifications, as Alertmanager and Grafana send them.
const ALERTMANAGER: &str = include_str!("../fixtures/alertmanager-firing.json");
const GRAFANA: &str = include_str!("../fixtures/grafana-firing.json");

mod acks;
mod alerting;
mod bench;
mod binaries;
mod cluster;
mod containers;
mod e2e;
mod ejabberd;
mod failures;
mod front_door;
mod hostile;
mod idempotency;
mod job_status;
mod operations;
mod policy;
mod properties;
mod recipients;
mod rooms;
mod settlement;
mod tls;
mod tokens;
