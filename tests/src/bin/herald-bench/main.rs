//! herald-bench: how close Herald gets to the ceilings of its parts on this
//! machine. A benchmark, not a test: it asserts nothing about time, it
//! measures and prints one markdown table.
//!
//!     cargo run --release -p herald-tests --bin herald-bench
//!
//! 1. Ceilings: confirmed persistent publishes straight to RabbitMQ (lapin,
//!    Herald's topology on a throwaway prefix), and a direct XMPP client with
//!    stream management sending to a receiver through the same Prosody, flat
//!    out and at the fixed rate of 3b (the XMPP path's latency floor, with
//!    and without TCP_NODELAY on the client socket).
//! 2. The real `herald-ingress` binary alone, driven by many keep-alive
//!    connections: 202 Accepted per second, in rounds alternating with 1's
//!    broker ceiling.
//! 3. The whole path (ingress + relay + receiver): messages per second at the
//!    receiver, in rounds alternating with 1's XMPP ceiling; then the latency
//!    from POST to receipt at a fixed offered rate.
//!    Both paced phases (the broker's and the whole path's) watch the local
//!    broker's disk, to tell a late confirm of the broker's from Herald's.
//! 4. Each service's peak resident memory (VmHWM).
//! 5. Replicas: how long after one ingress replica's 202 a second one
//!    knows the job, through the outcomes stream.
//!
//! Options are flags or `HERALD_BENCH_*` variables (`--help`); the broker is
//! `HERALD_TEST_AMQP_URL` or the local one, as for the tests.

mod arrivals;
mod attack;
mod broker_ceiling;
mod broker_disk;
mod floor;
mod herald;
mod http_load;
mod jobs;
mod machine;
mod options;
mod replicas;
mod report;
mod stats;
mod storm;
mod xmpp_ceiling;

use arrivals::{Arrivals, Matched};
use clap::Parser;
use herald::Herald;
use herald_tests::{Broker, Prosody, XmppAccount};
use http_load::{Limit, Outcome, Target};
use machine::{CpuMeter, Watched};
use options::Options;
use report::{Attacked, CpuUse, EndToEnd, Paced, Results};
use stats::Percentiles;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xmpp_ceiling::Socket;

/// Phase 2b: wrong guesses, how many at a time, from how many addresses;
/// and the cached clients' fixed rate meanwhile, for how long.
const ATTACK_GUESSES: usize = 1000;
const ATTACK_CONCURRENCY: usize = 200;
const ATTACK_ADDRESSES: usize = 250;
const ATTACK_RATE: u32 = 200;
const ATTACK_TIME: Duration = Duration::from_secs(5);

/// The accounts on the bench's Prosody.
struct Accounts {
    /// Sends directly, for the XMPP ceiling.
    direct: XmppAccount,
    /// The relay's sender account, also the HTTP user.
    sender: XmppAccount,
    receiver: XmppAccount,
}

