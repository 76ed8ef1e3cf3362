//! What the machine is, and what processes on it use, from `/proc`.

use std::time::Instant;

/// The hardware the figures were taken on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub ram_mib: u64,
    /// `/proc/loadavg` when the run started: other work on the machine.
    pub load_at_start: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            ram_mib: field(&meminfo, "MemTotal").and_then(|v| kib(&v)).map_or(0, |k| k / 1024),
            load_at_start: loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        }
    }
}

/// The value of the first `name: value` line.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == name)
        .map(|(_, value)| value.trim().to_owned())
}

/// "123456 kB" → 123456.
fn kib(value: &str) -> Option<u64> {
    value.split_whitespace().next()?.parse().ok()
}

pub use herald_tests::binaries::{peak_rss_kib, rss_kib};

/// User plus system CPU time of some processes so far, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| cpu_ticks(*pid)).sum::<u64>() as f64 / clock_ticks_per_second()
}

/// User plus system CPU time so far of this process's threads named `name`,
/// in seconds.
pub fn own_threads_cpu_seconds(name: &str) -> f64 {
    let ticks: u64 = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name))
        .filter_map(|task| stat_ticks(&task.path().join("stat")))
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// User plus system CPU time of a process, all threads, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    stat_ticks(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// User plus system CPU time in a `stat` file of `/proc`, in clock ticks.
fn stat_ticks(path: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Processes whose command line contains `needle`, or whose name is `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.trim() == needle || String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

/// A named group of processes whose CPU use is measured together.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: &'static str,
    pub pids: Vec<u32>,
}

/// CPU use of some processes over one phase, in percent of one core.
/// The whole machine's busy time is reported too, and what of it the
/// watched processes do not account for (other work on the machine).
#[derive(Debug)]
pub struct CpuMeter {
    watched: Vec<Watched>,
    start_ticks: Vec<u64>,
    /// Run-queue wait of the XMPP server so far (see `stop`).
    start_server_wait: u64,
    start_machine: u64,
    started: Instant,
}

impl CpuMeter {
    pub fn start(watched: Vec<Watched>) -> Self {
        let start_ticks = watched.iter().map(total_ticks).collect();
        let start_server_wait = server_wait_ns(&watched);
        Self { watched, start_ticks, start_server_wait, start_machine: machine_busy_ticks(), started: Instant::now() }
    }

    /// (name, percent of one core) for each group since `start`, `None` for
    /// a group with no process; then the whole machine and the rest.
    pub fn stop(self) -> Vec<(&'static str, Option<f64>)> {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let percent = |ticks: u64| ticks as f64 / clock_ticks_per_second() / seconds * 100.0;
        let mut usage: Vec<(&'static str, Option<f64>)> = self
            .watched
            .iter()
            .zip(self.start_ticks)
            .map(|(w, start)| (w.name, (!w.pids.is_empty()).then(|| percent(total_ticks(w).saturating_sub(start)))))
            .collect();
        let ours: f64 = usage.iter().filter_map(|(_, p)| *p).sum();
        let machine = percent(machine_busy_ticks().saturating_sub(self.start_machine));
        usage.push(("whole machine", Some(machine)));
        usage.push(("everything else", Some((machine - ours).max(0.0))));
        // Prosody is single-threaded and the bottleneck of the XMPP ceiling:
        // time it was ready to run but waited for a CPU is time the rest
        // of the machine took from it.
        let wait_ns = server_wait_ns(&self.watched).saturating_sub(self.start_server_wait);
        usage.push((SERVER_WAIT, Some(wait_ns as f64 / 1e9 / seconds * 100.0)));
        usage
    }
}

/// The group whose run-queue wait is reported, and the column it goes in.
pub const SERVER: &str = "prosody";
const SERVER_WAIT: &str = "prosody ready but waiting for a CPU";

fn server_wait_ns(watched: &[Watched]) -> u64 {
    watched.iter().filter(|w| w.name == SERVER).flat_map(|w| &w.pids).map(|pid| run_queue_wait_ns(*pid)).sum()
}

/// Nanoseconds the threads of a process spent runnable but not running
/// (the second field of each thread's `schedstat`).
fn run_queue_wait_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Busy (not idle, not waiting for I/O) ticks of all CPUs, from `/proc/stat`.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is in user)
    let total: u64 = ticks.iter().take(8).sum();
    total.saturating_sub(ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0))
}

fn total_ticks(watched: &Watched) -> u64 {
    watched.pids.iter().filter_map(|pid| cpu_ticks(*pid)).sum()
}
