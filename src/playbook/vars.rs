//! The values a playbook is rendered with, one struct per kind of playbook (accounts,
//! apps, host certificates, homes): what the templates may print, and nothing else.

use serde::Serialize;

/// The values a playbook is rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct Vars {
    pub username: String,
    /// The account's uid on the worker, Orion's own and never handed to a second tenant
    /// (see [`crate::store::Store::claim_worker_for`]). `None` only when removing an
    /// account made before Orion allocated uids: then the account's own uid is used,
    /// if the account is Orion's.
    pub uid: Option<u32>,
    /// One canonical OpenSSH key line, or none.
    pub public_key: Option<String>,
    /// SHA-512 crypt hash for `/etc/shadow`, or none (key-only login).
    pub password_hash: Option<String>,
}

/// The values an app playbook is rendered with: the spec `orion-runtime` reads on its
/// stdin, as JSON in one base64 word, so that neither the shell nor Ansible's templating
/// ever reads what a tenant wrote.
#[derive(Debug, Clone, Serialize)]
pub struct AppVars {
    pub spec: String,
}

impl AppVars {
    /// The values that hand `spec` to `orion-runtime`.
    pub fn new(spec: &impl Serialize) -> Self {
        use base64::Engine as _;
        let json = serde_json::to_vec(spec).expect("specs serialise");
        Self {
            spec: base64::engine::general_purpose::STANDARD.encode(json),
        }
    }
}

/// The values `host_cert` is rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct CertVars {
    /// The certificate, one OpenSSH line.
    pub certificate: String,
    /// The host key it certifies (the one Orion trusts), one OpenSSH line.
    pub host_key: String,
}

/// The values the home playbooks ([`Playbook::STREAMS`]) are rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct HomeVars {
    pub username: String,
    /// The account's uid on the worker.
    pub uid: u32,
    /// The last snapshot's fingerprint (`snapshot_home`; empty: none).
    pub fingerprint: String,
    /// A planned move's last snapshot: the tenant's sessions end first (`snapshot_home`).
    pub r#final: bool,
    /// The largest home snapshotted, in bytes of its files' apparent size, measured
    /// before anything is streamed (`snapshot_home`: `snapshots.max_bytes`).
    pub max_bytes: u64,
    /// Seconds the worker lets the commands run as the tenant live: the tenant can stop
    /// its own, not root's `timeout`, so what Orion gave up on at `snapshots.deadline`
    /// does not linger on the worker.
    pub deadline: u64,
}

/// What a playbook sees: the rental's values and the uid floor from the configuration.
#[derive(Serialize)]
pub(super) struct Rendered<'a> {
    #[serde(flatten)]
    pub(super) vars: &'a Vars,
    pub(super) uid_min: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_one_shell_word_whatever_they_hold() {
        use base64::Engine as _;
        let spec = serde_json::json!({"node": "n", "names": ["'; rm -rf / #\n$(id)"]});
        let word = AppVars::new(&spec).spec;
        assert!(
            word.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
        );
        let back = base64::engine::general_purpose::STANDARD
            .decode(word)
            .unwrap();
        assert!(String::from_utf8(back).unwrap().contains("rm -rf"));
    }
}
