//! A new connection: TCP, the SSH handshake with only modern algorithms, the host-key
//! check, authentication, all under the connect timeout; and the one failure that says
//! a worker is up although it refused us (sshd full, `Exceeded MaxStartups`).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey};

use super::{Auth, SshClient, SshError, Target};

/// The only algorithms Orion's client offers: the modern subset of russh's that the
/// workers' sshd also offers (`docker/worker/sshd_config`), so that a worker, or a
/// machine impersonating one, can never talk Orion down to a NIST curve, SHA-1, CBC or
/// encrypt-and-MAC. russh has no sntrup761 (the worker's first choice), so both agree
/// on curve25519.
pub(super) fn client_algorithms() -> russh::Preferred {
    use russh::{cipher, kex, keys::Algorithm, mac};
    russh::Preferred {
        kex: Cow::Borrowed(&[
            kex::CURVE25519,
            kex::CURVE25519_PRE_RFC_8731,
            // Not algorithms but markers russh needs in the list: extension negotiation
            // (server-sig-algs) and OpenSSH's strict key exchange against Terrapin.
            kex::EXTENSION_SUPPORT_AS_CLIENT,
            kex::EXTENSION_SUPPORT_AS_SERVER,
            kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
            kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]),
        key: Cow::Borrowed(&[Algorithm::Ed25519]),
        cipher: Cow::Borrowed(&[
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]),
        mac: Cow::Borrowed(&[mac::HMAC_SHA256_ETM, mac::HMAC_SHA512_ETM]),
        ..russh::Preferred::DEFAULT
    }
}

impl SshClient {
    /// TCP connect, SSH handshake with host-key check, authentication; all under
    /// `connect_timeout`.
    pub(super) async fn handshake(
        &self,
        target: &Target,
        user: &str,
        auth: Auth,
        config: &Arc<client::Config>,
    ) -> Result<(Handle<Verifier>, PublicKey), SshError> {
        let addr = target.addr();
        let presented = Arc::new(Mutex::new(None));
        let first = Arc::new(Mutex::new(Vec::new()));
        let verifier = Verifier {
            expected: target.host_key.clone(),
            presented: presented.clone(),
        };
        let handshake = async {
            let stream = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|cause| SshError::Connect {
                    addr: addr.clone(),
                    cause,
                })?;
            stream.set_nodelay(true).ok();
            let stream = Tapped {
                inner: stream,
                first: first.clone(),
                kept: 0,
            };
            let mut handle = client::connect_stream(config.clone(), stream, verifier)
                .await
                .map_err(|cause| {
                    mismatch_or(
                        &presented,
                        target,
                        &addr,
                        SshError::Protocol {
                            addr: addr.clone(),
                            cause,
                        },
                    )
                })?;
            let result = match auth {
                Auth::Key(key) => {
                    let hash = handle
                        .best_supported_rsa_hash()
                        .await
                        .ok()
                        .flatten()
                        .flatten();
                    handle
                        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
                        .await
                }
                Auth::Password(password) => handle.authenticate_password(user, password).await,
            }
            .map_err(|cause| SshError::Protocol {
                addr: addr.clone(),
                cause,
            })?;
            if !result.success() {
                return Err(SshError::AuthRejected {
                    addr: addr.clone(),
                    user: user.to_owned(),
                });
            }
            Ok(handle)
        };
        let handle = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| SshError::Timeout {
                addr: addr.clone(),
                stage: "connect",
                after: self.connect_timeout,
            })?
            .map_err(|e| match e {
                SshError::Protocol { .. } if said_full(&first) => {
                    SshError::SshdFull { addr: addr.clone() }
                }
                e => e,
            })?;
        let host_key = presented
            .lock()
            .expect("host key slot poisoned")
            .clone()
            .expect("a server that completed the handshake presented a key");
        Ok((handle, host_key))
    }
}

/// What sshd writes, instead of its banner, to a connection it drops because it holds
/// `MaxStartups` (or, from that address, `PerSourceMaxStartups`) unauthenticated
/// connections already, before closing it.
const MAX_STARTUPS_NOTICE: &[u8] = b"Exceeded MaxStartups";

/// Whether the first bytes a server sent are sshd's notice that it is full. Only the
/// notice counts, not a connection closed with nothing said: a proxy in front of a dead
/// sshd (Docker's published ports) does that too.
fn said_full(first: &Mutex<Vec<u8>>) -> bool {
    first
        .lock()
        .expect("tap poisoned")
        .starts_with(MAX_STARTUPS_NOTICE)
}

/// Bytes a [`Tapped`] stream keeps.
const TAPPED: usize = 32;

/// A connection that keeps the first bytes the server sent ([`TAPPED`] at most), so that
/// a failed handshake can tell a full sshd ([`said_full`]) from a worker gone wrong.
struct Tapped {
    inner: tokio::net::TcpStream,
    first: Arc<Mutex<Vec<u8>>>,
    /// How many are kept: once [`TAPPED`], reads go straight through.
    kept: usize,
}

impl tokio::io::AsyncRead for Tapped {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.kept < TAPPED {
            let new = &buf.filled()[before..];
            let take = new.len().min(TAPPED - this.kept);
            if take > 0 {
                this.first
                    .lock()
                    .expect("tap poisoned")
                    .extend_from_slice(&new[..take]);
                this.kept += take;
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Tapped {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn mismatch_or(
    presented: &Mutex<Option<PublicKey>>,
    target: &Target,
    addr: &str,
    otherwise: SshError,
) -> SshError {
    let seen = presented.lock().expect("host key slot poisoned").clone();
    match (seen, &target.host_key) {
        (Some(seen), Some(expected)) if seen.key_data() != expected.key_data() => {
            SshError::HostKeyMismatch {
                addr: addr.to_owned(),
                expected: expected.fingerprint(HashAlg::Sha256).to_string(),
                presented: seen.fingerprint(HashAlg::Sha256).to_string(),
            }
        }
        _ => otherwise,
    }
}

/// russh callback that checks the server's host key against the expected one and keeps
/// the presented key for the caller.
pub(super) struct Verifier {
    expected: Option<PublicKey>,
    presented: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            // Host certificates are not part of Orion's trust model.
            return Ok(false);
        };
        *self.presented.lock().expect("host key slot poisoned") = Some(key.clone());
        Ok(match &self.expected {
            Some(expected) => expected.key_data() == key.key_data(),
            None => true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_offers_no_nist_curve_sha1_cbc_or_encrypt_and_mac_algorithm() {
        let preferred = client_algorithms();
        let names: Vec<String> = preferred
            .kex
            .iter()
            .map(|k| k.as_ref().to_owned())
            .chain(preferred.key.iter().map(|k| k.to_string()))
            .chain(preferred.cipher.iter().map(|c| c.as_ref().to_owned()))
            .chain(preferred.mac.iter().map(|m| m.as_ref().to_owned()))
            .collect();
        for name in &names {
            for weak in ["nistp", "ecdsa", "sha1", "-cbc", "3des", "ssh-rsa", "group"] {
                assert!(!name.contains(weak), "{name} is offered ({weak})");
            }
        }
        for mac in preferred.mac.iter() {
            assert!(
                mac.as_ref().ends_with("-etm@openssh.com"),
                "{}",
                mac.as_ref()
            );
        }
        assert_eq!(
            preferred
                .key
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>(),
            ["ssh-ed25519"]
        );
        // The strict key exchange (Terrapin) stays on.
        assert!(names.iter().any(|n| n == "kex-strict-c-v00@openssh.com"));
    }
}
