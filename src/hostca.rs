//! Orion's SSH host certificate authority: one key that vouches for every worker's host
//! key, so that a tenant's SSH client trusts one `@cert-authority` line instead of each
//! worker's key — and keeps trusting its endpoint when the rental moves to another worker.
//!
//! The CA signs only the host key Orion itself pinned for a worker (from the inventory,
//! or trusted on first use), never the key a worker presents: a worker whose key changes
//! is quarantined as before, and its old certificate names a key it no longer has.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::{PrivateKey, PublicKey};
use tokio::sync::RwLock;

use crate::config::Config;
use crate::playbook::{CertVars, Executor};
use crate::ssh::SshError;
use crate::store::{Store, Worker};

/// How far back a certificate's validity starts: a worker whose clock is a little
/// behind Orion's still presents a valid one.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// The CA's comment, in its public key line.
const COMMENT: &str = "orion-host-ca";

/// The host CA's key, loaded once at start.
pub struct HostCa {
    key: PrivateKey,
    /// Per worker, written while Orion reloads the worker's sshd for a new certificate and
    /// read by each probe of it ([`HostCa::not_reloading`]): for a moment, the reload
    /// drops new connections, and a probe then would take Orion's own doing for the
    /// worker's death (its rentals moved, its homes no longer snapshotted).
    reloads: std::sync::Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

/// Held while a worker is probed: Orion does not reload its sshd until it is dropped.
pub type NotReloading = tokio::sync::OwnedRwLockReadGuard<()>;

impl std::fmt::Debug for HostCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private half.
        f.debug_struct("HostCa")
            .field("public", &self.public_line())
            .finish()
    }
}

/// A certificate made for one worker.
#[derive(Debug, Clone)]
pub struct HostCertificate {
    /// The certificate as one OpenSSH line (`ssh-ed25519-cert-v01@openssh.com AAAA…`).
    pub line: String,
    /// The end of its validity.
    pub expires: DateTime<Utc>,
}

impl HostCa {
    /// Reads the CA key at `path`, or makes one there (mode 600) if there is no file.
    /// Like Orion's own key, a key others may read is refused.
    pub fn load_or_create(path: &Path) -> Result<Self, SshError> {
        if !path.exists() {
            let key = crate::ssh::generate_ed25519();
            write_private(&key, path).map_err(|message| SshError::Key {
                path: path.to_owned(),
                message,
            })?;
            tracing::info!(path = %path.display(), "made a new SSH host certificate authority");
        }
        Ok(Self::from_key(crate::ssh::load_private_key(path)?))
    }

    /// The CA for a key already in memory (tests).
    pub fn from_key(key: PrivateKey) -> Self {
        Self {
            key,
            reloads: Default::default(),
        }
    }

    /// Waits until Orion is not reloading `worker`'s sshd, and keeps it from starting
    /// to until the guard is dropped. A reload waiting holds off new probes (the lock
    /// prefers writers), so a stream of probes never delays a certificate for long.
    pub async fn not_reloading(&self, worker: &str) -> NotReloading {
        self.reload_lock(worker).read_owned().await
    }

    fn reload_lock(&self, worker: &str) -> Arc<RwLock<()>> {
        self.reloads
            .lock()
            .expect("reload locks poisoned")
            .entry(worker.to_owned())
            .or_default()
            .clone()
    }

    /// The CA's public key as one OpenSSH line.
    pub fn public_line(&self) -> String {
        let mut public = self.key.public_key().clone();
        public.set_comment(COMMENT);
        public.to_openssh().expect("a public key can be encoded")
    }

    /// The `known_hosts` lines that make an OpenSSH client trust every worker this CA
    /// signed, on any port of each of `names` (the gateway's endpoints, and port 22) —
    /// but not the host keys in `revoked` (quarantined or retired workers' keys, whose
    /// certificates are still within their validity).
    pub fn known_hosts(&self, names: &[String], revoked: &[String]) -> String {
        let patterns: Vec<String> = names
            .iter()
            .flat_map(|n| [n.clone(), format!("[{n}]:*")])
            .collect();
        let mut lines = format!(
            "@cert-authority {} {}\n",
            patterns.join(","),
            self.public_line()
        );
        for key in revoked {
            lines.push_str(&format!("@revoked * {}\n", key.trim()));
        }
        lines
    }

    /// Signs `host_key` as a host certificate for the worker `name`, valid for
    /// `principals` from an hour ago for `validity`.
    pub fn sign(
        &self,
        host_key: &PublicKey,
        name: &str,
        principals: &[String],
        validity: Duration,
    ) -> Result<HostCertificate, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?;
        let after = now.saturating_sub(CLOCK_SKEW).as_secs();
        let before = (now + validity).as_secs();
        let nonce: [u8; 32] = rand::random();
        let fail = |e: russh::keys::ssh_key::Error| format!("cannot sign {name}'s host key: {e}");
        let mut builder = Builder::new(nonce.to_vec(), host_key.key_data().clone(), after, before)
            .map_err(fail)?;
        builder.cert_type(CertType::Host).map_err(fail)?;
        builder.key_id(format!("orion:{name}")).map_err(fail)?;
        builder.serial(rand::random()).map_err(fail)?;
        for p in principals {
            builder.valid_principal(p.clone()).map_err(fail)?;
        }
        builder.comment(name.to_owned()).map_err(fail)?;
        let cert = builder.sign(&self.key).map_err(fail)?;
        let line = cert.to_openssh().map_err(fail)?;
        let expires = DateTime::<Utc>::from_timestamp(before as i64, 0)
            .ok_or_else(|| "validity out of range".to_owned())?;
        Ok(HostCertificate { line, expires })
    }
}

