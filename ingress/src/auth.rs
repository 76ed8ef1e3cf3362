//! HTTP Basic authentication against the users file.
//!
//! argon2 costs tens of milliseconds of CPU, so a successful check is
//! remembered for a short time under a keyed BLAKE2 hash of the credentials
//! (the key is random per process; the password itself is never kept).
//! Failures are never cached. An unknown user costs one argon2 verification
//! too, so that timing does not tell which accounts exist. Failed logins are
//! throttled per client address and per account (see `throttle`), and at
//! most a few argon2 checks run at once, so that guessing can neither
//! exhaust memory (argon2id takes 19 MiB each) nor starve the CPU.

use crate::error::Error;
use crate::throttle::Throttle;
use std::net::IpAddr;
use tokio::sync::Semaphore;
use crate::users::{User, Users};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use axum::http::HeaderMap;
use base64::Engine;
use blake2::digest::{KeyInit, Mac};
use blake2::Blake2bMac512;
use herald_shared::Sender;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most remembered credentials at once; past it, expired ones are dropped
/// and, if that is not enough, all of them.
const CACHE_CAPACITY: usize = 10_000;

/// A PHC string to verify against when the user does not exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$WnHQp6Ojyh1hMgrlCuNeyjYYyNuTvBJh9oiEzpFOdTk";

type CacheKey = [u8; 64];

#[derive(Debug)]
pub struct Authenticator {
    users: Users,
    ttl: Duration,
    mac_key: [u8; 32],
    cache: Mutex<HashMap<CacheKey, (Sender, Instant)>>,
    throttle: Throttle,
    /// Bounds the argon2 checks running at once.
    verifying: Semaphore,
}

impl Authenticator {
    pub fn new(users: Users, ttl: Duration, free_failures: u32) -> Self {
        let parallel = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Self {
            users,
            ttl,
            mac_key: rand::random(),
            cache: Mutex::new(HashMap::new()),
            throttle: Throttle::new(free_failures),
            verifying: Semaphore::new(parallel),
        }
    }

    /// Checks the `Authorization` header of a request from `client` and
    /// returns the user it names.
    pub async fn authenticate(self: &Arc<Self>, headers: &HeaderMap, client: IpAddr) -> Result<User, Error> {
        let (jid_text, password) = basic_credentials(headers).ok_or(Error::Unauthorized)?;
        let Ok(jid) = Sender::parse(&jid_text) else {
            tracing::info!(%client, user = %jid_text, "login refused: user name is not a bare JID");
            self.throttle.failed(client, &jid_text);
            return Err(Error::Unauthorized);
        };
        let key = self.cache_key(&jid, &password);
        if self.cached(&key, &jid) {
            return self.users.get(&jid).cloned().ok_or(Error::Unauthorized);
        }
        let account = jid.to_string();
        if let Some(wait) = self.throttle.check(client, &account) {
            tracing::info!(%client, user = %jid, "login refused: too many failed logins");
            return Err(Error::TooManyAttempts(wait.as_secs().max(1)));
        }
        let permit = self.verifying.acquire().await.map_err(|e| Error::Internal(e.to_string()))?;
        let this = Arc::clone(self);
        let verified_jid = jid.clone();
        let ok = tokio::task::spawn_blocking(move || this.verify(&verified_jid, &password))
            .await
            .map_err(|e| Error::Internal(format!("password check panicked: {e}")))?;
        drop(permit);
        match (ok, self.users.get(&jid)) {
            (true, Some(user)) => {
                self.throttle.succeeded(client, &account);
                self.remember(key, jid);
                Ok(user.clone())
            }
            _ => {
                tracing::info!(%client, user = %jid, "login refused: wrong user or password");
                self.throttle.failed(client, &account);
                Err(Error::Unauthorized)
            }
        }
    }

