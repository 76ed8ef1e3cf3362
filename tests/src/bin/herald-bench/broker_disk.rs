//! The broker's disk during the paced phases (1c and 3b), to name what a
//! late confirm waited for. A quorum queue confirms a publish only once its
//! write-ahead log is synced, so two things on the disk show up as late
//! confirms, and so as a POST → 202 tail:
//!
//! - the disk holding writes: stretches where it had I/O in flight the whole
//!   time and completed no write, or only writes that had waited 10 ms or
//!   more each on average (`/proc/diskstats` of the device under RabbitMQ's
//!   Ra directory, sampled every 20 ms);
//! - the WAL rolling over: Ra starts a new file after 512 MiB
//!   (`raft.wal_max_size_bytes`), moves the old one's entries to segment
//!   files and deletes it (the `*.wal` files there, listed as often).
//!
//! Both need the broker on this machine and its directory readable; without
//! them the watch reports nothing rather than guessing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the disk and the WAL directory are read.
/// (The kernel counts busy time in jiffies, 4 ms at 250 Hz, so a sample
/// must be several of them long.)
const SAMPLE: Duration = Duration::from_millis(20);
/// Stalls shorter than this are not recorded.
pub const MIN_STALL: Duration = Duration::from_millis(20);
/// A write that took this long on average holds the syncs behind it.
const SLOW_WRITE_MS: u64 = 10;
/// How long after a WAL file appears or goes a late answer is put on it: the
/// stalls measured after a rollover ended within 0.6–0.9 s of the new file.
pub const AFTER_WAL_CHANGE: Duration = Duration::from_secs(1);

/// Where the broker keeps its Ra WAL, asked of the local node.
pub fn wal_dir() -> Option<PathBuf> {
    let out = herald_tests::broker::eval("maps:get(data_dir, maps:get(segment_writer, ra:overview(quorum_queues))).")?;
    let dir = PathBuf::from(out.trim().trim_matches('"'));
    dir.is_dir().then_some(dir)
}

/// What the disk did while a phase ran.
#[derive(Debug, Clone, Default)]
pub struct DiskEvents {
    /// Whether the watch could read anything at all.
    pub watched: bool,
    /// Start and length of each stretch of at least [`MIN_STALL`] with I/O in
    /// flight and no write completed but slow ones.
    pub stalls: Vec<(Instant, Duration)>,
    /// When a WAL file appeared or was deleted.
    pub wal_changes: Vec<Instant>,
}

impl DiskEvents {
    /// Whether something that finished at `answered` after starting at `sent`
    /// overlapped a stall or came within [`AFTER_WAL_CHANGE`] of a WAL change.
    pub fn explains(&self, sent: Instant, answered: Instant) -> bool {
        let stalled = self.stalls.iter().any(|(start, length)| sent <= *start + *length + SAMPLE && *start <= answered);
        let rolled = self.wal_changes.iter().any(|at| *at <= answered && sent <= *at + AFTER_WAL_CHANGE);
        stalled || rolled
    }

    /// One line for the report: the stalls and WAL changes, and how many of
    /// `slow` (send, answer) pairs they account for.
    pub fn describe(&self, slow: &[(Instant, Instant)], slow_means: &str) -> String {
        if !self.watched {
            return "broker disk not watched (no local broker directory)".into();
        }
        let longest = self.stalls.iter().map(|(_, d)| *d).max().unwrap_or_default();
        let explained = slow.iter().filter(|(s, a)| self.explains(*s, *a)).count();
        format!(
            "broker disk: {} write stall(s) ≥ {} ms (longest {:.0} ms), {} WAL file(s) created or deleted; \
             {} {slow_means}, {explained} of them during a stall or within {} s of a WAL change",
            self.stalls.len(),
            MIN_STALL.as_millis(),
            longest.as_secs_f64() * 1000.0,
            self.wal_changes.len(),
            slow.len(),
            AFTER_WAL_CHANGE.as_secs(),
        )
    }
}

/// A running watch; [`Watch::stop`] returns what it saw.
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<DiskEvents>,
}

