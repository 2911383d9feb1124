//! The words of the domain and the validation of what clients send.
//!
//! Everything a client hands over that later reaches a worker (a username, a public key)
//! is checked here, before anything is written or run, so that a bad value gets a precise
//! message and changes nothing.

use std::fmt;

use rand::Rng;
use rand::distributions::Alphanumeric;
use serde::{Deserialize, Serialize};

/// What the probes last concluded about a worker.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    sqlx::Encode,
    sqlx::Decode,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum WorkerStatus {
    /// Never probed since it entered the inventory: not offered to anyone.
    Unknown,
    /// Answered `alive_after` probes in a row: may be rented.
    Alive,
    /// Failed `dead_after` probes in a row: its rentals must move elsewhere.
    Dead,
}

/// Where a rental is in its life.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    sqlx::Encode,
    sqlx::Decode,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum RentalStatus {
    /// A worker is claimed and the tenant's account is being created on it.
    Provisioning,
    /// The account exists on the current worker; the client can log in.
    Active,
    /// The worker died; the account is being created on a new worker, with the same
    /// username and credentials.
    Migrating,
    /// The worker died and no other is free: the rental has no placement and is moved as
    /// soon as a worker frees up.
    Waiting,
    /// The client asked for release; the account is being removed.
    Releasing,
    /// Over: the worker was given back. Kept for the record.
    Released,
    /// Provisioning failed at rent time; the client got an error. Kept for the record.
    Failed,
}

impl RentalStatus {
    /// Whether a rental in this state will be active again without anyone asking: it is
    /// being made, moved, or waits for a worker to move to.
    pub fn may_become_active(self) -> bool {
        matches!(
            self,
            RentalStatus::Active
                | RentalStatus::Provisioning
                | RentalStatus::Migrating
                | RentalStatus::Waiting
        )
    }
}

/// The part a worker plays for one rental, recorded in the placement history.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    sqlx::Encode,
    sqlx::Decode,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum PlacementState {
    /// The tenant's account is being created on the worker.
    Provisioning,
    /// The worker serves the rental.
    Active,
    /// The rental has left (released, failed or moved) but its account may still be on
    /// the worker: the worker is not offered again until the account is removed.
    Stale,
    /// The account is gone from the worker; the placement is history.
    Released,
}

/// The status enums are stored as lowercase names in `VARCHAR` columns. sqlx's derived
/// `Type` for a MySQL enum expects a column of the `ENUM` type and refuses a `VARCHAR`, so
/// `Encode`/`Decode` are derived (by name) and `Type` is that of a string.
macro_rules! varchar_type {
    ($($ty:ty),+) => {$(
        impl sqlx::Type<sqlx::MySql> for $ty {
            fn type_info() -> sqlx::mysql::MySqlTypeInfo {
                <str as sqlx::Type<sqlx::MySql>>::type_info()
            }
            fn compatible(ty: &sqlx::mysql::MySqlTypeInfo) -> bool {
                <str as sqlx::Type<sqlx::MySql>>::compatible(ty)
            }
        }
    )+};
}

pub(crate) use varchar_type;

varchar_type!(WorkerStatus, RentalStatus, PlacementState);

/// A client value that cannot be used, with a message saying what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub message: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Names of accounts *and groups* that exist on Debian systems (the worker image's and a
/// plain host's, with the packages Orion's workers may carry), or that a tenant must never
/// take over. A rental's account gets a group of its own name, so a group's name is as
/// taken as a user's: a rent naming one would be refused by the worker, which is the
/// request's fault, so it is refused here first (422) before anything runs. A test
/// checks every user and group of the worker image is on this list.
const RESERVED_USERNAMES: &[&str] = &[
    "orion-tenants",
    "dialout",
    "fax",
    "voice",
    "cdrom",
    "floppy",
    "tape",
    "audio",
    "dip",
    "src",
    "video",
    "sasl",
    "plugdev",
    "input",
    "kvm",
    "render",
    "netdev",
    "crontab",
    "docker",
    "podman",
    "lxd",
    "polkitd",
    "tss",
    "uuidd",
    "ssl-cert",
    "sgx",
    "systemd-journal",
    "systemd-coredump",
    "systemd-network",
    "avahi",
    "dnsmasq",
    "ntp",
    "chrony",
    "statd",
    "rdma",
    "lpadmin",
    "scanner",
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "systemd-resolve",
    "systemd-timesync",
    "messagebus",
    "sshd",
    "_apt",
    "admin",
    "operator",
    "ubuntu",
    "debian",
    "orion",
    "mysql",
    "postgres",
    "ansible",
    "adm",
    "staff",
    "sudo",
    "shadow",
    "utmp",
    "tty",
    "disk",
    "kmem",
    "wheel",
    "users",
    "nogroup",
];

