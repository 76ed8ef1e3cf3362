//! Verifying a password against an argon2 PHC string, in memory that is
//! reused.
//!
//! argon2id as the users file has it (m = 19 MiB) needs 19 MiB of working
//! memory per check. `argon2`'s own `verify_password` allocates it for each
//! check, and glibc keeps such blocks around (its mmap threshold grows with
//! every large free): a burst of wrong guesses left the ingress at hundreds
//! of MiB. Here each check borrows a buffer from a small pool, as many as
//! checks may run at once (`admission`), so memory stays at that many
//! buffers whatever the number of checks.

use std::sync::Mutex;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version, password_hash::Output};

/// Working memory for argon2 checks, kept between them.
#[derive(Debug)]
pub struct Verifier {
    /// Idle buffers; at most `keep` are kept.
    pool: Mutex<Vec<Vec<Block>>>,
    keep: usize,
}

impl Verifier {
    /// Keeps up to `keep` buffers: as many as checks run at once.
    pub fn new(keep: usize) -> Self {
        Self { pool: Mutex::new(Vec::new()), keep }
    }

    /// Whether `password` matches the PHC string `phc`. A string that does
    /// not parse, or names parameters argon2 refuses, matches nothing.
    pub fn verify(&self, phc: &str, password: &[u8]) -> bool {
        let Ok(hash) = PasswordHash::new(phc) else { return false };
        let Some(expected) = hash.hash else { return false };
        let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else { return false };
        let version = match hash.version.map(Version::try_from).transpose() {
            Ok(version) => version.unwrap_or_default(),
            Err(_) => return false,
        };
        let Ok(params) = Params::try_from(&hash) else { return false };
        let mut salt = [0u8; 64];
        let Some(salt) = hash.salt.and_then(|s| s.decode_b64(&mut salt).ok()) else { return false };
        let mut blocks = self.take(params.block_count());
        let mut out = vec![0u8; expected.len()];
        let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
            password,
            salt,
            &mut out,
            &mut blocks[..],
        );
        self.give_back(blocks);
        // `Output`'s equality is constant-time.
        hashed.is_ok() && Output::new(&out).is_ok_and(|out| out == expected)
    }

    /// A buffer of exactly `count` blocks, from the pool if one is there.
    fn take(&self, count: usize) -> Vec<Block> {
        let mut blocks = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default();
        blocks.resize(count, Block::default());
        blocks.truncate(count);
        blocks
    }

    fn give_back(&self, blocks: Vec<Block>) {
        let mut pool = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < self.keep {
            pool.push(blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_as_argon2_does_and_reuses_its_memory() {
        let phc = crate::hash_password::hash("s3cret").expect("hash");
        let verifier = Verifier::new(1);
        assert!(verifier.verify(&phc, b"s3cret"));
        assert!(!verifier.verify(&phc, b"s3cres"));
        assert!(!verifier.verify(&phc, b""));
        assert!(!verifier.verify("not a phc string", b"s3cret"));
        assert!(!verifier.verify(&phc.replace("argon2id", "argon2x"), b"s3cret"));
        let pool = verifier.pool.lock().expect("lock");
        assert_eq!(pool.len(), 1, "one buffer kept");
        assert_eq!(pool[0].len(), 19 * 1024, "19 MiB of 1 KiB blocks");
    }

    #[test]
    fn agrees_with_other_parameters_and_algorithms() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").expect("salt");
        let verifier = Verifier::new(2);
        for (algorithm, m) in [(Algorithm::Argon2id, 4096), (Algorithm::Argon2i, 8192), (Algorithm::Argon2d, 1024)] {
            let params = Params::new(m, 1, 1, Some(16)).expect("params");
            let phc =
                Argon2::new(algorithm, Version::V0x13, params).hash_password(b"pw", &salt).expect("hash").to_string();
            assert!(verifier.verify(&phc, b"pw"), "{phc}");
            assert!(!verifier.verify(&phc, b"pW"), "{phc}");
        }
    }
}
