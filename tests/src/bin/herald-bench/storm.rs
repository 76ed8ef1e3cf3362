//! Alert-storm phases, behind flags because they take minutes:
//!
//! - **backlog** (`--backlog N`): the relay stopped while N jobs are posted
//!   through the ingress (its rate measured in segments as the queue grows,
//!   the broker's memory and alarms after each), then the relay started and
//!   the backlog drained to the receiver.
//! - **fan-out** (`--fanout R`): Alertmanager notifications, each to R
//!   recipients, at a fixed rate: stanzas per second delivered, and the time
//!   from each POST to its last recipient's receipt.
//! - **senders** (`--senders N`): N more users posting as N XMPP accounts of
//!   the relay: the relay's start-up, its sessions and memory, each sender's
//!   first message, and the whole path's rate with all of them in turn.

use crate::arrivals::Arrivals;
use crate::herald::Herald;
use crate::http_load::{self, Limit, Target};
use crate::options::Options;
use crate::stats::Percentiles;
use crate::xmpp_ceiling::{self, Direct, Route, Turns};
use herald_tests::broker::eval;
use herald_tests::{Prosody, XmppAccount};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One stretch of the backlog's filling.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Jobs queued at the end of the segment.
    pub queued: usize,
    /// 202s per second in the segment.
    pub rate: f64,
    pub refused: usize,
    pub broker: BrokerMemory,
}

/// The local broker's memory, read with rabbitmqctl (None if it cannot be).
#[derive(Debug, Clone, Default)]
pub struct BrokerMemory {
    /// Erlang's total allocated memory, bytes.
    pub total: Option<u64>,
    /// The memory high watermark, bytes.
    pub limit: Option<u64>,
    /// The broker's resource alarms, as it prints them (`[]`: none).
    pub alarms: Option<String>,
}

impl BrokerMemory {
    pub fn read() -> Self {
        let number = |expr: &str| eval(expr).and_then(|s| s.trim().parse::<u64>().ok());
        Self {
            total: number("erlang:memory(total)."),
            limit: number("vm_memory_monitor:get_memory_limit()."),
            alarms: eval("rabbit_alarm:get_alarms().").map(|s| s.trim().to_owned()),
        }
    }

    pub fn describe(&self) -> String {
        let mib = |b: Option<u64>| b.map_or_else(|| "n/a".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0));
        format!(
            "broker memory {} of a {} watermark, alarms {}",
            mib(self.total),
            mib(self.limit),
            self.alarms.as_deref().unwrap_or("n/a")
        )
    }
}

#[derive(Debug)]
pub struct Backlog {
    pub segments: Vec<Segment>,
    pub accepted: usize,
    /// From the relay's start to the last receipt.
    pub drain_elapsed: Duration,
    pub delivered: usize,
    pub duplicates: usize,
    /// The relay's `herald_redelivered_total` at the end.
    pub redelivered: Option<f64>,
    /// The relay's VmHWM after the drain (it was started for it).
    pub relay_peak_rss_kib: Option<u64>,
    /// The broker after the drain.
    pub broker_after: BrokerMemory,
    /// CPU use from the relay's readiness to the last receipt.
    pub cpu: crate::report::CpuUse,
    /// The relay's CPU (it was started for the drain) per delivered job,
    /// seconds.
    pub relay_cpu: f64,
}

impl Backlog {
    pub fn drain_rate(&self) -> f64 {
        crate::stats::rate(self.delivered, self.drain_elapsed)
    }
}