/// A tenant's login name on a worker: a safe POSIX subset, never a system account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Username(String);

impl Username {
    /// Lowercase letter first, then lowercase letters, digits, `_` or `-`; at most 32
    /// characters (the Linux limit), and not a reserved name.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let bad = |m: String| Err(InvalidInput::new("username", m));
        if value.is_empty() || value.len() > 32 {
            return bad(format!(
                "must be 1 to 32 characters long (got {})",
                value.chars().count()
            ));
        }
        if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
            return bad("must start with a lowercase letter".into());
        }
        if let Some(c) = value
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            return bad(format!(
                "may only hold lowercase letters, digits, `_` and `-` (found {c:?})"
            ));
        }
        if RESERVED_USERNAMES.contains(&value) {
            return bad(format!("`{value}` is reserved for the system"));
        }
        Ok(Self(value.to_owned()))
    }

    /// A fresh name for a rental that did not ask for one: `t` and 8 random characters.
    pub fn generate() -> Self {
        let suffix: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .map(|b| (b as char).to_ascii_lowercase())
            .take(8)
            .collect();
        Self(format!("t{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant's SSH public key: exactly one key, parsed, without options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKey(String);

impl TenantKey {
    /// Accepts one OpenSSH public key line (`type base64 [comment]`). The key is parsed
    /// and written back in canonical form, so what reaches `authorized_keys` is only a key:
    /// no `command=` options, no second line, no comment.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let bad = |m: &str| Err(InvalidInput::new("ssh_public_key", m));
        let trimmed = value.trim_end_matches(['\n', '\r']);
        if trimmed.contains(['\n', '\r']) {
            return bad("must be a single line holding a single key");
        }
        if trimmed.len() > 16 * 1024 {
            return bad("is longer than 16 KiB");
        }
        if trimmed.chars().any(|c| c.is_control()) {
            return bad("must not contain control characters");
        }
        let mut key = russh::keys::PublicKey::from_openssh(trimmed.trim()).map_err(|_| {
            InvalidInput::new(
                "ssh_public_key",
                "is not an OpenSSH public key (expected `ssh-ed25519 AAAA…`, no options)",
            )
        })?;
        key.set_comment("");
        let canonical = key
            .to_openssh()
            .map_err(|_| InvalidInput::new("ssh_public_key", "cannot be encoded"))?;
        Ok(Self(canonical))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tenant's name, as given to `POST /api/tokens`.
pub fn parse_tenant(value: &str) -> Result<String, InvalidInput> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        return Err(InvalidInput::new(
            "tenant",
            "must be 1 to 64 letters, digits, `_`, `-` or `.`, starting with a letter or digit",
        ));
    }
    if value.eq_ignore_ascii_case(crate::auth::ADMIN_TENANT) {
        return Err(InvalidInput::new(
            "tenant",
            "`admin` is reserved for the admin token",
        ));
    }
    Ok(value.to_owned())
}

/// Where Orion POSTs a rental's new connection details after a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyUrl(String);

/// A rental's time to live as a client sends it: seconds, or a duration such as `"2h"`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TtlInput {
    Seconds(u64),
    Text(String),
}

/// Shortest `ttl` accepted: less could expire before the tenant has logged in.
pub const MIN_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl TtlInput {
    /// The duration, between [`MIN_TTL`] and `max`.
    pub fn parse(&self, max: std::time::Duration) -> Result<std::time::Duration, InvalidInput> {
        let ttl = match self {
            TtlInput::Seconds(s) => std::time::Duration::from_secs(*s),
            TtlInput::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
                InvalidInput::new(
                    "ttl",
                    format!("`{t}` is not a duration (seconds, or e.g. \"90m\", \"2h\"): {e}"),
                )
            })?,
        };
        if ttl < MIN_TTL {
            return Err(InvalidInput::new("ttl", "must be at least 1 minute"));
        }
        if ttl > max {
            return Err(InvalidInput::new(
                "ttl",
                format!("must be at most {}", humantime::format_duration(max)),
            ));
        }
        Ok(ttl)
    }
}

