//! Orion's SSH client (russh): its own ed25519 key, verified host keys, a timeout on every
//! step, and a bound on sessions open at once. It only executes: it connects,
//! authenticates, opens sessions, runs commands and streams, sends keepalives and keeps
//! watches; what to run and when (how deep a probe goes, what a worker proved) is decided
//! by its callers ([`crate::probe`] for probing).
//!
//! Host keys: a connection states the key it expects (pinned in the inventory, or trusted
//! on first use). A different key refuses the connection with
//! [`SshError::HostKeyMismatch`]; no key expected means the presented one is accepted and
//! reported back in [`Session::host_key`] so the caller can record it.
//!
//! - this file: the client, its targets, its errors, and new connections in the bound;
//! - `connect.rs`: the handshake (algorithms, host-key check, a full sshd told apart);
//! - `pool.rs`: the connections the client keeps (watches' and spare ones) and sessions
//!   on them;
//! - `session.rs`: a session's commands, streams and keepalives;
//! - `watch.rs`: the long-lived sessions that notice a worker going away;
//! - `keys.rs`: key files and host-key lines.

mod connect;
mod keys;
mod pool;
mod session;
mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use keys::{generate_ed25519, host_key_line, load_private_key, parse_host_key};
pub use session::{Reading, Session};
pub use watch::Watch;

use connect::client_algorithms;
use pool::{SharedConnection, Spares};
use watch::{DEFAULT_KEEPALIVE, watch_config};

/// Where to connect and which host key to insist on.
#[derive(Debug, Clone)]
pub struct Target {
    /// Worker name, for messages.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// `None`: trust on first use.
    pub host_key: Option<PublicKey>,
}