#[tokio::main]
async fn main() {
    if std::env::var_os(floor::SERVE_ENV).is_some() {
        return floor::serve().await;
    }
    let options = Options::parse();
    let started = Instant::now();
    let machine = machine::Machine::probe();
    herald_shared::telemetry::install_crypto_provider();
    progress("building the service binaries");
    herald_tests::binaries::bin_dir();
    let build = started.elapsed();

    let mut broker = Broker::connect().await;
    broker.prefix = format!("herald-bench-{}", uuid::Uuid::new_v4().simple());
    let wal_dir = broker_disk::wal_dir();
    let prosody = Arc::new(Prosody::start().await);
    let accounts = Accounts {
        direct: prosody.register("direct"),
        sender: prosody.register("sender"),
        receiver: prosody.register("receiver"),
    };
    let mut arrivals = Arrivals::start(Arc::clone(&prosody), accounts.receiver.clone()).await;
    let mut cpu: Vec<CpuUse> = Vec::new();

    let payload =
        jobs::job(&accounts.sender.jid, &accounts.receiver.jid, jobs::body("ceiling", options.body_bytes)).encode();
    let route = xmpp_ceiling::Route {
        prosody: &prosody,
        sender: &accounts.direct,
        to: &accounts.receiver.jid,
        body_bytes: options.body_bytes,
        idle: options.idle_timeout,
    };
    let mut herald = Herald::configure(&broker, &prosody, &accounts.sender);
    let target = Arc::new(Target {
        http: http_load::client(options.concurrency),
        url: herald.ingress_url(&accounts.receiver.jid),
        users: vec![(herald.http_user.clone(), herald.http_password.clone())],
        body_bytes: options.body_bytes,
    });
    progress("starting herald-ingress");
    herald.start_ingress(&target.http, &options.ingress_env).await;
    warm_up_ingress(&target, options.concurrency).await;

    // 1a and 2, alternating: the broker's ceiling, then the ingress alone
    // (the relay is not running yet, so jobs pile up in the work queue).
    let (mut broker_matched, mut ingress, mut ingress_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
        progress(&format!("1a. broker ceiling, round {round}: 1 channel × {} in flight", options.concurrency));
        broker_matched
            .push(broker_ceiling::measure(&broker.url, &payload, 1, options.concurrency, options.publish_time).await);
        cpu.push(("1a. broker ceiling", meter.stop()));
        let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
        progress(&format!(
            "2. ingress alone, round {round}: {} connections for {:?}",
            options.concurrency, options.ingress_time
        ));
        let services = herald.cpu_meter();
        let load =
            http_load::closed_loop(Arc::clone(&target), options.concurrency, Limit::For(options.ingress_time)).await;
        ingress_cpu.push(services.per_message(load.accepted.len()));
        ingress.push(load);
        cpu.push(("2. ingress alone", meter.stop()));
        let purged = herald.purge_work_queue(&broker).await;
        progress(&format!("2. purged {purged} jobs from the work queue"));
    }
    let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
    let ingress_rate = stats::median(ingress.iter().map(Outcome::rate));
    progress(&format!(
        "2c. HTTP floor: a bare hyper server, {} connections for {:?} at {ingress_rate:.0} req/s",
        options.concurrency, options.ingress_time
    ));
    let http_floor = floor::http(&target, &options, ingress_rate).await;
    cpu.push(("2c. HTTP floor", meter.stop()));
    let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
    progress(&format!(
        "1a. broker headroom: {} channels × {} in flight",
        options.wide_channels, options.wide_in_flight
    ));
    let broker_wide = broker_ceiling::measure(
        &broker.url,
        &payload,
        options.wide_channels,
        options.wide_in_flight,
        options.publish_time,
    )
    .await;
    cpu.push(("1a. broker headroom", meter.stop()));
    let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
    progress(&format!("1c. broker confirm floor: {} publishes/s for {:?}", options.rate, options.latency_time));
    let broker_floor =
        broker_ceiling::paced(&broker.url, &payload, options.rate, options.latency_time, wal_dir.as_deref()).await;
    cpu.push(("1c. broker floor, paced", meter.stop()));

    // 2b. Cached clients posting at a fixed rate while wrong guesses
    // arrive from many addresses.
    let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
    progress(&format!(
        "2b. under attack: {ATTACK_GUESSES} wrong guesses ({ATTACK_CONCURRENCY} at a time, {ATTACK_ADDRESSES} addresses) \
         while cached clients post at {ATTACK_RATE}/s"
    ));
    let attack =
        tokio::spawn(attack::guesses(target.url.clone(), ATTACK_GUESSES, ATTACK_CONCURRENCY, ATTACK_ADDRESSES));
    let load = http_load::open_loop(Arc::clone(&target), ATTACK_RATE, ATTACK_TIME).await;
    let guesses = attack.await.expect("the attack task");
    let attacked = Attacked { load, guesses, rss_ingress_kib: herald.ingress_pid().and_then(machine::peak_rss_kib) };
    cpu.push(("2b. under attack", meter.stop()));
    herald.purge_work_queue(&broker).await;

    progress("starting herald-relay");
    herald.start_relay(&target.http, &options.relay_env).await;
    warm_up_path(&target, &mut arrivals).await;

    // 1b and 3a, alternating: a direct XMPP client flat out, then the whole
    // path flat out (the relay's session is idle while the direct client runs).
    let (mut xmpp, mut e2e, mut herald_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
        progress(&format!("1b. XMPP ceiling, round {round}: {} messages from a direct client", options.xmpp_messages));
        xmpp.push(xmpp_ceiling::flat_out(&route, &mut arrivals, options.xmpp_messages).await);
        cpu.push(("1b. XMPP ceiling", meter.stop()));
        let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
        progress(&format!("3a. whole path, round {round}: {} messages as fast as possible", options.e2e_messages));
        let services = herald.cpu_meter();
        let run = end_to_end(&target, &mut arrivals, &options).await;
        herald_cpu.push(services.per_message(run.delivered));
        e2e.push(run);
        cpu.push(("3a. whole path, flat out", meter.stop()));
    }

    let mut xmpp_floor = Vec::new();
    for socket in [Socket::AsRelay, Socket::NoDelay] {
        let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
        progress(&format!(
            "1b. XMPP latency floor: {} msg/s for {:?}, {}",
            options.rate,
            options.latency_time,
            socket.describe()
        ));
        xmpp_floor.push(xmpp_ceiling::paced(&route, &mut arrivals, options.rate, options.latency_time, socket).await);
        cpu.push((
            if socket == Socket::AsRelay { "1b. XMPP floor, paced" } else { "1b. XMPP floor, paced, NODELAY" },
            meter.stop(),
        ));
    }
    let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
    progress(&format!("3b. whole path: {} msg/s for {:?}", options.rate, options.latency_time));
    let paced = paced(&target, &mut arrivals, &options, wal_dir.as_deref()).await;
    cpu.push(("3b. whole path, paced", meter.stop()));

    progress(&format!("5. replicas: {} jobs, each followed until a second ingress knows it", replicas::SAMPLES));
    let propagation = replicas::propagation(&herald, &target).await;

    let rss_ingress_kib = herald.ingress_pid().and_then(machine::peak_rss_kib);
    let rss_relay_kib = herald.relay_pid().and_then(machine::peak_rss_kib);

    // The alert-storm phases, when asked for.
    let fanout = if options.fanout > 0 {
        let meter = CpuMeter::start(watched(&prosody, Some(&herald)));
        let ingress_port = herald.env.ingress_port;
        let result = storm::fanout(
            &prosody,
            &target,
            ingress_port,
            options.fanout,
            options.fanout_rate,
            options.fanout_time,
            options.idle_timeout,
        )
        .await;
        cpu.push(("4. fan-out", meter.stop()));
        Some(result)
    } else {
        None
    };
    let backlog = if options.backlog > 0 {
        let result = storm::backlog(&prosody, &mut herald, &target, &mut arrivals, &options).await;
        cpu.push(result.cpu.clone());
        Some(result)
    } else {
        None
    };
    let senders = if options.senders > 0 {
        let result = storm::senders(&route, &mut herald, &target, &mut arrivals, &options).await;
        cpu.push(result.cpu.clone());
        cpu.push(result.direct_cpu.clone());
        cpu.push(result.one_in_flight_cpu.clone());
        Some(result)
    } else {
        None
    };
    progress(&format!(
        "stopping; service logs in {} (kept with HERALD_TEST_KEEP=1)",
        herald.log("").parent().map(|p| p.display().to_string()).unwrap_or_default()
    ));
    herald.stop(&broker).await;
    drop(arrivals);
    drop(prosody);

    report::print(&Results {
        machine,
        options,
        broker_matched,
        broker_wide,
        broker_floor,
        xmpp,
        xmpp_floor,
        ingress,
        ingress_cpu,
        http_floor,
        attacked,
        e2e,
        herald_cpu,
        paced,
        fanout,
        backlog,
        senders,
        propagation,
        rss_ingress_kib,
        rss_relay_kib,
        cpu,
        wall: started.elapsed(),
        build,
    });
}