impl NotifyUrl {
    /// An absolute `http` or `https` URL with a host, without credentials, at most 2 KiB.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let bad = |m: &str| Err(InvalidInput::new("notify_url", m));
        if value.len() > 2048 {
            return bad("is longer than 2048 characters");
        }
        let Ok(url) = url::Url::parse(value) else {
            return bad("is not an absolute URL");
        };
        if !matches!(url.scheme(), "http" | "https") {
            return bad("must be an http or https URL");
        }
        if url.host_str().is_none_or(str::is_empty) {
            return bad("must name a host");
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad("must not carry credentials");
        }
        Ok(Self(url.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Generates the password handed to a tenant who gave no key: 24 random alphanumerics
/// (about 143 bits).
pub fn generate_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .map(char::from)
        .take(24)
        .collect()
}

/// Hashes a password as SHA-512 crypt (`$6$…`), the form `/etc/shadow` understands, so the
/// same hash can be applied on any worker the rental moves to without keeping the password.
pub fn hash_password(password: &str) -> String {
    let params =
        sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT).expect("default rounds are valid");
    sha_crypt::sha512_simple(password, &params).expect("hashing a password cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_usernames_are_accepted() {
        for name in ["alice", "bob_2", "ci-runner", "a"] {
            assert!(Username::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn hostile_usernames_are_refused_with_a_reason() {
        for name in [
            "",
            "Alice",
            "1abc",
            "a;rm -rf /",
            "a b",
            "a\nb",
            "$(id)",
            "a'b",
            "-x",
            "abcdefghijklmnopqrstuvwxyz0123456789",
            "root",
            "sshd",
            "é",
        ] {
            let err = Username::parse(name).unwrap_err();
            assert_eq!(err.field, "username");
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn generated_usernames_are_valid() {
        for _ in 0..100 {
            let name = Username::generate();
            assert_eq!(Username::parse(name.as_str()).unwrap(), name);
        }
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPGmoeQtEFLPvpG1nEm0qOGCMmviF+bRgDjkt8J0nQ+b";

    #[test]
    fn a_key_loses_its_comment_and_trailing_newline() {
        let key = TenantKey::parse(&format!("{KEY} alice@laptop\n")).unwrap();
        assert_eq!(key.as_str(), KEY);
    }

    #[test]
    fn keys_with_options_newlines_or_garbage_are_refused() {
        for bad in [
            format!("command=\"/bin/sh\" {KEY}"),
            format!("{KEY}\n{KEY}"),
            format!("{KEY}\rx"),
            "ssh-ed25519 not-base64".to_owned(),
            "hello".to_owned(),
            String::new(),
            format!("{KEY} \u{7}bell"),
        ] {
            assert!(TenantKey::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn notify_urls_must_be_http_or_https_with_a_host() {
        assert!(NotifyUrl::parse("https://client.example/hooks/orion").is_ok());
        assert!(NotifyUrl::parse("http://127.0.0.1:9000/x").is_ok());
        for bad in [
            "ftp://x/y",
            "file:///etc/passwd",
            "/relative",
            "javascript:alert(1)",
            "http://user:pw@host/",
            "",
        ] {
            let err = NotifyUrl::parse(bad).unwrap_err();
            assert_eq!(err.field, "notify_url", "{bad}");
        }
    }

    #[test]
    fn a_password_hash_verifies_and_never_contains_the_password() {
        let password = generate_password();
        assert_eq!(password.len(), 24);
        let hash = hash_password(&password);
        assert!(hash.starts_with("$6$"));
        assert!(!hash.contains(&password));
        assert!(sha_crypt::sha512_check(&password, &hash).is_ok());
    }

    /// Each variant's name (strum) is its JSON (serde), both ways.
    fn round_trips<T>(variants: &[T])
    where
        T: fmt::Display + std::str::FromStr + Serialize + serde::de::DeserializeOwned,
        T: PartialEq + fmt::Debug,
        <T as std::str::FromStr>::Err: fmt::Debug,
    {
        for s in variants {
            assert_eq!(s.to_string().parse::<T>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.to_string());
            assert_eq!(
                serde_json::from_value::<T>(s.to_string().into()).unwrap(),
                *s
            );
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        use strum::VariantArray;
        round_trips(WorkerStatus::VARIANTS);
        round_trips(RentalStatus::VARIANTS);
        round_trips(PlacementState::VARIANTS);
        assert_eq!(RentalStatus::Provisioning.to_string(), "provisioning");
        assert!("zombie".parse::<WorkerStatus>().is_err());
        assert!(serde_json::from_str::<RentalStatus>("\"Active\"").is_err());
    }
}
