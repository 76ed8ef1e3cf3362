//! The users file: who may post, with which password, as which sender.
//!
//! ```toml
//! [[users]]
//! jid = "alerts@example.com"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! from = "noc@example.com"   # optional: send as this JID instead
//! allow = ["oncall@example.com", "*@conference.example.com"]  # optional
//! rate = "10/s"                # optional, with optional burst = 100
//! ```
//!
//! `allow`, `rate` and `burst` are the user's [`Policy`].

use crate::error::Error;
use crate::policy::Policy;
use argon2::PasswordHash;
use herald_shared::Sender;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    jid: String,
    password_hash: String,
    from: Option<String>,
    allow: Option<Vec<String>>,
    rate: Option<String>,
    burst: Option<u32>,
}

/// One user, checked at load time: a valid bare JID, a parseable argon2 PHC
/// string, a valid sender, a valid policy.
#[derive(Debug, Clone)]
pub struct User {
    pub jid: Sender,
    pub password_hash: String,
    /// Whom messages from this user are sent as.
    pub sender: Sender,
    /// Shared by every request of this user (the rate limit's bucket).
    pub policy: std::sync::Arc<Policy>,
}

#[derive(Debug, Default)]
pub struct Users {
    by_jid: HashMap<Sender, User>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read users file {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("users file {}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: UsersFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_jid = HashMap::new();
        for entry in file.users {
            let jid = Sender::parse(&entry.jid).map_err(|e| e.to_string())?;
            PasswordHash::new(&entry.password_hash)
                .map_err(|e| format!("user {jid}: password_hash is not a PHC string: {e}"))?;
            let sender = match entry.from {
                Some(from) => Sender::parse(&from).map_err(|e| format!("user {jid}: from: {e}"))?,
                None => jid.clone(),
            };
            let policy = Policy::parse(entry.allow, entry.rate.as_deref(), entry.burst)
                .map_err(|e| format!("user {jid}: {e}"))?;
            let user = User {
                jid: jid.clone(),
                password_hash: entry.password_hash,
                sender,
                policy: std::sync::Arc::new(policy),
            };
            if by_jid.insert(jid.clone(), user).is_some() {
                return Err(format!("user {jid} is listed twice"));
            }
        }
        Ok(Self { by_jid })
    }

    pub fn get(&self, jid: &Sender) -> Option<&User> {
        self.by_jid.get(jid)
    }

    pub fn len(&self) -> usize {
        self.by_jid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_jid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$WnHQp6Ojyh1hMgrlCuNeyjYYyNuTvBJh9oiEzpFOdTk";

    #[test]
    fn parses_users_with_and_without_from() {
        let users = Users::parse(&format!(
            "[[users]]\njid = \"a@example.com\"\npassword_hash = \"{HASH}\"\n\
             [[users]]\njid = \"B@Example.com\"\npassword_hash = \"{HASH}\"\nfrom = \"noc@example.com\"\n"
        ))
        .expect("valid");
        let a = users.get(&Sender::parse("a@example.com").expect("jid")).expect("a");
        assert_eq!(a.sender.to_string(), "a@example.com");
        let b = users.get(&Sender::parse("b@example.com").expect("jid")).expect("b, normalised");
        assert_eq!(b.sender.to_string(), "noc@example.com");
    }

    #[test]
    fn refuses_bad_entries() {
        assert!(Users::parse("[[users]]\njid = \"a@example.com\"\npassword_hash = \"plain\"\n").is_err());
        assert!(Users::parse(&format!("[[users]]\njid = \"example.com\"\npassword_hash = \"{HASH}\"\n")).is_err());
        assert!(Users::parse(&format!("[[users]]\njid = \"a@x\"\npassword_hash = \"{HASH}\"\npasword = 1\n")).is_err());
        let twice = format!("[[users]]\njid = \"a@x\"\npassword_hash = \"{HASH}\"\n");
        assert!(Users::parse(&format!("{twice}{twice}")).is_err());
    }
}