impl Watch {
    pub fn start(dir: Option<&Path>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, flag) = (dir.map(Path::to_path_buf), Arc::clone(&stop));
        let thread = std::thread::spawn(move || watch(dir, &flag));
        Self { stop, thread }
    }

    pub fn stop(self) -> DiskEvents {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn watch(dir: Option<PathBuf>, stop: &AtomicBool) -> DiskEvents {
    let Some(dir) = dir else { return DiskEvents::default() };
    let device = std::fs::metadata(&dir).ok().map(|m| device_numbers(m.dev()));
    let mut events = DiskEvents { watched: true, ..Default::default() };
    let mut wals = wal_files(&dir);
    let mut last = device.and_then(read_device);
    let mut stall: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let before = Instant::now();
        std::thread::sleep(SAMPLE);
        let now = Instant::now();
        let current = wal_files(&dir);
        if current != wals {
            events.wal_changes.push(now);
            wals = current;
        }
        let sample = device.and_then(read_device);
        if let (Some(a), Some(b)) = (last, sample) {
            if held(a, b, now - before) {
                stall.get_or_insert(before);
            } else if let Some(start) = stall.take() {
                let length = before - start;
                if length >= MIN_STALL {
                    events.stalls.push((start, length));
                }
            }
        }
        last = sample;
    }
    events
}

/// The counters of one block device that tell a held write.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DeviceSample {
    writes_completed: u64,
    /// Milliseconds the completed writes took, summed.
    write_ms: u64,
    /// Milliseconds with at least one I/O in flight.
    busy_ms: u64,
}

/// Whether the device spent (nearly) all of `elapsed` with I/O in flight
/// and completed no write, or only slow ones. (While ext4 discards a deleted
/// file's blocks, one write completes with each discard, 20 ms apart.)
fn held(a: DeviceSample, b: DeviceSample, elapsed: Duration) -> bool {
    let busy = b.busy_ms.saturating_sub(a.busy_ms);
    let writes = b.writes_completed.saturating_sub(a.writes_completed);
    let write_ms = b.write_ms.saturating_sub(a.write_ms);
    busy as f64 >= 0.6 * elapsed.as_secs_f64() * 1000.0 && (writes == 0 || write_ms >= SLOW_WRITE_MS * writes)
}

/// Linux's major and minor numbers of a `st_dev`.
fn device_numbers(dev: u64) -> (u64, u64) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    (major, minor)
}

fn read_device((major, minor): (u64, u64)) -> Option<DeviceSample> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|line| parse_diskstats_line(line, major, minor))
}

/// Fields of `/proc/diskstats` (Documentation/admin-guide/iostats.rst):
/// major, minor, name, then reads (4 fields), writes completed, merged,
/// sectors, ms writing, I/Os in flight, ms doing I/O, ...
fn parse_diskstats_line(line: &str, major: u64, minor: u64) -> Option<DeviceSample> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
    (number(0)? == major && number(1)? == minor)
        .then(|| Some(DeviceSample { writes_completed: number(7)?, write_ms: number(10)?, busy_ms: number(12)? }))
        .flatten()
}

fn wal_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".wal"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_device_that_completes_no_write_or_only_slow_ones_holds_writes() {
        let a = DeviceSample { writes_completed: 100, write_ms: 500, busy_ms: 1_000 };
        let twenty = Duration::from_millis(20);
        let b = |writes: u64, write_ms: u64, busy_ms| DeviceSample {
            writes_completed: 100 + writes,
            write_ms: 500 + write_ms,
            busy_ms,
        };
        assert!(held(a, b(0, 0, 1_020), twenty), "nothing completed");
        assert!(held(a, b(1, 23, 1_016), twenty), "one write that waited behind a discard");
        assert!(!held(a, b(12, 2, 1_020), twenty), "writes completed at their usual pace");
        assert!(!held(a, b(0, 0, 1_004), twenty), "the device was idle");
    }

    #[test]
    fn diskstats_lines_are_read_by_device_number() {
        let line =
            " 254       0 vda 6061 1617 457386 2313 5227932 2497467 158386424 3364219 2 1956260 3401338 0 0 0 0 0 0";
        assert_eq!(
            parse_diskstats_line(line, 254, 0),
            Some(DeviceSample { writes_completed: 5_227_932, write_ms: 3_364_219, busy_ms: 1_956_260 })
        );
        assert_eq!(parse_diskstats_line(line, 254, 1), None);
        assert_eq!(device_numbers(0xfe00), (254, 0));
        assert_eq!(device_numbers(0xfe01), (254, 1));
    }

    #[test]
    fn late_answers_are_put_on_stalls_and_wal_changes_near_them() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let events =
            DiskEvents { watched: true, stalls: vec![(t + ms(100), ms(50))], wal_changes: vec![t + ms(2_000)] };
        assert!(events.explains(t + ms(90), t + ms(160)), "overlaps the stall");
        assert!(!events.explains(t + ms(300), t + ms(340)), "after the stall, before the rollover");
        assert!(events.explains(t + ms(2_500), t + ms(2_560)), "half a second after a WAL change");
        assert!(!events.explains(t + ms(3_100), t + ms(3_150)), "more than a second after it");
    }
}
