//! Per-user policy from the users file: whom a user may send to, and how
//! fast.
//!
//! ```toml
//! [[users]]
//! jid = "alertmanager@example.com"
//! password_hash = "…"
//! allow = ["oncall@example.com", "*@conference.example.com"]   # default: anyone
//! rate = "10/s"      # messages per second, minute or hour; default: no limit
//! burst = 100        # messages allowed at once; default: the rate's count
//! ```
//!
//! The rate is a token bucket (GCRA, from `governor`) per user and per
//! ingress process: each message (one per recipient) takes a token.

use crate::error::Error;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_shared::Recipient;
use jid::{BareJid, DomainPart};
use std::num::NonZeroU32;
use std::time::Duration;

/// What a user may do; the default allows everything.
#[derive(Debug, Default)]
pub struct Policy {
    /// `None`: any recipient.
    allow: Option<Vec<Pattern>>,
    limit: Option<Limit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Exactly this bare JID (any resource).
    Jid(BareJid),
    /// `*@domain`: any account or room at this domain.
    Domain(DomainPart),
}

#[derive(Debug)]
struct Limit {
    bucket: DefaultDirectRateLimiter,
    burst: NonZeroU32,
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("*@") {
            Some(domain) => DomainPart::new(domain).map(|d| Self::Domain(d.into_owned())),
            None => BareJid::new(text).map(Self::Jid),
        }
        .map_err(|e| format!("allow entry {text:?} is neither a bare JID nor *@domain: {e}"))
    }

    fn matches(&self, to: &Recipient) -> bool {
        let jid = to.jid();
        match self {
            Self::Jid(bare) => jid.to_bare() == *bare,
            Self::Domain(domain) => jid.node().is_some() && jid.domain() == &**domain,
        }
    }
}

impl Policy {
    /// From a users file entry's `allow`, `rate` and `burst`.
    pub fn parse(allow: Option<Vec<String>>, rate: Option<&str>, burst: Option<u32>) -> Result<Self, String> {
        let allow = allow
            .map(|entries| entries.iter().map(|e| Pattern::parse(e)).collect::<Result<Vec<_>, _>>())
            .transpose()?;
        let limit = match (rate, burst) {
            (None, None) => None,
            (None, Some(_)) => return Err("burst needs a rate".into()),
            (Some(rate), burst) => Some(Limit::parse(rate, burst)?),
        };
        Ok(Self { allow, limit })
    }

    /// The first recipient the user may not send to, if any.
    pub fn forbidden<'a>(&self, recipients: impl IntoIterator<Item = &'a Recipient>) -> Option<&'a Recipient> {
        let allow = self.allow.as_ref()?;
        recipients.into_iter().find(|to| !allow.iter().any(|pattern| pattern.matches(to)))
    }

    /// Takes one token per message, or says how long to wait.
    pub fn take(&self, messages: usize) -> Result<(), Error> {
        let Some(limit) = &self.limit else { return Ok(()) };
        let n = NonZeroU32::new(u32::try_from(messages).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match limit.bucket.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait =
                    not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                Err(Error::RateLimited(wait.as_secs() + 1))
            }
            Err(_) => Err(Error::Invalid(herald_shared::ValidationError::TooManyRecipients {
                count: messages,
                max: limit.burst.get() as usize,
            })),
        }
    }
}

impl Limit {
    /// `"10/s"`, `"600/min"`, `"1000/h"`.
    fn parse(rate: &str, burst: Option<u32>) -> Result<Self, String> {
        let bad = || format!("rate {rate:?} is not N/s, N/min or N/h with N > 0");
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        let burst = match burst {
            None => count,
            Some(b) => NonZeroU32::new(b).ok_or("burst must be at least 1")?,
        };
        let quota = Quota::with_period(period / count.get()).ok_or_else(bad)?.allow_burst(burst);
        Ok(Self { bucket: RateLimiter::direct(quota), burst })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(jid: &str) -> Recipient {
        Recipient::parse(jid, &DomainPart::new("example.com").expect("domain")).expect("recipient")
    }

    #[test]
    fn allow_lists_match_exact_jids_and_domains() {
        let policy = Policy::parse(Some(vec!["Oncall@Example.com".into(), "*@rooms.example.com".into()]), None, None)
            .expect("valid");
        assert_eq!(
            policy.forbidden(&[to("oncall@example.com"), to("oncall@example.com/phone"), to("ops@rooms.example.com")]),
            None
        );
        let refused = [to("ops@rooms.example.com"), to("eve@example.com")];
        assert_eq!(policy.forbidden(&refused), Some(&refused[1]));
        assert!(policy.forbidden(&[to("rooms.example.com")]).is_some(), "the domain itself is not *@domain");
        assert!(Policy::default().forbidden(&[to("anyone@anywhere.org")]).is_none(), "no list: anyone");
        assert!(Policy::parse(Some(vec!["*@".into()]), None, None).is_err());
        assert!(Policy::parse(Some(vec!["a@b/c".into()]), None, None).is_err(), "bare JIDs only");
    }

    #[test]
    fn the_bucket_allows_its_burst_then_refuses_with_a_wait() {
        let policy = Policy::parse(None, Some("1/h"), Some(3)).expect("valid");
        policy.take(2).expect("within the burst");
        policy.take(1).expect("the last token");
        match policy.take(1) {
            Err(Error::RateLimited(seconds)) => assert!((1..=3600).contains(&seconds), "{seconds}"),
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(matches!(policy.take(4), Err(Error::Invalid(_))), "more than the burst can ever hold");
    }

    #[test]
    fn rates_parse() {
        for good in ["10/s", "600/min", " 5 / h "] {
            Policy::parse(None, Some(good), None).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["0/s", "10", "10/day", "x/s", "-1/s"] {
            assert!(Policy::parse(None, Some(bad), None).is_err(), "{bad}");
        }
        assert!(Policy::parse(None, None, Some(5)).is_err());
        assert!(Policy::parse(None, Some("1/s"), Some(0)).is_err());
    }
}
