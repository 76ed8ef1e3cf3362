//! The accounts file: the XMPP accounts the relay sends from.
//!
//! ```toml
//! [[accounts]]
//! jid = "alerts@example.com"
//! password = "…"
//! server = "xmpp.example.com:5222"   # optional: skip SRV lookup
//! tls = "required"                    # default (STARTTLS); "direct" (TLS from the start);
//!                                     # "none" only for loopback test servers
//! nick = "alerts"                     # optional: nickname in group chat rooms
//!                                     # (default: the JID's local part)
//! ```

use crate::error::Error;
use herald_shared::Sender;
use serde::Deserialize;
use std::fmt;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    #[serde(default)]
    accounts: Vec<AccountEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountEntry {
    jid: String,
    password: String,
    server: Option<String>,
    #[serde(default)]
    tls: Tls,
    nick: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    /// STARTTLS with certificate verification.
    #[default]
    Required,
    /// Direct TLS (XEP-0368, usually port 5223) with certificate
    /// verification; needs `server`, or `_xmpps-client` SRV records.
    Direct,
    /// Plaintext: only for a test server on the loopback interface.
    None,
}

/// Where to connect: a host and port, or SRV records of the JID's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

#[derive(Clone)]
pub struct Account {
    pub jid: Sender,
    pub password: String,
    pub server: Option<ServerAddr>,
    pub tls: Tls,
    /// The nickname this account joins group chat rooms with.
    pub nick: String,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("jid", &self.jid)
            .field("password", &"***")
            .field("server", &self.server)
            .field("tls", &self.tls)
            .field("nick", &self.nick)
            .finish()
    }
}

pub fn load(path: &Path) -> Result<Vec<Account>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read accounts file {}: {e}", path.display())))?;
    parse(&text).map_err(|e| Error::Config(format!("accounts file {}: {e}", path.display())))
}

pub fn parse(text: &str) -> Result<Vec<Account>, String> {
    let file: AccountsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut accounts: Vec<Account> = Vec::new();
    for entry in file.accounts {
        let jid = Sender::parse(&entry.jid).map_err(|e| e.to_string())?;
        if accounts.iter().any(|a| a.jid == jid) {
            return Err(format!("account {jid} is listed twice"));
        }
        let server =
            entry.server.as_deref().map(parse_server).transpose().map_err(|e| format!("account {jid}: {e}"))?;
        if entry.tls == Tls::None && !server.as_ref().is_some_and(is_loopback) {
            return Err(format!(
                "account {jid}: tls = \"none\" is only allowed with a loopback server (127.0.0.1, ::1, localhost)"
            ));
        }
        let nick = match entry.nick {
            Some(nick) if nick.trim().is_empty() || nick.len() > 1023 => {
                return Err(format!("account {jid}: nick must be 1 to 1023 bytes"));
            }
            Some(nick) => nick,
            None => jid.jid().node().map_or_else(|| "herald".to_owned(), |n| n.as_str().to_owned()),
        };
        accounts.push(Account { jid, password: entry.password, server, tls: entry.tls, nick });
    }
    Ok(accounts)
}

fn parse_server(text: &str) -> Result<ServerAddr, String> {
    let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("server {text:?} must be host:port"))?;
    let port = port.parse().map_err(|_| format!("server {text:?} has an invalid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("server {text:?} has no host"));
    }
    Ok(ServerAddr { host: host.to_owned(), port })
}

fn is_loopback(server: &ServerAddr) -> bool {
    server.host == "localhost" || server.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accounts() {
        let accounts = parse(
            "[[accounts]]\njid = \"a@example.com\"\npassword = \"p\"\n\
             [[accounts]]\njid = \"b@example.com\"\npassword = \"q\"\nserver = \"127.0.0.1:5222\"\ntls = \"none\"\n",
        )
        .expect("valid");
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[0].tls, Tls::Required);
        assert_eq!(accounts[1].server, Some(ServerAddr { host: "127.0.0.1".into(), port: 5222 }));
        assert!(!format!("{:?}", accounts[0]).contains("\"p\""), "password must not be printed");
    }

    #[test]
    fn plaintext_only_on_loopback() {
        assert!(parse("[[accounts]]\njid = \"a@x\"\npassword = \"p\"\ntls = \"none\"\n").is_err());
        assert!(
            parse("[[accounts]]\njid = \"a@x\"\npassword = \"p\"\nserver = \"10.0.0.1:5222\"\ntls = \"none\"\n")
                .is_err()
        );
        assert!(
            parse("[[accounts]]\njid = \"a@x\"\npassword = \"p\"\nserver = \"[::1]:5222\"\ntls = \"none\"\n").is_ok()
        );
    }

    #[test]
    fn refuses_bad_entries() {
        assert!(parse("[[accounts]]\njid = \"x\"\npassword = \"p\"\n").is_err());
        assert!(parse("[[accounts]]\njid = \"a@x\"\npassword = \"p\"\nserver = \"nohost\"\n").is_err());
        assert!(parse("[[accounts]]\njid = \"a@x\"\npassword = \"p\"\ntls = \"maybe\"\n").is_err());
    }
}