fn progress(what: &str) {
    eprintln!("herald-bench: {what}");
}

/// The processes whose CPU use is reported.
fn watched(prosody: &Prosody, herald: Option<&Herald>) -> Vec<Watched> {
    let prosody_dir = prosody.log_path().parent().map(|d| d.display().to_string()).unwrap_or_default();
    let service = |pid: Option<u32>| pid.into_iter().collect::<Vec<_>>();
    vec![
        Watched { name: "bench (load + receiver)", pids: vec![std::process::id()] },
        Watched { name: "herald-ingress", pids: service(herald.and_then(Herald::ingress_pid)) },
        Watched { name: "herald-relay", pids: service(herald.and_then(Herald::relay_pid)) },
        Watched { name: machine::SERVER, pids: machine::pids_matching(&prosody_dir) },
        Watched { name: "rabbitmq", pids: machine::pids_matching("beam.smp") },
    ]
}

/// One request (the password check is cached after it), then one untimed
/// round on every connection, so that the timed run starts warm.
async fn warm_up_ingress(target: &Arc<Target>, concurrency: usize) {
    target.post("warm-up").await.expect("the ingress accepts a message");
    http_load::closed_loop(Arc::clone(target), concurrency, Limit::Messages(concurrency * 4)).await;
}

/// One message through the whole path before anything is timed.
async fn warm_up_path(target: &Target, arrivals: &mut Arrivals) {
    let id = target.post("warm-up").await.expect("the ingress accepts a message");
    let matched = arrivals.wait_for(&[id].into_iter().collect(), Duration::from_secs(30)).await;
    assert_eq!(matched.arrived.len(), 1, "a warm-up message crosses the whole path");
}