impl HostCa {
    /// Makes sure `worker` presents a certificate of this CA for the host key Orion
    /// trusts, valid for at least a quarter of `ssh.host_cert_validity` more: signs and
    /// installs a new one if not (`host_cert` playbook, which returns once sshd listens
    /// again), never while the worker is probed, and no probe of it starts meanwhile.
    /// Returns whether one was installed.
    pub async fn ensure_certificate(
        &self,
        executor: &Executor,
        store: &Store,
        config: &Config,
        worker: &Worker,
    ) -> anyhow::Result<bool> {
        let validity = config.ssh.host_cert_validity;
        if worker.host_cert_current(Utc::now() + validity / 4) {
            return Ok(false);
        }
        let Some(key_line) = worker.expected_host_key() else {
            anyhow::bail!("{} has no trusted host key yet", worker.name);
        };
        let key = crate::ssh::parse_host_key(key_line)
            .ok_or_else(|| anyhow::anyhow!("{}'s trusted host key cannot be read", worker.name))?;
        let cert = self
            .sign(&key, &worker.name, &principals(config, worker), validity)
            .map_err(anyhow::Error::msg)?;
        let vars = CertVars {
            certificate: cert.line,
            host_key: key_line.to_owned(),
        };
        let reloading = self.reload_lock(&worker.name).write_owned().await;
        executor.run_cert(&vars, &worker.target()).await?;
        drop(reloading);
        store
            .record_host_cert(worker, key_line, cert.expires)
            .await?;
        tracing::info!(worker = %worker.name, expires = %cert.expires, "host certificate installed");
        Ok(true)
    }
}

/// The names a worker's certificate is valid for: the gateway's (what tenants connect
/// to), then the worker's own public and SSH host names (direct logins).
fn principals(config: &Config, worker: &Worker) -> Vec<String> {
    let mut names = config.gateway.all_names();
    for n in [&worker.public_host, &worker.ssh_host] {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

fn write_private(key: &PrivateKey, path: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    // create_new: two replicas starting at once never overwrite each other's key.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| e.to_string())?;
    file.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::Certificate;

    #[test]
    fn a_signed_certificate_is_a_host_certificate_for_the_key_and_the_names() {
        let ca = HostCa::from_key(crate::ssh::generate_ed25519());
        let host = crate::ssh::generate_ed25519();
        let names = vec!["localhost".to_owned(), "gw.example.org".to_owned()];
        let cert = ca
            .sign(
                host.public_key(),
                "worker_1",
                &names,
                Duration::from_secs(86_400),
            )
            .unwrap();
        let parsed = Certificate::from_openssh(&cert.line).unwrap();
        assert_eq!(parsed.cert_type(), CertType::Host);
        assert_eq!(parsed.public_key(), host.public_key().key_data());
        assert_eq!(parsed.valid_principals(), names.as_slice());
        assert_eq!(parsed.key_id(), "orion:worker_1");
        assert_eq!(
            parsed.signature_key(),
            ca.key.public_key().key_data(),
            "signed by the CA"
        );
        let fingerprint = ca.key.public_key().fingerprint(Default::default());
        parsed
            .validate([&fingerprint])
            .expect("valid now, signed by the CA");
        let left = cert.expires - Utc::now();
        assert!(left > chrono::Duration::hours(23) && left <= chrono::Duration::hours(24));
    }

    #[test]
    fn the_known_hosts_line_trusts_every_port_of_every_name() {
        let ca = HostCa::from_key(crate::ssh::generate_ed25519());
        let line = ca.known_hosts(&["localhost".into(), "gw".into()], &[]);
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("@cert-authority"));
        assert_eq!(words.next(), Some("localhost,[localhost]:*,gw,[gw]:*"));
        assert_eq!(words.next(), Some("ssh-ed25519"));
        assert!(line.ends_with("orion-host-ca\n"));
        let with = ca.known_hosts(&["localhost".into()], &["ssh-ed25519 AAAAold".into()]);
        assert_eq!(with.lines().nth(1), Some("@revoked * ssh-ed25519 AAAAold"));
    }

    #[test]
    fn a_missing_key_file_is_made_private_and_then_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca").join("host_ca");
        let first = HostCa::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = HostCa::load_or_create(&path).unwrap();
        assert_eq!(first.public_line(), again.public_line());
    }
}
