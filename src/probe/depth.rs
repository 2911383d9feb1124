//! One probe of one worker over SSH, as deep as it is due, and probing's memory of what
//! each worker last proved. The depth is decided here ([`super::policy::depth`]) and the
//! SSH client only runs what it is told (a new connection, a command, a keepalive), so
//! that a change to how deep probes go never touches the transport.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::keys::PublicKey;

use super::policy::{self, DepthEvery, HandshakeFailure, ProbeDepth, Proven};
use crate::ssh::{Session, SshClient, SshError, Target};

/// What a successful probe saw.
#[derive(Debug, Clone)]
pub struct Probe {
    pub host_key: PublicKey,
    pub depth: ProbeDepth,
    pub latency: Duration,
}

/// When a worker's probes last proved a handshake and a command, by probing alone (a
/// watch connection's handshake is read from the connection, see [`Prober::proven`]).
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    handshake: Option<tokio::time::Instant>,
    exec: Option<tokio::time::Instant>,
}

/// Orion's probes of workers over an SSH client, with their memory. Cheap to clone: the
/// clones share the memory, so the probe rounds, the watches and the guard on moves all
/// see what the others proved.
#[derive(Clone)]
pub struct Prober {
    ssh: SshClient,
    /// What each worker (by name) last proved to these probes, and when.
    memory: Arc<Mutex<HashMap<String, Memory>>>,
    /// How often each depth is due ([`policy::depth`]).
    every: DepthEvery,
}

impl Prober {
    /// Probes over `ssh`, each depth due as often as `every` says, with no memory yet
    /// (the first probe of each worker opens a new connection).
    pub fn new(ssh: SshClient, every: DepthEvery) -> Self {
        Self {
            ssh,
            memory: Arc::default(),
            every,
        }
    }

    /// One health probe, as deep as it is due ([`ProbeDepth`]):
    /// - over a new connection (connect, host-key check, authenticate, run `true`) when the
    ///   worker has no watch connection or its last handshake is older than
    ///   `handshake_every`;
    /// - else over the watch connection: `true` in a new channel (the worker's sshd must
    ///   still start a session and a process) when the last command is older than
    ///   `exec_every`, otherwise a keepalive request that the worker's sshd must answer.
    ///
    /// Returns the host key, the depth, and how long the whole round trip took. Waiting
    /// for a slot in the SSH client's session bound does not count against `timeout`: a
    /// queue on Orion's side says nothing about the worker.
    pub async fn probe(&self, target: &Target, timeout: Duration) -> Result<Probe, SshError> {
        let kept = self.ssh.existing_session(target);
        let proven = self.proven(target, kept.as_ref());
        let now = tokio::time::Instant::now();
        let shared = policy::may_share(proven, self.every, now)
            .then_some(kept)
            .flatten();
        let depth = policy::depth(proven, shared.is_some(), self.every, now);
        let ready = match shared {
            Some(session) => Ok(session),
            None => Err(self.ssh.slot().await),
        };
        let started = Instant::now();
        let work = async {
            let session = match ready {
                Ok(session) => session,
                Err(slot) => match self.ssh.connect_in(target, slot).await {
                    Ok(session) => {
                        self.remember(target, |m| m.handshake = Some(tokio::time::Instant::now()));
                        session
                    }
                    Err(e) => return self.after_failed_handshake(target, e).await,
                },
            };
            if depth == ProbeDepth::Keepalive {
                session.keepalive().await?;
                return Ok::<_, SshError>((session.host_key.clone(), depth));
            }
            let out = session.exec("true", None).await?;
            session.close().await;
            if !out.success() {
                return Err(SshError::ProbeCommand {
                    addr: target.addr(),
                    exit_status: out.exit_status,
                });
            }
            Ok((session.host_key.clone(), depth))
        };
        let (host_key, depth) =
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| SshError::Timeout {
                    addr: target.addr(),
                    stage: "probe",
                    after: timeout,
                })??;
        if depth != ProbeDepth::Keepalive {
            self.remember(target, |m| m.exec = Some(tokio::time::Instant::now()));
        }
        Ok(Probe {
            host_key,
            depth,
            latency: started.elapsed(),
        })
    }

    /// What `target` last proved: its last handshake is the later of the probes' own and
    /// the login of the watch connection it has open (`kept`), if any.
    fn proven(&self, target: &Target, kept: Option<&Session>) -> Option<Proven> {
        let memory = self
            .memory
            .lock()
            .expect("probe memory poisoned")
            .get(&target.name)
            .copied()
            .unwrap_or_default();
        let handshake = match (memory.handshake, kept.map(Session::logged_in)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }?;
        Some(Proven {
            handshake,
            exec: memory.exec,
        })
    }

    fn remember(&self, target: &Target, change: impl FnOnce(&mut Memory)) {
        change(
            self.memory
                .lock()
                .expect("probe memory poisoned")
                .entry(target.name.clone())
                .or_default(),
        );
    }

    /// A probe's new connection failed with `failed`: the probe's outcome, as
    /// [`policy::after_failed_handshake`] rules. A worker whose sshd is full answers with
    /// a keepalive on its kept connection, if it has one.
    async fn after_failed_handshake(
        &self,
        target: &Target,
        failed: SshError,
    ) -> Result<(PublicKey, ProbeDepth), SshError> {
        let failure = match failed {
            SshError::SshdFull { .. } => HandshakeFailure::SshdFull,
            _ => HandshakeFailure::Other,
        };
        let kept = self.ssh.existing_session(target);
        let (Some(depth), Some(kept)) = (
            policy::after_failed_handshake(failure, kept.is_some()),
            kept,
        ) else {
            return Err(failed);
        };
        // The kept connection's own failure says less than the one that brought us here.
        kept.keepalive().await.map_err(|_| failed)?;
        tracing::warn!(worker = %target.name,
            "sshd refuses new connections (exceeded MaxStartups) but the kept connection answers: alive");
        Ok((kept.host_key.clone(), depth))
    }
}
