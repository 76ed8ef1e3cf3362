//! The users file: who may post, with which password, as which sender.
//!
//! ```toml
//! [[users]]
//! jid = "alerts@example.com"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! from = "noc@example.com"   # optional: send as this JID instead
//! allow = ["oncall@example.com", "*@conference.example.com"]  # optional
//! rate = "10/s"                # optional, with optional burst = 100
//!
//! [[tokens]]                   # an access token of a user above
//! user = "alerts@example.com"
//! name = "alertmanager"        # optional: a label for the logs
//! sha256 = "9f86d081…"         # the token's SHA-256, never the token
//! ```
//!
//! `allow`, `rate` and `burst` are the user's [`Policy`]; they apply to its
//! tokens too. Tokens (`hrld_` and 64 hex digits) are made by
//! `herald-ingress token new`.

use crate::error::Error;
use crate::policy::Policy;
use argon2::PasswordHash;
use herald_shared::Sender;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    user: String,
    name: Option<String>,
    sha256: String,
}

/// What every access token starts with, so that secret scanners find them.
pub const TOKEN_PREFIX: &str = "hrld_";

/// A token's SHA-256, the key it is found by.
pub type TokenDigest = [u8; 32];

/// The digest of a presented token.
pub fn token_digest(token: &str) -> TokenDigest {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A new token: the prefix and 32 random bytes in hex.
pub fn new_token() -> String {
    format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// A new token for `user`, and the `[[tokens]]` entry that lets it in.
pub fn new_token_entry(user: &str, name: Option<&str>) -> Result<(String, String), String> {
    let user = Sender::parse(user).map_err(|e| format!("--user: {e}"))?;
    let token = new_token();
    let mut entry = format!("[[tokens]]\nuser = \"{user}\"\n");
    if let Some(name) = name {
        entry.push_str(&format!("name = {}\n", toml::Value::String(name.to_owned())));
    }
    entry.push_str(&format!("sha256 = \"{}\"\n", hex::encode(token_digest(&token))));
    Ok((token, entry))
}

/// An access token of a user.
#[derive(Debug, Clone)]
pub struct Token {
    pub user: Sender,
    /// Its label in the logs (default: the first 8 hex digits of its digest).
    pub name: String,
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
    pub policy: Arc<Policy>,
}

#[derive(Debug, Default)]
pub struct Users {
    /// Shared with the requests that authenticated as them.
    by_jid: HashMap<Sender, Arc<User>>,
    tokens: HashMap<TokenDigest, Token>,
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
            let user = User { jid: jid.clone(), password_hash: entry.password_hash, sender, policy: Arc::new(policy) };
            if by_jid.insert(jid.clone(), Arc::new(user)).is_some() {
                return Err(format!("user {jid} is listed twice"));
            }
        }
        let mut tokens = HashMap::new();
        for entry in file.tokens {
            let user = Sender::parse(&entry.user).map_err(|e| format!("token of {}: {e}", entry.user))?;
            if !by_jid.contains_key(&user) {
                return Err(format!("a token of {user}, who is not a user in this file"));
            }
            let digest: TokenDigest = hex::decode(entry.sha256.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| format!("a token of {user}: sha256 is not 64 hex digits"))?;
            let name = entry.name.unwrap_or_else(|| hex::encode(&digest[..4]));
            if tokens.insert(digest, Token { user, name }).is_some() {
                return Err(format!("a token (sha256 {}) is listed twice", entry.sha256.trim()));
            }
        }
        Ok(Self { by_jid, tokens })
    }

    pub fn get(&self, jid: &Sender) -> Option<&Arc<User>> {
        self.by_jid.get(jid)
    }

    /// The user a presented token belongs to, and the token.
    pub fn by_token(&self, token: &str) -> Option<(&Arc<User>, &Token)> {
        let token = self.tokens.get(&token_digest(token))?;
        Some((self.by_jid.get(&token.user)?, token))
    }

    pub fn tokens(&self) -> usize {
        self.tokens.len()
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

    #[test]
    fn finds_a_user_by_token_digest_only() {
        let token = new_token();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64, "{token}");
        let digest = hex::encode(token_digest(&token));
        let users = Users::parse(&format!(
            "[[users]]\njid = \"a@example.com\"\npassword_hash = \"{HASH}\"\n\
             [[tokens]]\nuser = \"A@example.com\"\nname = \"ci\"\nsha256 = \"{digest}\"\n"
        ))
        .expect("valid");
        let (user, found) = users.by_token(&token).expect("the token");
        assert_eq!((user.jid.to_string().as_str(), found.name.as_str()), ("a@example.com", "ci"));
        assert!(users.by_token(&new_token()).is_none());
        assert!(users.by_token(&digest).is_none(), "the digest is not the token");
    }

    #[test]
    fn a_new_token_entry_lets_its_token_in() {
        let (token, entry) = new_token_entry("a@x", Some("ci \"nightly\"")).expect("entry");
        let users =
            Users::parse(&format!("[[users]]\njid = \"a@x\"\npassword_hash = \"{HASH}\"\n{entry}")).expect("valid");
        assert_eq!(users.by_token(&token).expect("found").1.name, "ci \"nightly\"");
        assert!(!entry.contains(&token), "the entry holds the digest only");
        assert!(new_token_entry("not a jid", None).is_err());
    }

    #[test]
    fn refuses_bad_tokens() {
        let user = format!("[[users]]\njid = \"a@x\"\npassword_hash = \"{HASH}\"\n");
        let digest = hex::encode(token_digest("hrld_x"));
        for token in [
            format!("[[tokens]]\nuser = \"b@x\"\nsha256 = \"{digest}\"\n"),
            "[[tokens]]\nuser = \"a@x\"\nsha256 = \"abc\"\n".to_owned(),
            format!("[[tokens]]\nuser = \"a@x\"\ntoken = \"{digest}\"\n"),
        ] {
            assert!(Users::parse(&format!("{user}{token}")).is_err(), "{token}");
        }
        let once = format!("[[tokens]]\nuser = \"a@x\"\nsha256 = \"{digest}\"\n");
        assert!(Users::parse(&format!("{user}{once}{once}")).is_err());
    }
}
