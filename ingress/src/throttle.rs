//! Throttling failed logins, so that guessing a password is slow, and so
//! that nobody can lock out an account's owner by guessing wrong.
//!
//! Failures are counted per client address (IPv6 addresses by their /64,
//! the block one client usually holds) and per (account, address): each key
//! may fail `free_failures` times, and every further failure doubles how
//! long that key is refused (429 with `Retry-After`), from one second up to
//! `MAX_LOCKOUT`. A key's record is forgotten `WINDOW` after its last
//! failure, or when it logs in. Someone else's failures therefore never
//! refuse an account's owner: a guesser locks out its own address, and its
//! own (account, address) pair.
//!
//! Failures per account, from any address, are counted too, but never
//! refuse anything: an account under pressure (more than `free_failures`
//! recent failures) has its uncached checks share one narrow lane of the
//! argon2 budget (see `admission`), which slows a guesser spread over many
//! addresses without refusing the owner's correct password.
//!
//! The check runs before argon2 and again after the wait for a slot, so a
//! guesser cannot spend the server's CPU either. Clients whose correct
//! credentials are already cached are never throttled.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

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

/// A client address as throttled: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(u128);

impl From<IpAddr> for Client {
    fn from(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(v4) => Client(u128::from(v4.to_bits())),
            // An IPv4-mapped address is that IPv4 address.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(u128::from(v4.to_bits())),
                None => Client((v6.to_bits() & !u128::from(u64::MAX)) | (1 << 32)),
            },
        }
    }
}

#[derive(Debug)]
pub struct Throttle {
    free_failures: u32,
    addresses: Table<Client>,
    /// (account, address), the account as a randomly keyed 64-bit hash of
    /// its name, so that a record's size does not depend on how long a name
    /// a client sends.
    pairs: Table<(u64, Client)>,
    /// Per account, from any address: pressure, never a refusal.
    accounts: Table<u64>,
    account_hasher: RandomState,
}

impl Throttle {
    pub fn new(free_failures: u32) -> Self {
        Self {
            free_failures,
            addresses: Table::new(),
            pairs: Table::new(),
            accounts: Table::new(),
            account_hasher: RandomState::new(),
        }
    }

    /// How long this client must still wait before trying this account, if
    /// at all: its address, or its own tries of this account, failed too
    /// often.
    pub fn check(&self, address: IpAddr, account: &str) -> Option<Duration> {
        let (now, client) = (Instant::now(), Client::from(address));
        let by_address = self.addresses.locked_for(&client, now);
        let by_pair = self.pairs.locked_for(&(self.account_key(account), client), now);
        by_address.max(by_pair)
    }

    /// Whether `account` failed more than the free failures recently, from
    /// whatever addresses: its uncached checks are slowed, never refused.
    pub fn under_pressure(&self, account: &str) -> bool {
        self.accounts.locked_for(&self.account_key(account), Instant::now()).is_some()
    }

    pub fn failed(&self, address: IpAddr, account: &str) {
        let (now, client, key) = (Instant::now(), Client::from(address), self.account_key(account));
        self.addresses.fail(client, now, self.free_failures);
        self.pairs.fail((key, client), now, self.free_failures);
        self.accounts.fail(key, now, self.free_failures);
    }

    /// A failure that names no account (a user name that is not a JID).
    pub fn failed_address(&self, address: IpAddr) {
        self.addresses.fail(Client::from(address), Instant::now(), self.free_failures);
    }

    /// A correct password from `address`: its own records are cleared. The
    /// account's pressure stays: others may still be guessing.
    pub fn succeeded(&self, address: IpAddr, account: &str) {
        let client = Client::from(address);
        self.addresses.forget(&client);
        self.pairs.forget(&(self.account_key(account), client));
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

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn a_guesser_locks_out_itself_and_never_the_owner() {
        let throttle = Throttle::new(2);
        let (guesser, owner) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..3 {
            throttle.failed(guesser, "victim@example.com");
        }
        assert!(throttle.check(guesser, "victim@example.com").is_some(), "the guesser's tries are refused");
        assert!(throttle.check(guesser, "other@example.com").is_some(), "and its address, for any account");
        assert_eq!(throttle.check(owner, "victim@example.com"), None, "the owner is not refused");
        assert!(throttle.under_pressure("victim@example.com"), "but the account's checks are slowed");
        throttle.succeeded(owner, "victim@example.com");
        assert!(throttle.under_pressure("victim@example.com"), "the guesser may still be at it");
        assert!(throttle.check(guesser, "victim@example.com").is_some());
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        assert_eq!(Client::from(ip("2001:db8:1:2::1")), Client::from(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Client::from(ip("2001:db8:1:2::1")), Client::from(ip("2001:db8:1:3::1")));
        assert_eq!(Client::from(ip("::ffff:192.0.2.1")), Client::from(ip("192.0.2.1")));
        assert_ne!(Client::from(ip("::c000:201")), Client::from(ip("192.0.2.1")), "not mapped: an IPv6 block");
        let throttle = Throttle::new(1);
        throttle.failed(ip("2001:db8::1"), "a@example.com");
        throttle.failed(ip("2001:db8::2"), "b@example.com");
        assert!(throttle.check(ip("2001:db8::3"), "c@example.com").is_some(), "a new address in the /64 is no escape");
    }
}
