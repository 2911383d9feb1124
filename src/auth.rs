//! Who is calling: bearer tokens for the API.
//!
//! The admin token comes from the configuration (a secret); tenant tokens are made by the
//! admin through the API and stored as SHA-256 hashes. Tokens are 192 random bits, so a
//! fast hash is enough: nothing is gained by making a lookup slow.

use rand::Rng;
use rand::distributions::Alphanumeric;
use sha2::{Digest, Sha256};

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator: may do everything, sees every tenant's rentals.
    Admin,
    /// A tenant: rents, sees and releases only its own rentals.
    Tenant(String),
}

impl Caller {
    /// The tenant the caller's rentals belong to.
    pub fn tenant(&self) -> &str {
        match self {
            Caller::Admin => ADMIN_TENANT,
            Caller::Tenant(t) => t,
        }
    }

    /// `None` for the admin (sees everything), else the tenant to filter on.
    pub fn scope(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(t),
        }
    }
}

/// Tenant name of rentals made with the admin token.
pub const ADMIN_TENANT: &str = "admin";

/// Prefix of tokens Orion makes, so they are recognisable in a leaked-secrets scan.
const TOKEN_PREFIX: &str = "orn_";

/// A fresh tenant token: `orn_` and 32 random alphanumerics (≈ 190 bits).
pub fn generate_token() -> String {
    let secret: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .map(char::from)
        .take(32)
        .collect();
    format!("{TOKEN_PREFIX}{secret}")
}

/// What is stored for a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_prefixed() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(a.starts_with("orn_") && a.len() == 36);
    }

    #[test]
    fn the_hash_is_stable_hex_and_not_the_token() {
        let t = generate_token();
        let h = token_hash(&t);
        assert_eq!(h, token_hash(&t));
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&t[4..]));
    }

    #[test]
    fn bearer_headers_are_parsed_strictly() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
