//! Authentication against the users file: HTTP Basic with a password, or
//! `Authorization: Bearer` with an access token.
//!
//! A token is looked up by its SHA-256 in a map: no argon2, so nothing to
//! throttle or queue, and a wrong token costs a hash and a lookup.
//!
//! argon2 costs tens of milliseconds of CPU, so a successful check is
//! remembered for a short time under a keyed BLAKE2 hash of the
//! `Authorization` header as sent (the key is random per process; the
//! password itself is never kept), so a remembered login decodes and parses
//! nothing.
//! Failures are never cached. An unknown user costs one argon2 verification
//! too, so that timing does not tell which accounts exist.
//!
//! An uncached check goes through three gates: the throttle (this client's
//! own failures; `throttle`), the admission stage (a bounded budget of
//! checks at once, a bounded queue, a deadline; `admission`), and the
//! throttle again after the wait. argon2 runs on the blocking pool in a
//! reused buffer (`password`), so memory does not grow with the number of
//! checks.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, FromRef, FromRequestParts},
    http::{HeaderMap, request::Parts},
};
use base64::Engine;
use blake2::{
    Blake2bMac512,
    digest::{KeyInit, Mac},
};
use herald_shared::{Sender, telemetry::Repeated};

use crate::{
    admission::Admission,
    error::Error,
    metrics::Metrics,
    password::Verifier,
    throttle::Throttle,
    users::{User, Users},
};

/// Most remembered credentials at once; past it, expired ones are dropped
/// and, if that is not enough, all of them.
const CACHE_CAPACITY: usize = 10_000;

/// A PHC string to verify against when the user does not exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$WnHQp6Ojyh1hMgrlCuNeyjYYyNuTvBJh9oiEzpFOdTk";

type CacheKey = [u8; 64];

#[derive(Debug)]
pub struct Authenticator {
    /// Replaced whole when the users file is reloaded.
    users: RwLock<Arc<Users>>,
    ttl: Duration,
    /// Take the client's address from `X-Forwarded-For` (behind a proxy).
    trust_forwarded_for: bool,
    mac_key: [u8; 32],
    cache: Mutex<HashMap<CacheKey, (Sender, Instant)>>,
    throttle: Throttle,
    admission: Admission,
    verifier: Verifier,
    metrics: Arc<Metrics>,
    /// Uncached checks running, by credentials: the same credentials
    /// arriving on many connections at once (a client starting up) wait
    /// for one check instead of each running argon2.
    checking: Mutex<HashMap<CacheKey, tokio::sync::watch::Receiver<bool>>>,
}

/// One uncached check of some credentials; dropping it wakes the requests
/// with the same credentials that wait for it. They read `true` if the
/// check refused the credentials; `false` if it ended without a verdict
/// (turned away as busy, throttled, or its client hung up before argon2
/// ran), and then they check for themselves.
struct Checking {
    auth: Arc<Authenticator>,
    key: CacheKey,
    refused: tokio::sync::watch::Sender<bool>,
}

impl Checking {
    fn refuse(&self) {
        self.refused.send_replace(true);
    }
}

impl Drop for Checking {
    fn drop(&mut self) {
        self.auth.checking.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.key);
    }
}

/// The user a request authenticated as: an extractor that runs before the
/// body is read, so an unauthenticated request never gets its body read.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<User>);

impl<S: Send + Sync> FromRequestParts<S> for Authenticated
where
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let auth = Arc::<Authenticator>::from_ref(state);
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| *peer)
            .ok_or_else(|| Error::Internal("no peer address on the request".into()))?;
        let client = client_address(peer, &parts.headers, auth.trust_forwarded_for);
        auth.authenticate(&parts.headers, client).await.map(Authenticated)
    }
}