    fn verify(&self, jid: &Sender, password: &str) -> bool {
        let (hash, known) = match self.users.get(jid) {
            Some(user) => (user.password_hash.as_str(), true),
            None => (DUMMY_HASH, false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else { return false };
        let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
        ok && known
    }

    fn cache_key(&self, jid: &Sender, password: &str) -> CacheKey {
        let mut mac = <Blake2bMac512 as KeyInit>::new_from_slice(&self.mac_key).expect("32-byte key is valid");
        mac.update(jid.to_string().as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn cached(&self, key: &CacheKey, jid: &Sender) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        matches!(cache.get(key), Some((cached_jid, expires)) if cached_jid == jid && *expires > Instant::now())
    }

    fn remember(&self, key: CacheKey, jid: Sender) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, (_, expires)| *expires > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key, (jid, now + self.ttl));
    }
}

/// `Authorization: Basic base64(user:password)`; `None` if absent or malformed.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        h
    }

    fn authenticator(ttl: Duration) -> Arc<Authenticator> {
        let hash = crate::hash_password::hash("s3cret:with colon").expect("hash");
        let users = Users::parse(&format!("[[users]]\njid = \"a@example.com\"\npassword_hash = \"{hash}\"\n")).expect("users");
        Arc::new(Authenticator::new(users, ttl, 5))
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers(&format!("Basic {encoded}"))
    }

    #[tokio::test]
    async fn accepts_the_right_password_and_caches_it() {
        let auth = authenticator(Duration::from_secs(60));
        let user = auth.authenticate(&basic("a@example.com", "s3cret:with colon"), CLIENT).await.expect("ok");
        assert_eq!(user.jid.to_string(), "a@example.com");
        assert_eq!(auth.cache.lock().expect("lock").len(), 1);
        auth.authenticate(&basic("A@example.com", "s3cret:with colon"), CLIENT).await.expect("cached, normalised");
    }

    #[tokio::test]
    async fn refuses_wrong_or_missing_credentials_and_never_caches_them() {
        let auth = authenticator(Duration::from_secs(60));
        for h in [
            basic("a@example.com", "wrong"),
            basic("nobody@example.com", "s3cret:with colon"),
            basic("not a jid", "x"),
            headers("Bearer abc"),
            headers("Basic !!!"),
            HeaderMap::new(),
        ] {
            assert!(matches!(auth.authenticate(&h, CLIENT).await, Err(Error::Unauthorized)));
        }
        assert!(auth.cache.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn guessing_is_throttled_but_known_clients_keep_working() {
        let auth = authenticator(Duration::from_secs(60));
        auth.authenticate(&basic("a@example.com", "s3cret:with colon"), CLIENT).await.expect("a script logs in");
        let guesser: IpAddr = "198.51.100.9".parse().expect("ip");
        for _ in 0..5 {
            assert!(matches!(auth.authenticate(&basic("a@example.com", "guess"), guesser).await, Err(Error::Unauthorized)));
        }
        // The sixth failure locks the address and the account for a second.
        assert!(matches!(auth.authenticate(&basic("a@example.com", "guess"), guesser).await, Err(Error::Unauthorized)));
        assert!(matches!(auth.authenticate(&basic("a@example.com", "guess"), guesser).await, Err(Error::TooManyAttempts(1))));
        let other: IpAddr = "203.0.113.1".parse().expect("ip");
        assert!(matches!(auth.authenticate(&basic("a@example.com", "right?"), other).await, Err(Error::TooManyAttempts(_))), "the account is locked");
        auth.authenticate(&basic("a@example.com", "s3cret:with colon"), CLIENT).await.expect("the cached script is not locked out");
    }

    #[tokio::test]
    async fn a_zero_ttl_disables_the_cache() {
        let auth = authenticator(Duration::ZERO);
        auth.authenticate(&basic("a@example.com", "s3cret:with colon"), CLIENT).await.expect("ok");
        assert!(auth.cache.lock().expect("lock").is_empty());
    }
}
