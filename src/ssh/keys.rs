//! Key files and host keys: Orion's private key read only if other users cannot read
//! it, fresh ed25519 keys, and host keys in the one-line form the database stores.

use std::path::Path;

use russh::keys::{PrivateKey, PublicKey};

use super::SshError;

/// Reads an OpenSSH private key, refusing a file that every user can read: Orion's key
/// opens a root shell on every worker.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, SshError> {
    let fail = |message: String| SshError::Key {
        path: path.to_owned(),
        message,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        let mode = meta.permissions().mode();
        if mode & 0o007 != 0 {
            return Err(fail(format!(
                "permissions {:o} let other users read it; run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            )));
        }
    }
    russh::keys::load_secret_key(path, None).map_err(|e| fail(e.to_string()))
}

/// A fresh ed25519 key pair (Orion's own key, tenants' keys in tests).
pub fn generate_ed25519() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ))
}

/// Parses a host key stored as one OpenSSH line.
pub fn parse_host_key(line: &str) -> Option<PublicKey> {
    PublicKey::from_openssh(line.trim()).ok()
}

/// A host key in the one-line form stored in the database (no comment).
pub fn host_key_line(key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh().expect("a parsed key can be encoded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        let key = generate_ed25519();
        std::fs::write(
            &path,
            key.to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .unwrap(),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_private_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = load_private_key(&path).unwrap();
        assert_eq!(loaded.public_key().key_data(), key.public_key().key_data());
    }

    #[test]
    fn host_key_lines_round_trip_without_comment() {
        let key = generate_ed25519();
        let mut public = key.public_key().clone();
        public.set_comment("root@worker");
        let line = host_key_line(&public);
        assert!(!line.contains("root@worker"));
        assert_eq!(parse_host_key(&line).unwrap().key_data(), public.key_data());
    }
}