async fn end_to_end(target: &Arc<Target>, arrivals: &mut Arrivals, options: &Options) -> EndToEnd {
    arrivals.clear();
    let load =
        http_load::closed_loop(Arc::clone(target), options.concurrency, Limit::Messages(options.e2e_messages)).await;
    let matched = arrivals.wait_for(&load.ids(), options.idle_timeout).await;
    let first = load.first_sent.expect("the load ran");
    let last = matched.last().unwrap_or(first);
    let last_answer = load.accepted.iter().map(|a| a.answered).max().unwrap_or(first);
    if options.timeline {
        print_timeline(first, &load, &matched);
    }
    EndToEnd {
        delivered: matched.arrived.len(),
        duplicates: matched.duplicates,
        elapsed: last.duration_since(first),
        drained: matched.arrived.values().filter(|at| **at > last_answer).count(),
        drain_elapsed: last.saturating_duration_since(last_answer),
        load,
    }
}

async fn paced(target: &Arc<Target>, arrivals: &mut Arrivals, options: &Options, wal_dir: Option<&Path>) -> Paced {
    arrivals.clear();
    let disk = broker_disk::Watch::start(wal_dir);
    let load = http_load::open_loop(Arc::clone(target), options.rate, options.latency_time).await;
    let disk = disk.stop();
    let matched = arrivals.wait_for(&load.ids(), options.idle_timeout).await;
    let latencies = load
        .accepted
        .iter()
        .filter_map(|a| matched.arrived.get(&a.id).map(|at| at.duration_since(a.scheduled)))
        .collect();
    Paced {
        delivered: matched.arrived.len(),
        duplicates: matched.duplicates,
        latency: Percentiles::of(latencies),
        send_lag: Percentiles::of(load.accepted.iter().map(|a| a.sent.duration_since(a.scheduled)).collect()),
        answer: Percentiles::of(load.answer_latencies()),
        achieved_rate: send_rate(&load),
        load,
        disk,
    }
}

/// Accepted and delivered messages per second, in 250 ms slots from the first
/// POST, on stderr: shows how delivery shares the machine with the posting.
fn print_timeline(first: Instant, load: &Outcome, matched: &Matched) {
    const SLOT_MS: u128 = 250;
    let slot = |at: Instant| (at.duration_since(first).as_millis() / SLOT_MS) as usize;
    let slots = matched.last().map_or(0, |last| slot(last) + 1);
    let mut accepted = vec![0usize; slots];
    let mut delivered = vec![0usize; slots];
    for a in &load.accepted {
        if let Some(n) = accepted.get_mut(slot(a.answered)) {
            *n += 1;
        }
    }
    for at in matched.arrived.values() {
        if let Some(n) = delivered.get_mut(slot(*at)) {
            *n += 1;
        }
    }
    let per_second = 1000 / SLOT_MS as usize;
    for (i, (a, d)) in accepted.iter().zip(&delivered).enumerate() {
        eprintln!(
            "timeline {:>6} ms: accepted {:>6}/s, delivered {:>6}/s",
            i * SLOT_MS as usize,
            a * per_second,
            d * per_second
        );
    }
}

/// Sends per second between the first and the last actual send.
fn send_rate(load: &Outcome) -> f64 {
    let sends = load.accepted.iter().map(|a| a.sent);
    match (sends.clone().min(), sends.max()) {
        (Some(first), Some(last)) if last > first => stats::rate(load.accepted.len() - 1, last - first),
        _ => 0.0,
    }
}