/// Stops the relay, posts `--backlog` jobs in segments (a tenth, up to half, up to
/// all), starts the relay and waits for every accepted job at the receiver.
pub async fn backlog(
    prosody: &Prosody,
    herald: &mut Herald,
    target: &Arc<Target>,
    arrivals: &mut Arrivals,
    options: &Options,
) -> Backlog {
    let (jobs, concurrency, relay_env, idle) =
        (options.backlog, options.concurrency, &options.relay_env, options.idle_timeout);
    herald.stop_relay().await;
    arrivals.clear();
    let marks = [jobs / 10, jobs / 2, jobs];
    let mut ids = HashSet::with_capacity(jobs);
    let mut segments = Vec::new();
    let mut queued = 0;
    for mark in marks {
        if mark <= queued {
            continue;
        }
        crate::progress(&format!("backlog: posting jobs {}..{mark} with the relay stopped", queued + 1));
        let load = http_load::closed_loop(Arc::clone(target), concurrency, Limit::Messages(mark - queued)).await;
        queued += load.accepted.len();
        ids.extend(load.ids());
        segments.push(Segment { queued, rate: load.rate(), refused: load.refused, broker: BrokerMemory::read() });
        crate::progress(&format!(
            "backlog: {queued} queued; {}",
            segments.last().map(|s| s.broker.describe()).unwrap_or_default()
        ));
    }
    crate::progress(&format!("backlog: starting the relay to drain {} jobs", ids.len()));
    let started = Instant::now();
    herald.start_relay(&target.http, relay_env).await;
    let meter = crate::machine::CpuMeter::start(crate::watched(prosody, Some(herald)));
    let matched = arrivals.wait_for(&ids, idle).await;
    let last = matched.last().unwrap_or(started);
    let cpu = ("5. backlog drain", meter.stop());
    let relay_cpu =
        herald.relay_pid().map_or(0.0, |pid| crate::machine::cpu_seconds(&[pid])) / matched.arrived.len().max(1) as f64;
    let metrics = herald.relay_metrics(&target.http).await;
    Backlog {
        segments,
        accepted: ids.len(),
        drain_elapsed: last.saturating_duration_since(started),
        delivered: matched.arrived.len(),
        duplicates: matched.duplicates,
        redelivered: metrics.as_deref().and_then(|m| herald_tests::admin::sample(m, "herald_redelivered_total")),
        relay_peak_rss_kib: herald.relay_pid().and_then(crate::machine::peak_rss_kib),
        broker_after: BrokerMemory::read(),
        cpu,
        relay_cpu,
    }
}

#[derive(Debug)]
pub struct Fanout {
    pub recipients: usize,
    pub rate: u32,
    pub notifications: usize,
    pub accepted: usize,
    pub refused: usize,
    pub stanzas: usize,
    pub delivered: usize,
    pub duplicates: usize,
    /// First scheduled POST to the last receipt.
    pub elapsed: Duration,
    /// Scheduled POST → the last of its recipients' receipts, per notification
    /// whose recipients all got it.
    pub last_receipt: Option<Percentiles>,
}

impl Fanout {
    pub fn stanza_rate(&self) -> f64 {
        crate::stats::rate(self.delivered, self.elapsed)
    }
}

/// Registers `recipients` accounts, logs them all in, then posts the
/// recorded Alertmanager notification to all of them `rate` times a second
/// for `duration`.
pub async fn fanout(
    prosody: &Arc<Prosody>,
    target: &Arc<Target>,
    ingress_port: u16,
    recipients: usize,
    rate: u32,
    duration: Duration,
    idle: Duration,
) -> Fanout {
    crate::progress(&format!("fan-out: registering and logging in {recipients} recipients"));
    let accounts: Vec<XmppAccount> = (0..recipients).map(|i| prosody.register(&format!("rota{i}"))).collect();
    let mut arrivals = Arrivals::start_many(Arc::clone(prosody), accounts.clone()).await;
    let query: Vec<String> = accounts.iter().map(|a| format!("to={}", a.jid)).collect();
    let url = format!("http://127.0.0.1:{ingress_port}/alertmanager?{}", query.join("&"));
    let body = include_str!("../../../fixtures/alertmanager-firing.json");
    let count = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
    let period = Duration::from_secs(1) / rate.max(1);
    crate::progress(&format!("fan-out: {count} notifications × {recipients} recipients at {rate}/s"));
    let first = Instant::now() + Duration::from_millis(50);
    let mut posts = Vec::with_capacity(count);
    // The ingress keys a notification by its group: the same recorded
    // payload again would get the first one's jobs back. Alertmanager sends
    // a new notification per change; a key per post stands for that.
    let run = uuid::Uuid::new_v4().simple();
    let (user, password) = target.user();
    for i in 0..count {
        let scheduled = first + period * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let request = target
            .http
            .post(&url)
            .basic_auth(user, Some(password))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("bench-fanout-{run}-{i}"))
            .body(body)
            .send();
        posts.push(tokio::spawn(async move { (scheduled, job_ids(request.await).await) }));
    }
    let mut sent: Vec<(Instant, Vec<String>)> = Vec::with_capacity(count);
    let mut refused = 0;
    for post in posts {
        match post.await.expect("post task") {
            (scheduled, Some(ids)) => sent.push((scheduled, ids)),
            (_, None) => refused += 1,
        }
    }
    let ids: HashSet<String> = sent.iter().flat_map(|(_, ids)| ids.iter().cloned()).collect();
    let matched = arrivals.wait_for(&ids, idle).await;
    let last_receipt = sent
        .iter()
        .filter_map(|(scheduled, ids)| {
            let arrivals: Option<Vec<Instant>> = ids.iter().map(|id| matched.arrived.get(id).copied()).collect();
            Some(arrivals?.into_iter().max()?.duration_since(*scheduled))
        })
        .collect();
    Fanout {
        recipients,
        rate,
        notifications: count,
        accepted: sent.len(),
        refused,
        stanzas: ids.len(),
        delivered: matched.arrived.len(),
        duplicates: matched.duplicates,
        elapsed: matched.last().map_or(Duration::ZERO, |last| last.saturating_duration_since(first)),
        last_receipt: Percentiles::of(last_receipt),
    }
}

