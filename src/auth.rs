//! Who is calling: tokens for the API and the dashboard.
//!
//! The admin token comes from the configuration (a secret); tenant tokens are made by the
//! admin through the API and stored as SHA-256 hashes. Tokens are 192 random bits, so a
//! fast hash is enough: nothing is gained by making a lookup slow.
//!
//! A token arrives as `Authorization: Bearer <token>` (clients, scripts) or as the
//! password of `Authorization: Basic …` (browsers: the dashboard's script cannot set a
//! header on its own, but the browser resends the Basic credentials it was asked for on
//! every same-origin request).

use rand::Rng;
use rand::distributions::Alphanumeric;
use sha2::{Digest, Sha256};

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator: may do everything, sees every tenant's rentals.
    Admin,
    /// A tenant: rents, sees and releases only its own rentals.
    Tenant(TenantToken),
}

/// The live tenant token a request was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantToken {
    pub tenant: String,
    /// The token's id (never the token): rentals record it, so that revoking the token
    /// can end them.
    pub token_id: String,
    /// This token's limit on the tenant's live rentals, over the configured default.
    pub max_rentals: Option<u32>,
}

impl Caller {
    /// The tenant the caller's rentals belong to.
    pub fn tenant(&self) -> &str {
        match self {
            Caller::Admin => ADMIN_TENANT,
            Caller::Tenant(t) => &t.tenant,
        }
    }

    /// `None` for the admin (sees everything), else the tenant to filter on.
    pub fn scope(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(&t.tenant),
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

/// The password of an `Authorization: Basic base64(user:password)` header value; the
/// user name is ignored (a browser's login prompt insists on one).
pub fn basic_password(header: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_user, password) = decoded.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// The token of an `Authorization` header value, Bearer or Basic.
pub fn presented_token(header: &str) -> Option<String> {
    bearer(header)
        .map(str::to_owned)
        .or_else(|| basic_password(header))
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

    fn basic(credentials: &str) -> String {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }

    #[test]
    fn basic_headers_yield_the_password_whatever_the_user() {
        assert_eq!(basic_password(&basic("x:tok")), Some("tok".into()));
        assert_eq!(basic_password(&basic(":tok")), Some("tok".into()));
        // Only the first colon separates: a password may contain more.
        assert_eq!(basic_password(&basic("admin:a:b")), Some("a:b".into()));
        assert_eq!(
            basic_password(&format!("basic  {} ", &basic("u:p")[6..])),
            Some("p".into())
        );
    }

    #[test]
    fn malformed_basic_headers_are_refused() {
        assert_eq!(basic_password(&basic("user:")), None, "empty password");
        assert_eq!(basic_password(&basic("no-colon")), None);
        assert_eq!(basic_password("Basic !!!not-base64"), None);
        assert_eq!(basic_password("Basic "), None);
        assert_eq!(basic_password("Basic /w=="), None, "not UTF-8");
        assert_eq!(
            basic_password(&basic("u:p").replace("Basic", "Bearer")),
            None
        );
    }

    #[test]
    fn a_token_is_taken_from_either_scheme() {
        assert_eq!(presented_token("Bearer abc"), Some("abc".into()));
        assert_eq!(presented_token(&basic("x:abc")), Some("abc".into()));
        assert_eq!(presented_token("Digest abc"), None);
        assert_eq!(presented_token(""), None);
    }
}
