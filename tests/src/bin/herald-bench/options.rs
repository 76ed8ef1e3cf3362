//! What a run measures and for how long. Every option is also an environment
//! variable; the defaults make a full run take about two minutes
//! (plus building the service binaries if they are not up to date).
//!
//! Each Herald figure that is compared with a ceiling is measured in
//! `rounds` that alternate with the ceiling's own measurement, so that a
//! change in what else the machine is doing hits both sides alike.

use clap::Parser;
use std::time::Duration;

/// Measures Herald against the ceilings of its parts on this machine and
/// prints one markdown table.
#[derive(Debug, Clone, Parser)]
#[command(name = "herald-bench")]
pub struct Options {
    /// Rounds of each ceiling/Herald pair; ratios are the median of the
    /// rounds' ratios.
    #[arg(long, env = "HERALD_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,

    /// How long each confirmed-publish measurement of the broker runs (per round).
    #[arg(long, env = "HERALD_BENCH_PUBLISH_TIME", default_value = "5s", value_parser = humantime::parse_duration)]
    pub publish_time: Duration,

    /// Confirm channels in the wide broker measurement (the headroom row).
    #[arg(long, env = "HERALD_BENCH_WIDE_CHANNELS", default_value_t = 4)]
    pub wide_channels: usize,

    /// Publishes in flight per channel in the wide broker measurement.
    #[arg(long, env = "HERALD_BENCH_WIDE_IN_FLIGHT", default_value_t = 256)]
    pub wide_in_flight: usize,

    /// Messages a direct XMPP client sends for the XMPP ceiling (per round).
    #[arg(long, env = "HERALD_BENCH_XMPP_MESSAGES", default_value_t = 30_000)]
    pub xmpp_messages: usize,

    /// Concurrent HTTP keep-alive connections; also the publishes in flight
    /// on the one channel of the matched broker measurement.
    #[arg(long, env = "HERALD_BENCH_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,

    /// How long the ingress is driven, relay stopped (per round).
    #[arg(long, env = "HERALD_BENCH_INGRESS_TIME", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ingress_time: Duration,

    /// Messages sent as fast as possible through the whole path (per round).
    #[arg(long, env = "HERALD_BENCH_E2E_MESSAGES", default_value_t = 30_000)]
    pub e2e_messages: usize,

    /// Offered rate (messages per second) of the latency measurements
    /// (Herald end to end, and the direct XMPP client's floor).
    #[arg(long, env = "HERALD_BENCH_RATE", default_value_t = 1_000)]
    pub rate: u32,

    /// How long the latency measurement offers that rate.
    #[arg(long, env = "HERALD_BENCH_LATENCY_TIME", default_value = "10s", value_parser = humantime::parse_duration)]
    pub latency_time: Duration,

    /// Size of each message body in bytes.
    #[arg(long, env = "HERALD_BENCH_BODY_BYTES", default_value_t = 200)]
    pub body_bytes: usize,

    /// Stop waiting for messages at the receiver after this long without one.
    #[arg(long, env = "HERALD_BENCH_IDLE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Print the whole-path runs' accepted and delivered rates per 250 ms on
    /// stderr.
    #[arg(long, env = "HERALD_BENCH_TIMELINE")]
    pub timeline: bool,

    /// Alert-storm phase: with the relay stopped, queue this many jobs
    /// through the ingress, then start the relay and drain them (0: off;
    /// e.g. 1000000, several minutes).
    #[arg(long, env = "HERALD_BENCH_BACKLOG", default_value_t = 0)]
    pub backlog: usize,

    /// Alert-storm phase: Alertmanager notifications to this many recipients
    /// each (0: off; e.g. 50).
    #[arg(long, env = "HERALD_BENCH_FANOUT", default_value_t = 0)]
    pub fanout: usize,

    /// Notifications per second in the fan-out phase.
    #[arg(long, env = "HERALD_BENCH_FANOUT_RATE", default_value_t = 100)]
    pub fanout_rate: u32,

    /// How long the fan-out phase posts.
    #[arg(long, env = "HERALD_BENCH_FANOUT_TIME", default_value = "10s", value_parser = humantime::parse_duration)]
    pub fanout_time: Duration,

    /// Alert-storm phase: this many more users, each posting as its own XMPP
    /// account of the relay (0: off; e.g. 1000). Runs last: the services
    /// keep the senders.
    #[arg(long, env = "HERALD_BENCH_SENDERS", default_value_t = 0)]
    pub senders: usize,

    /// Extra environment for herald-ingress, `KEY=VALUE` (repeatable), to
    /// measure other settings.
    #[arg(long = "ingress-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub ingress_env: Vec<(String, String)>,

    /// Extra environment for herald-relay, `KEY=VALUE` (repeatable), e.g.
    /// `HERALD_PREFETCH=1024`.
    #[arg(long = "relay-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub relay_env: Vec<(String, String)>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((key.to_owned(), value.to_owned()))
}
