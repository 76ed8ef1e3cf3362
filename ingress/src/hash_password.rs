//! `herald-ingress hash-password`: the one way to make a users-file entry.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use std::io::{self, BufRead};

/// Reads one line from stdin and returns its argon2id PHC string.
pub fn from_stdin() -> Result<String, String> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).map_err(|e| format!("cannot read stdin: {e}"))?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err("empty password on stdin".into());
    }
    hash(password)
}

/// argon2id with the crate's defaults (m=19 MiB, t=2, p=1: OWASP's minimum).
pub fn hash(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash: {e}"))
}
