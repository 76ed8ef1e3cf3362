//! Throttling failed logins, per client address and per account.
//!
//! Each key (an address, an account) may fail `free_failures` times; every
//! further failure doubles how long that key is refused (429 with
//! `Retry-After`), from one second up to `MAX_LOCKOUT`. A key's record is
//! forgotten `WINDOW` after its last failure, or when it logs in.
//!
//! The check runs before argon2, so a guesser cannot spend the server's CPU
//! either. Clients whose correct credentials are already cached are never
//! throttled: a locked account stays usable by the scripts that know its
//! password.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the longest lockout lasts.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// How long a failure is remembered.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Most keys tracked per table; past it, expired records are dropped and, if
/// that is not enough, the oldest half.
const CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last_failure: Instant,
    locked_until: Instant,
}

#[derive(Debug)]
struct Table<K> {
    records: Mutex<HashMap<K, Record>>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Self { records: Mutex::new(HashMap::new()) }
    }

    fn locked_for(&self, key: &K, now: Instant) -> Option<Duration> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.get(key).filter(|r| r.locked_until > now).map(|r| r.locked_until - now)
    }

    fn fail(&self, key: K, now: Instant, free_failures: u32) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() >= CAPACITY {
            records.retain(|_, r| now.duration_since(r.last_failure) < WINDOW);
            if records.len() >= CAPACITY {
                let mut ages: Vec<Instant> = records.values().map(|r| r.last_failure).collect();
                ages.sort_unstable();
                let cutoff = ages[ages.len() / 2];
                records.retain(|_, r| r.last_failure > cutoff);
            }
        }
        let record = records.entry(key).or_insert(Record { failures: 0, last_failure: now, locked_until: now });
        if now.duration_since(record.last_failure) >= WINDOW {
            record.failures = 0;
        }
        record.failures = record.failures.saturating_add(1);
        record.last_failure = now;
        record.locked_until = now + lockout(record.failures, free_failures);
    }

    fn forget(&self, key: &K) {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// The lockout after `failures` failures: none for the free ones, then 1 s,
/// 2 s, 4 s, … up to `MAX_LOCKOUT`.
pub fn lockout(failures: u32, free_failures: u32) -> Duration {
    match failures.checked_sub(free_failures) {
        None | Some(0) => Duration::ZERO,
        Some(excess) => Duration::from_secs(1u64 << (excess - 1).min(20)).min(MAX_LOCKOUT),
    }
}

#[derive(Debug)]
pub struct Throttle {
    free_failures: u32,
    addresses: Table<IpAddr>,
    /// Keyed by a randomly keyed 64-bit hash of the account name, so that a
    /// record's size does not depend on how long a name a client sends.
    accounts: Table<u64>,
    account_hasher: RandomState,
}

impl Throttle {
    pub fn new(free_failures: u32) -> Self {
        Self { free_failures, addresses: Table::new(), accounts: Table::new(), account_hasher: RandomState::new() }
    }

    /// How long this address or account must still wait, if at all.
    pub fn check(&self, address: IpAddr, account: &str) -> Option<Duration> {
        let now = Instant::now();
        let by_address = self.addresses.locked_for(&address, now);
        let by_account = self.accounts.locked_for(&self.account_key(account), now);
        by_address.max(by_account)
    }

    pub fn failed(&self, address: IpAddr, account: &str) {
        let now = Instant::now();
        self.addresses.fail(address, now, self.free_failures);
        self.accounts.fail(self.account_key(account), now, self.free_failures);
    }

    /// A failure that names no account (a user name that is not a JID).
    pub fn failed_address(&self, address: IpAddr) {
        self.addresses.fail(address, Instant::now(), self.free_failures);
    }

    pub fn succeeded(&self, address: IpAddr, account: &str) {
        self.addresses.forget(&address);
        self.accounts.forget(&self.account_key(account));
    }

    fn account_key(&self, account: &str) -> u64 {
        self.account_hasher.hash_one(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockouts_double_after_the_free_failures() {
        assert_eq!(lockout(5, 5), Duration::ZERO);
        assert_eq!(lockout(6, 5), Duration::from_secs(1));
        assert_eq!(lockout(7, 5), Duration::from_secs(2));
        assert_eq!(lockout(9, 5), Duration::from_secs(8));
        assert_eq!(lockout(500, 5), MAX_LOCKOUT);
        assert_eq!(lockout(1, 0), Duration::from_secs(1));
    }

    #[test]
    fn an_address_and_an_account_are_throttled_separately() {
        let throttle = Throttle::new(2);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().expect("ip"), "192.0.2.2".parse().expect("ip"));
        throttle.failed(a, "x@example.com");
        throttle.failed(a, "y@example.com");
        assert_eq!(throttle.check(a, "z@example.com"), None);
        throttle.failed(a, "z@example.com");
        assert!(throttle.check(a, "other@example.com").is_some(), "the address is locked");
        assert_eq!(throttle.check(b, "other@example.com"), None, "other addresses are not");
        for _ in 0..3 {
            throttle.failed(b, "victim@example.com");
        }
        throttle.succeeded(b, "victim@example.com");
        assert_eq!(throttle.check(b, "victim@example.com"), None, "a login clears both");
    }
}