impl Target {
    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How to authenticate.
#[derive(Clone)]
pub enum Auth {
    Key(Arc<PrivateKey>),
    Password(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret, even in debug output.
        match self {
            Auth::Key(k) => write!(f, "Key({})", k.public_key().fingerprint(HashAlg::Sha256)),
            Auth::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot read Orion's SSH key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("cannot connect to {addr}: {cause}")]
    Connect { addr: String, cause: std::io::Error },
    #[error("{addr}: no answer within {after:?} during {stage}")]
    Timeout {
        addr: String,
        stage: &'static str,
        after: Duration,
    },
    #[error("{addr}: host key mismatch: expected {expected}, presented {presented}")]
    HostKeyMismatch {
        addr: String,
        expected: String,
        presented: String,
    },
    #[error("{addr}: authentication as `{user}` was refused")]
    AuthRejected { addr: String, user: String },
    #[error("{addr}: ssh protocol error: {cause}")]
    Protocol { addr: String, cause: russh::Error },
    /// No channel could be opened for a command (a connection that died unnoticed): the
    /// command never started.
    #[error("{addr}: cannot open a channel: {cause}")]
    ChannelOpen { addr: String, cause: String },
    /// The worker's sshd closed a new connection at once, saying `Exceeded MaxStartups`:
    /// it is up, but holds as many unauthenticated connections as it takes (a flood, or
    /// a burst of logins).
    #[error("{addr}: sshd refused a new connection: exceeded MaxStartups")]
    SshdFull { addr: String },
    #[error("{addr}: the probe's command `true` failed ({})", exit_text(*.exit_status))]
    ProbeCommand {
        addr: String,
        exit_status: Option<u32>,
    },
}

fn exit_text(status: Option<u32>) -> String {
    match status {
        Some(code) => format!("exit status {code}"),
        None => "no exit status: it did not start or was killed".into(),
    }
}

impl SshError {
    /// A failure that says the worker is not reachable or not answering (as opposed to a
    /// worker that answers but must not be trusted).
    pub fn is_host_key_mismatch(&self) -> bool {
        matches!(self, SshError::HostKeyMismatch { .. })
    }
}

/// Output of a command run on a worker.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// `None` when the server closed the channel without an exit status (killed).
    pub exit_status: Option<u32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

/// Orion's SSH client, shared by the probe loop and provisioning. Cheap to clone.
#[derive(Clone)]
pub struct SshClient {
    key: Arc<PrivateKey>,
    user: String,
    config: Arc<client::Config>,
    /// Config of watch sessions: no inactivity timeout, keepalives to notice a silent peer.
    watch_config: Arc<client::Config>,
    connect_timeout: Duration,
    command_timeout: Duration,
    sessions: Arc<Semaphore>,
    /// Authenticated connections kept open by watches, by worker name: provisioning opens
    /// a channel on one of these instead of paying a new handshake.
    shared: Arc<Mutex<HashMap<String, SharedConnection>>>,
    /// Connections opened for commands to workers with no watch connection here (on a
    /// replica that does not lead the loops, every worker), kept a while for the next
    /// command, by worker name.
    spare: Spares,
}

impl SshClient {
    /// Reads Orion's private key, refusing one that other users of the machine can read.
    pub fn new(
        key_path: &Path,
        user: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
        max_sessions: usize,
    ) -> Result<Self, SshError> {
        let key = load_private_key(key_path)?;
        Ok(Self::with_key(
            Arc::new(key),
            user,
            connect_timeout,
            command_timeout,
            max_sessions,
        ))
    }

    pub fn with_key(
        key: Arc<PrivateKey>,
        user: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
        max_sessions: usize,
    ) -> Self {
        let config = client::Config {
            // A session is only open for the length of one probe or playbook.
            inactivity_timeout: Some(command_timeout + connect_timeout),
            nodelay: true,
            preferred: client_algorithms(),
            ..Default::default()
        };
        Self {
            key,
            user: user.to_owned(),
            config: Arc::new(config),
            watch_config: Arc::new(watch_config(DEFAULT_KEEPALIVE, 3)),
            connect_timeout,
            command_timeout,
            sessions: Arc::new(Semaphore::new(max_sessions)),
            shared: Arc::default(),
            spare: Arc::default(),
        }
    }

    /// A client with the same key and settings but connections and session slots of
    /// its own, bounded to `max_sessions`: for what tenants ask to read (an
    /// instance's log), so that however many they ask, none of Orion's own commands
    /// waits behind them, for a slot here or for a channel on a worker's connection
    /// (sshd's `MaxSessions` counts per connection).
    pub fn apart(&self, max_sessions: usize) -> Self {
        Self {
            sessions: Arc::new(Semaphore::new(max_sessions)),
            shared: Arc::default(),
            spare: Arc::default(),
            ..self.clone()
        }
    }

    /// Orion's public key, as it must appear in the workers' `authorized_keys`.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key().clone()
    }

    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Opens an authenticated session to `target` as Orion's user with Orion's key.
    pub async fn connect(&self, target: &Target) -> Result<Session, SshError> {
        self.connect_as(target, &self.user, Auth::Key(self.key.clone()))
            .await
    }

    /// Opens an authenticated session as any user (tests log in as tenants with this).
    pub async fn connect_as(
        &self,
        target: &Target,
        user: &str,
        auth: Auth,
    ) -> Result<Session, SshError> {
        let slot = self.slot().await;
        self.connect_in_slot(target, user, auth, slot).await
    }

    /// Waits for a free slot in the bound on open sessions: a caller that times the
    /// connection it opens next ([`SshClient::connect_in`]) takes it first, since a queue
    /// on Orion's side says nothing about the worker.
    pub async fn slot(&self) -> Slot {
        Slot(
            self.sessions
                .clone()
                .acquire_owned()
                .await
                .expect("the session semaphore is never closed"),
        )
    }

    /// Opens an authenticated session to `target` as Orion's user with Orion's key, in a
    /// slot taken already ([`SshClient::slot`]).
    pub async fn connect_in(&self, target: &Target, slot: Slot) -> Result<Session, SshError> {
        self.connect_in_slot(target, &self.user, Auth::Key(self.key.clone()), slot)
            .await
    }

    async fn connect_in_slot(
        &self,
        target: &Target,
        user: &str,
        auth: Auth,
        Slot(permit): Slot,
    ) -> Result<Session, SshError> {
        let (handle, host_key) = self.handshake(target, user, auth, &self.config).await?;
        Ok(Session {
            handle: Arc::new(handle),
            addr: target.addr(),
            host_key,
            logged_in: tokio::time::Instant::now(),
            command_timeout: self.command_timeout,
            open_timeout: self.connect_timeout,
            shared: false,
            spare: None,
            _permit: Some(permit),
        })
    }
}

/// A turn in the bound on sessions open at once ([`SshClient::slot`]).
pub struct Slot(OwnedSemaphorePermit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_password() {
        let shown = format!("{:?}", Auth::Password("hunter2".into()));
        assert!(!shown.contains("hunter2"));
    }
}