/// The client's address: the peer, or behind a trusted proxy the last
/// address in `X-Forwarded-For` (the one that proxy appended).
fn client_address(peer: SocketAddr, headers: &HeaderMap, trust_forwarded_for: bool) -> IpAddr {
    let forwarded = trust_forwarded_for
        .then(|| {
            headers
                .get_all("x-forwarded-for")
                .iter()
                .next_back()?
                .to_str()
                .ok()?
                .rsplit(',')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .flatten();
    forwarded.unwrap_or(peer.ip())
}

impl Authenticator {
    pub fn new(
        users: Users,
        ttl: Duration,
        free_failures: u32,
        trust_forwarded_for: bool,
        admission: Admission,
        metrics: Arc<Metrics>,
    ) -> Self {
        let verifier = Verifier::new(admission.slots());
        Self {
            users: RwLock::new(Arc::new(users)),
            ttl,
            trust_forwarded_for,
            mac_key: rand::random(),
            cache: Mutex::new(HashMap::new()),
            throttle: Throttle::new(free_failures),
            admission,
            verifier,
            metrics,
            checking: Mutex::new(HashMap::new()),
        }
    }

    /// The users as last loaded.
    fn users(&self) -> Arc<Users> {
        Arc::clone(&self.users.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Puts a reloaded users file in place. Remembered logins stay only for
    /// users whose password hash did not change; requests being checked
    /// finish against the old file.
    pub fn replace_users(&self, new: Users) {
        let old = std::mem::replace(
            &mut *self.users.write().unwrap_or_else(std::sync::PoisonError::into_inner),
            Arc::new(new),
        );
        let new = self.users();
        let same = |jid: &Sender| old.get(jid).map(|u| &u.password_hash) == new.get(jid).map(|u| &u.password_hash);
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|_, (jid, _)| same(jid));
    }

    /// Checks the `Authorization` header of a request from `client` and
    /// returns the user it names.
    pub async fn authenticate(self: &Arc<Self>, headers: &HeaderMap, client: IpAddr) -> Result<Arc<User>, Error> {
        if let Some(token) = bearer_token(headers) {
            return self.authenticate_token(token, client);
        }
        let key = self.cache_key(headers);
        if let Some(user) = self.cached(&key) {
            return Ok(user);
        }
        let (jid_text, password) = basic_credentials(headers).ok_or(Error::Unauthorized)?;
        let Ok(jid) = Sender::parse(&jid_text) else {
            // Counted against the address only: an account table keyed by
            // whatever text a client sends would be the client's to grow.
            tracing::info!(%client, user = ?shown(&jid_text), "login refused: user name is not a bare JID");
            self.throttle.failed_address(client);
            return Err(Error::Unauthorized);
        };
        // The same credentials are being checked already: wait for that
        // check, then for the cache (same password, same answer). A check
        // that ended without a verdict says nothing of these credentials.
        let checking = loop {
            match self.begin_check(key) {
                Ok(checking) => break checking,
                Err(mut done) => {
                    let wait = async { while done.changed().await.is_ok() {} };
                    if tokio::time::timeout(self.admission.retry_after(), wait).await.is_err() {
                        return Err(Error::Overloaded(self.admission.retry_after().as_secs()));
                    }
                    if let Some(user) = self.cached(&key) {
                        return Ok(user);
                    }
                    if *done.borrow() {
                        return Err(Error::Unauthorized);
                    }
                }
            }
        };
        let account = jid.to_string();
        self.refuse_if_throttled(client, &account)?;
        let pressured = self.throttle.under_pressure(&account);
        let slot = self.admission.admit(pressured).await.map_err(|_| {
            static REPEATED: Repeated = Repeated::new(Duration::from_secs(1));
            if let Some(times) = REPEATED.tick() {
                tracing::info!(%client, user = %jid, pressured, times, "login turned away: the password checks are busy");
            }
            self.metrics.logins_turned_away.inc();
            Error::Overloaded(self.admission.retry_after().as_secs())
        })?;
        // The wait may have been long, and others from this client failed
        // meanwhile.
        self.refuse_if_throttled(client, &account)?;
        // The check, its slot and its bookkeeping run to the end on the
        // blocking pool even if the request is dropped (a client that hangs
        // up mid-check): otherwise hanging up would free the slot while
        // argon2 still runs, and skip the failure count.
        let this = Arc::clone(self);
        let checked_jid = jid.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let _running = this.metrics.password_check();
            let ok = this.check_password(client, checked_jid, &account, &password, key);
            if !ok {
                checking.refuse();
            }
            ok
        })
        .await
        .map_err(|e| Error::Internal(format!("password check panicked: {e}")))?;
        match self.users().get(&jid) {
            Some(user) if ok => Ok(user.clone()),
            _ => Err(Error::Unauthorized),
        }
    }

    /// A bearer token: its digest is looked up, nothing else.
    fn authenticate_token(&self, token: &str, client: IpAddr) -> Result<Arc<User>, Error> {
        match self.users().by_token(token) {
            Some((user, found)) => {
                tracing::debug!(%client, user = %user.jid, token = %found.name, "token accepted");
                Ok(Arc::clone(user))
            }
            None => {
                static REPEATED: Repeated = Repeated::new(Duration::from_secs(1));
                if let Some(times) = REPEATED.tick() {
                    tracing::info!(%client, times, "login refused: unknown access token");
                }
                self.metrics.tokens_refused.inc();
                Err(Error::Unauthorized)
            }
        }
    }

    /// Registers an uncached check of `key`, or returns what to wait on if
    /// one is running.
    /// Without a cache (a zero TTL) a waiter could not learn the outcome:
    /// every request checks for itself.
    fn begin_check(self: &Arc<Self>, key: CacheKey) -> Result<Checking, tokio::sync::watch::Receiver<bool>> {
        let mut checking = self.checking.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(done) = checking.get(&key).filter(|_| !self.ttl.is_zero()) {
            return Err(done.clone());
        }
        let (refused, waiting) = tokio::sync::watch::channel(false);
        checking.insert(key, waiting);
        Ok(Checking { auth: Arc::clone(self), key, refused })
    }

    fn refuse_if_throttled(&self, client: IpAddr, account: &str) -> Result<(), Error> {
        match self.throttle.check(client, account) {
            None => Ok(()),
            Some(wait) => {
                static REPEATED: Repeated = Repeated::new(Duration::from_secs(1));
                if let Some(times) = REPEATED.tick() {
                    tracing::info!(%client, user = %account, times, "login refused: too many failed logins from this client");
                }
                Err(Error::TooManyAttempts(wait.as_secs().max(1)))
            }
        }
    }

    /// argon2, then the throttle's and the cache's bookkeeping.
    fn check_password(&self, client: IpAddr, jid: Sender, account: &str, password: &str, key: CacheKey) -> bool {
        if self.verify(&jid, password) {
            self.throttle.succeeded(client, account);
            self.remember(key, jid);
            true
        } else {
            tracing::info!(%client, user = %jid, "login refused: wrong user or password");
            self.throttle.failed(client, account);
            false
        }
    }

    fn verify(&self, jid: &Sender, password: &str) -> bool {
        let users = self.users();
        let (hash, known) = match users.get(jid) {
            Some(user) => (user.password_hash.as_str(), true),
            None => (DUMMY_HASH, false),
        };
        self.verifier.verify(hash, password.as_bytes()) && known
    }

    /// The `Authorization` header's bytes name the user and the password
    /// (Basic is base64 of both), so they key the cache as they are: the
    /// same credentials written another way are remembered apart.
    fn cache_key(&self, headers: &HeaderMap) -> CacheKey {
        let authorization = headers.get(axum::http::header::AUTHORIZATION).map_or(&b""[..], |v| v.as_bytes());
        let mut mac = <Blake2bMac512 as KeyInit>::new_from_slice(&self.mac_key).expect("32-byte key is valid");
        mac.update(authorization);
        mac.finalize().into_bytes().into()
    }

    /// The user of a remembered login, as the users file has it now.
    fn cached(&self, key: &CacheKey) -> Option<Arc<User>> {
        let jid = self.cached_at(key, Instant::now())?;
        self.users().get(&jid).cloned()
    }

    /// A hit keeps the entry for another `ttl`: a client that comes back
    /// within it never needs argon2 again, so it can never be locked out
    /// by someone guessing its account's password.
    fn cached_at(&self, key: &CacheKey, now: Instant) -> Option<Sender> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get_mut(key) {
            Some((jid, expires)) if *expires > now => {
                *expires = now + self.ttl;
                Some(jid.clone())
            }
            _ => None,
        }
    }

    fn remember(&self, key: CacheKey, jid: Sender) {
        self.remember_at(key, jid, Instant::now());
    }

    fn remember_at(&self, key: CacheKey, jid: Sender, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
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

/// A client-chosen user name as logged: at most 64 characters.
fn shown(text: &str) -> &str {
    text.char_indices().nth(64).map_or(text, |(end, _)| &text[..end])
}

/// `Authorization: Bearer <token>`, if that is the scheme.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
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
        let users =
            Users::parse(&format!("[[users]]\njid = \"a@example.com\"\npassword_hash = \"{hash}\"\n")).expect("users");
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        Arc::new(Authenticator::new(users, ttl, 5, false, Admission::new(2, 64, Duration::from_secs(10)), metrics))
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
            headers("Bearer hrld_0000000000000000000000000000000000000000000000000000000000000000"),
            headers("Basic !!!"),
            HeaderMap::new(),
        ] {
            assert!(matches!(auth.authenticate(&h, CLIENT).await, Err(Error::Unauthorized)));
        }
        assert!(auth.cache.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn the_same_credentials_at_once_cost_one_check() {
        let auth = authenticator(Duration::from_secs(60));
        let logins = (0..20).map(|_| {
            let auth = Arc::clone(&auth);
            async move { auth.authenticate(&basic("a@example.com", "s3cret:with colon"), CLIENT).await }
        });
        for login in futures::future::join_all(logins).await {
            login.expect("every one logs in");
        }
        assert_eq!(auth.metrics.password_checks_peak.get(), 1, "one argon2 check for all twenty");
        assert!(auth.checking.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_login_waiting_for_a_check_that_ended_without_a_verdict_checks_for_itself() {
        let auth = authenticator(Duration::from_secs(60));
        let right = basic("a@example.com", "s3cret:with colon");
        // Every slot taken: the first login waits for one.
        let (one, two) = (auth.admission.admit(false).await, auth.admission.admit(false).await);
        let mut first = Box::pin(auth.authenticate(&right, CLIENT));
        assert!(futures::poll!(first.as_mut()).is_pending(), "the first waits for a slot");
        let mut second = Box::pin(auth.authenticate(&right, CLIENT));
        assert!(futures::poll!(second.as_mut()).is_pending(), "the second waits for the first's check");
        // The first's client hangs up before its check ran.
        drop(first);
        drop((one, two));
        second.await.expect("the second checks for itself and logs in, not a 401");
        let wrong = basic("a@example.com", "wrong");
        let (one, two) = (auth.admission.admit(false).await, auth.admission.admit(false).await);
        let mut first = Box::pin(auth.authenticate(&wrong, CLIENT));
        assert!(futures::poll!(first.as_mut()).is_pending());
        let mut second = Box::pin(auth.authenticate(&wrong, CLIENT));
        assert!(futures::poll!(second.as_mut()).is_pending());
        drop((one, two));
        assert!(matches!(first.await, Err(Error::Unauthorized)));
        assert!(matches!(second.await, Err(Error::Unauthorized)), "a refusal is shared");
        assert_eq!(auth.metrics.password_checks_peak.get(), 1, "by one check");
    }

    #[tokio::test]
    async fn a_guesser_is_throttled_and_the_owner_never_refused() {
        let auth = authenticator(Duration::from_secs(60));
        let guesser: IpAddr = "198.51.100.9".parse().expect("ip");
        for _ in 0..6 {
            assert!(matches!(
                auth.authenticate(&basic("a@example.com", "guess"), guesser).await,
                Err(Error::Unauthorized)
            ));
        }
        // The sixth failure locks the guesser's address for a second.
        assert!(matches!(
            auth.authenticate(&basic("a@example.com", "guess"), guesser).await,
            Err(Error::TooManyAttempts(1))
        ));
        // The owner, from elsewhere, with nothing cached: its right
        // password is checked (in the narrow lane) and accepted.
        let owner: IpAddr = "203.0.113.1".parse().expect("ip");
        assert!(auth.cache.lock().expect("lock").is_empty());
        auth.authenticate(&basic("a@example.com", "s3cret:with colon"), owner).await.expect("the owner logs in");
        assert!(
            matches!(auth.authenticate(&basic("a@example.com", "wrong"), owner).await, Err(Error::Unauthorized)),
            "a wrong password from the owner's address is a plain 401"
        );
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_mid_check_still_counts_and_holds_its_permit() {
        let auth = authenticator(Duration::from_secs(60));
        let guesser: IpAddr = "198.51.100.10".parse().expect("ip");
        let parallel = auth.admission.slots();
        for _ in 0..6 {
            // `timeout` polls the check once (it reaches argon2 on the
            // blocking pool), then drops it: a client hanging up.
            let dropped =
                tokio::time::timeout(Duration::ZERO, auth.authenticate(&basic("a@example.com", "guess"), guesser))
                    .await;
            assert!(dropped.is_err(), "the check was still running");
            assert!(auth.admission.slots() < parallel, "argon2 still holds its permit");
            let settled = std::time::Instant::now() + Duration::from_secs(10);
            while auth.admission.slots() < parallel {
                assert!(std::time::Instant::now() < settled, "the abandoned check finished");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Six failures counted, though no request waited for its answer.
        assert!(matches!(
            auth.authenticate(&basic("a@example.com", "guess"), guesser).await,
            Err(Error::TooManyAttempts(_))
        ));
    }

    #[tokio::test]
    async fn a_user_name_that_is_not_a_jid_counts_against_the_address_only() {
        let auth = authenticator(Duration::from_secs(60));
        let guesser: IpAddr = "198.51.100.11".parse().expect("ip");
        let long = "x".repeat(100_000);
        for _ in 0..6 {
            assert!(matches!(auth.authenticate(&basic(&long, "guess"), guesser).await, Err(Error::Unauthorized)));
        }
        assert!(
            matches!(
                auth.authenticate(&basic("a@example.com", "guess"), guesser).await,
                Err(Error::TooManyAttempts(_))
            ),
            "the address is locked"
        );
        let other: IpAddr = "203.0.113.2".parse().expect("ip");
        auth.authenticate(&basic("a@example.com", "s3cret:with colon"), other).await.expect("no account was locked");
        assert_eq!(shown(&long).len(), 64);
        assert_eq!(shown("é".repeat(70).as_str()).chars().count(), 64);
    }

    #[test]
    fn a_cached_login_lasts_while_it_is_used() {
        let ttl = Duration::from_secs(300);
        let auth = authenticator(ttl);
        let jid = Sender::parse("a@example.com").expect("jid");
        let key = auth.cache_key(&basic("a@example.com", "s3cret:with colon"));
        let start = Instant::now();
        auth.remember_at(key, jid.clone(), start);
        // Used every 200 s, it outlives the first 300 s many times over.
        for step in 1..=10u32 {
            let at = start + Duration::from_secs(200) * step;
            assert_eq!(auth.cached_at(&key, at).as_ref(), Some(&jid), "still cached at step {step}");
        }
        // Unused for a whole TTL, it is gone.
        assert_eq!(auth.cached_at(&key, start + Duration::from_secs(2000) + ttl), None);
        // Other credentials, or another user's, have keys of their own.
        for (user, password) in [("a@example.com", "s3cret:with colo"), ("b@example.com", "s3cret:with colon")] {
            assert_ne!(auth.cache_key(&basic(user, password)), key, "{user}:{password}");
        }
    }

    #[tokio::test]
    async fn a_zero_ttl_disables_the_cache() {
        let auth = authenticator(Duration::ZERO);
        auth.authenticate(&basic("a@example.com", "s3cret:with colon"), CLIENT).await.expect("ok");
        assert!(auth.cache.lock().expect("lock").is_empty());
    }
}