/// Posts an empty body as each of the target's users: the ingress checks
/// (and caches) the password, then refuses the body. So the first messages
/// that follow time the relay, not argon2. A 503 (the password checks
/// busy, as on a machine shared with a build) is retried after its
/// `Retry-After`, as a client would, for a minute at most.
async fn check_passwords(target: &Target, concurrency: usize) {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let statuses: Vec<u16> = futures::stream::iter(&target.users)
        .map(|(user, password)| async move {
            loop {
                let response = target
                    .http
                    .post(&target.url)
                    .basic_auth(user, Some(password))
                    .header("content-type", "text/plain")
                    .send()
                    .await;
                let Ok(response) = response else { return 0 };
                if response.status() != 503 || tokio::time::Instant::now() >= deadline {
                    return response.status().as_u16();
                }
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(retry_after.min(5))).await;
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let refused = statuses.iter().filter(|s| !(400..500).contains(*s) || **s == 401).count();
    assert_eq!(refused, 0, "an empty post is refused after the password check (4xx, not 401)");
}

/// The job ids of a 202, None for anything else.
async fn job_ids(response: reqwest::Result<reqwest::Response>) -> Option<Vec<String>> {
    let response = response.ok().filter(|r| r.status() == 202)?;
    let body: serde_json::Value = response.json().await.ok()?;
    body["jobs"].as_array()?.iter().map(|job| job["id"].as_str().map(str::to_owned)).collect()
}

/// Senders a second whose first message is posted: each one alone, so that
/// its latency is the first message's own (with `HERALD_SESSION_IDLE`, the
/// session's login), not a queue's.
pub const FIRST_MESSAGE_RATE: u32 = 100;

/// How long a relay with many sender accounts may take to be ready.
const SENDERS_READY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct Senders {
    pub senders: usize,
    /// Registering the accounts on the bench's Prosody.
    pub registered_in: Duration,
    /// From spawning the relay to its `/readyz` answering 200.
    pub relay_ready_in: Duration,
    /// `herald_sessions_online` when the relay became ready, and after the run.
    pub sessions_at_ready: Option<f64>,
    pub sessions_after: Option<f64>,
    /// The relay's resident set when ready, and its peak after the run (KiB).
    pub relay_rss_at_ready_kib: Option<u64>,
    pub relay_peak_rss_kib: Option<u64>,
    /// Each sender's first message, `FIRST_MESSAGE_RATE` a second: scheduled
    /// POST → receipt.
    pub first_message: Option<Percentiles>,
    /// The measured run: every sender in turn, as fast as possible.
    pub accepted: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub elapsed: Duration,
    /// 202s per second in the measured run, and POST → 202.
    pub posts_rate: f64,
    pub answer: Option<Percentiles>,
    /// CPU use during the measured run.
    pub cpu: crate::report::CpuUse,
    /// Herald's CPU (ingress + relay) per delivered message in the measured
    /// run, seconds.
    pub herald_cpu: f64,
    /// The same messages sent straight to the XMPP server by a direct client
    /// per sender, queued in turn (its ceiling for many senders, each
    /// client writing its messages together), and the CPU use meanwhile.
    pub direct: Direct,
    pub direct_cpu: crate::report::CpuUse,
    /// The same with one message in flight per client (every stanza alone
    /// on its connection, as with one job per sender in the relay), and the
    /// CPU use meanwhile.
    pub one_in_flight: Direct,
    pub one_in_flight_cpu: crate::report::CpuUse,
}

impl Senders {
    pub fn rate(&self) -> f64 {
        crate::stats::rate(self.delivered, self.elapsed)
    }
}

/// Registers `--senders` accounts, restarts the ingress and the relay with a
/// user and a sender account for each, times the relay's start, sends each
/// sender's first message, then `--e2e-messages` messages from all of them in
/// turn, and the same number from a direct client per sender (the XMPP
/// server's own ceilings for many senders: queued in turn, and one in
/// flight each). Leaves the services running with the senders configured.
pub async fn senders(
    route: &Route<'_>,
    herald: &mut Herald,
    target: &Target,
    arrivals: &mut Arrivals,
    options: &Options,
) -> Senders {
    let prosody = route.prosody;
    let (senders, messages, concurrency, idle) =
        (options.senders, options.e2e_messages, options.concurrency, options.idle_timeout);
    crate::progress(&format!("senders: registering {senders} XMPP accounts"));
    let started = Instant::now();
    let accounts: Vec<XmppAccount> = (0..senders).map(|i| prosody.register(&format!("s{i}"))).collect();
    let registered_in = started.elapsed();
    let password = format!("bench-{}", uuid::Uuid::new_v4().simple());
    herald.add_senders(prosody, &accounts, &password);
    herald.stop_relay().await;
    herald.stop_ingress().await;
    herald.start_ingress(&target.http, &options.ingress_env).await;
    crate::progress(&format!("senders: starting the relay with {} accounts", senders + 1));
    let started = Instant::now();
    herald.start_relay_within(&target.http, &options.relay_env, SENDERS_READY_TIMEOUT).await;
    let relay_ready_in = started.elapsed();
    let sessions = |metrics: Option<String>| {
        metrics.as_deref().and_then(|m| herald_tests::admin::sample(m, "herald_sessions_online"))
    };
    let sessions_at_ready = sessions(herald.relay_metrics(&target.http).await);
    let relay_rss_at_ready_kib = herald.relay_pid().and_then(crate::machine::rss_kib);

    let target = Arc::new(Target {
        http: target.http.clone(),
        url: target.url.clone(),
        users: accounts.iter().map(|a| (a.jid.clone(), password.clone())).collect(),
        body_bytes: target.body_bytes,
    });
    crate::progress(&format!("senders: each user's password checked once ({senders} empty posts)"));
    check_passwords(&target, concurrency).await;
    crate::progress(&format!("senders: each sender's first message, {FIRST_MESSAGE_RATE} senders a second"));
    arrivals.clear();
    let spread = Duration::from_secs_f64(senders as f64 / f64::from(FIRST_MESSAGE_RATE));
    let first = http_load::open_loop(Arc::clone(&target), FIRST_MESSAGE_RATE, spread).await;
    let matched = arrivals.wait_for(&first.ids(), idle).await;
    let first_message = Percentiles::of(
        first
            .accepted
            .iter()
            .filter_map(|a| matched.arrived.get(&a.id).map(|at| at.duration_since(a.scheduled)))
            .collect(),
    );

    crate::progress(&format!("senders: {messages} messages from {senders} senders in turn"));
    arrivals.clear();
    let meter = crate::machine::CpuMeter::start(crate::watched(prosody, Some(herald)));
    let services = herald.cpu_meter();
    let load = http_load::closed_loop(Arc::clone(&target), concurrency, Limit::Messages(messages)).await;
    let matched = arrivals.wait_for(&load.ids(), idle).await;
    let herald_cpu = services.per_message(matched.arrived.len());
    let cpu = ("4. senders, whole path", meter.stop());
    let begin = load.first_sent.expect("the load ran");
    let sessions_after = sessions(herald.relay_metrics(&target.http).await);
    let relay_peak_rss_kib = herald.relay_pid().and_then(crate::machine::peak_rss_kib);

    crate::progress(&format!("senders: logging in {senders} direct clients"));
    let mut streams = xmpp_ceiling::log_in_all(route, &accounts).await;
    crate::progress(&format!(
        "senders: XMPP ceiling, {messages} messages from {senders} direct clients in turn, queued"
    ));
    let meter = crate::machine::CpuMeter::start(crate::watched(prosody, Some(herald)));
    let direct = xmpp_ceiling::many_senders(route, &accounts, &mut streams, Turns::Queued, arrivals, messages).await;
    let direct_cpu = ("1b. XMPP ceiling, senders in turn, queued", meter.stop());
    crate::progress(&format!(
        "senders: XMPP ceiling, {messages} messages from {senders} direct clients, one in flight each"
    ));
    let meter = crate::machine::CpuMeter::start(crate::watched(prosody, Some(herald)));
    let one_in_flight =
        xmpp_ceiling::many_senders(route, &accounts, &mut streams, Turns::OneInFlight, arrivals, messages).await;
    let one_in_flight_cpu = ("1b. XMPP ceiling, senders one in flight each", meter.stop());
    xmpp_ceiling::close_all(streams).await;
    Senders {
        senders,
        registered_in,
        relay_ready_in,
        sessions_at_ready,
        sessions_after,
        relay_rss_at_ready_kib,
        relay_peak_rss_kib,
        first_message,
        accepted: load.accepted.len(),
        delivered: matched.arrived.len(),
        duplicates: matched.duplicates,
        elapsed: matched.last().map_or(Duration::ZERO, |last| last.saturating_duration_since(begin)),
        posts_rate: load.rate(),
        answer: Percentiles::of(load.answer_latencies()),
        cpu,
        herald_cpu,
        direct,
        direct_cpu,
        one_in_flight,
        one_in_flight_cpu,
    }
}
