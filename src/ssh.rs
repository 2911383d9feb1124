//! Orion's SSH client (russh): its own ed25519 key, verified host keys, a timeout on every
//! step, and a bound on sessions open at once.
//!
//! Host keys: a connection states the key it expects (pinned in the inventory, or trusted
//! on first use). A different key refuses the connection with
//! [`SshError::HostKeyMismatch`]; no key expected means the presented one is accepted and
//! reported back in [`Session::host_key`] so the caller can record it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, Disconnect};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::probe_policy::ProbeDepth;
use crate::probe_policy::{self, DepthEvery, Proven};

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
    fn addr(&self) -> String {
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
    /// What each worker (by name) last proved to this client, and when.
    proven: Arc<Mutex<HashMap<String, Proven>>>,
    /// How often each probe depth is due ([`probe_policy::depth`]).
    every: DepthEvery,
}

/// A watch's authenticated connection and the host key it was verified with.
type SharedConnection = (Arc<Handle<Verifier>>, PublicKey);

/// A connection kept for the next commands, and when it was made. It holds no slot in
/// the session bound (it is idle between commands; each session on it is bounded by
/// its caller), so that kept connections can never starve new ones.
struct Spare {
    handle: Arc<Handle<Verifier>>,
    host_key: PublicKey,
    made: Instant,
}

/// The spare connections by worker name.
type Spares = Arc<Mutex<HashMap<String, Spare>>>;

/// How long a spare connection is used for (well under the connections' inactivity
/// timeout): then the next command makes a new one, so that a connection that died
/// unnoticed is not handed out for long. And how many are kept at most.
const SPARE_LIFE: Duration = Duration::from_secs(30);
const SPARE_MAX: usize = 16;

/// Keepalive period of watch sessions unless [`SshClient::set_keepalive`] says otherwise.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);

/// Longest a worker's probes ride its watch connection without a new handshake, unless
/// [`SshClient::set_handshake_every`] says otherwise.
const DEFAULT_HANDSHAKE_EVERY: Duration = Duration::from_secs(300);

/// Longest a worker's probes are keepalive round trips without running a command, unless
/// [`SshClient::set_exec_every`] says otherwise.
const DEFAULT_EXEC_EVERY: Duration = Duration::from_secs(300);

/// Config of watch sessions: never idle-timed out, keepalives to notice a silent peer.
fn watch_config(keepalive: Duration, max: usize) -> client::Config {
    client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive),
        keepalive_max: max,
        nodelay: true,
        preferred: client_algorithms(),
        ..Default::default()
    }
}

/// The only algorithms Orion's client offers: the modern subset of russh's that the
/// workers' sshd also offers (`docker/worker/sshd_config`), so that a worker, or a
/// machine impersonating one, can never talk Orion down to a NIST curve, SHA-1, CBC or
/// encrypt-and-MAC. russh has no sntrup761 (the worker's first choice), so both agree
/// on curve25519.
fn client_algorithms() -> russh::Preferred {
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

/// Most output kept from one command: enough for an error message, bounded in memory.
const MAX_CAPTURE: usize = 64 * 1024;

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
            proven: Arc::default(),
            every: DepthEvery {
                handshake: DEFAULT_HANDSHAKE_EVERY,
                exec: DEFAULT_EXEC_EVERY,
            },
        }
    }

    /// A client with the same key and settings but connections, session slots and
    /// memory of its own, bounded to `max_sessions`: for what tenants ask to read (an
    /// instance's log), so that however many they ask, none of Orion's own commands
    /// waits behind them, for a slot here or for a channel on a worker's connection
    /// (sshd's `MaxSessions` counts per connection).
    pub fn apart(&self, max_sessions: usize) -> Self {
        Self {
            sessions: Arc::new(Semaphore::new(max_sessions)),
            shared: Arc::default(),
            spare: Arc::default(),
            proven: Arc::default(),
            ..self.clone()
        }
    }

    /// How often a probe opens a new connection even though a watch connection is open.
    pub fn set_handshake_every(&mut self, every: Duration) {
        self.every.handshake = every;
    }

    /// How often a probe over a watch connection runs a command rather than only a
    /// keepalive round trip. Zero: every probe runs one.
    pub fn set_exec_every(&mut self, every: Duration) {
        self.every.exec = every;
    }

    /// Sets how often a watch session checks that the worker still answers, and after how
    /// many unanswered checks it gives up: a worker that hangs without closing its
    /// connection is noticed after about `interval × (max + 1)`.
    pub fn set_keepalive(&mut self, interval: Duration, max: usize) {
        self.watch_config = Arc::new(watch_config(interval, max));
    }

    /// Opens a long-lived session to `target` that [`Watch::closed`] resolves on when the
    /// connection drops. Watches do not count against the session bound: they are one per
    /// worker and idle.
    pub async fn watch(&self, target: &Target) -> Result<Watch, SshError> {
        let (handle, host_key) = self
            .handshake(
                target,
                &self.user,
                Auth::Key(self.key.clone()),
                &self.watch_config,
            )
            .await?;
        let addr = target.addr();
        let channel = handle
            .channel_open_session()
            .await
            .map_err(|cause| SshError::Protocol {
                addr: addr.clone(),
                cause,
            })?;
        let handle = Arc::new(handle);
        self.shared
            .lock()
            .expect("shared sessions poisoned")
            .insert(target.name.clone(), (handle.clone(), host_key.clone()));
        Ok(Watch {
            handle,
            channel,
            host_key,
            name: target.name.clone(),
            shared: self.shared.clone(),
        })
    }

    /// A session to run commands on `target`: a channel on the worker's watch connection
    /// when one is open (no handshake to pay); else on the connection the last command
    /// there opened, if it is recent; else a new connection, kept for the next one. A
    /// replica that does not lead has no watch connection: its rents pay one handshake
    /// per worker, not one each.
    pub async fn session(&self, target: &Target) -> Result<Session, SshError> {
        if let Some(session) = self.shared_session(target) {
            return Ok(session);
        }
        if let Some(session) = self.spare_session(target) {
            return Ok(session);
        }
        let session = self.connect(target).await?;
        Ok(self.keep_spare(target, session))
    }

    /// A channel on the spare connection to `target`, if it is live, recent and was
    /// verified with the host key expected now.
    fn spare_session(&self, target: &Target) -> Option<Session> {
        let spare = self.spare.lock().expect("spare connections poisoned");
        let kept = spare.get(&target.name).filter(|s| {
            !s.handle.is_closed()
                && s.made.elapsed() < SPARE_LIFE
                && target
                    .host_key
                    .as_ref()
                    .is_none_or(|expected| expected.key_data() == s.host_key.key_data())
        })?;
        let mut session = self.on_kept(target, kept.handle.clone(), kept.host_key.clone());
        session.spare = Some((self.spare.clone(), target.name.clone()));
        Some(session)
    }

    /// A session on a connection this client keeps (a watch's or a spare one): closing
    /// it leaves the connection open, and it holds no slot of its own.
    fn on_kept(
        &self,
        target: &Target,
        handle: Arc<Handle<Verifier>>,
        host_key: PublicKey,
    ) -> Session {
        Session {
            handle,
            addr: target.addr(),
            host_key,
            command_timeout: self.command_timeout,
            open_timeout: self.connect_timeout,
            shared: true,
            spare: None,
            _permit: None,
        }
    }

    /// Keeps `session`'s connection for the next commands to `target`; the session
    /// itself becomes a channel user of it, which closing does not disconnect.
    fn keep_spare(&self, target: &Target, mut session: Session) -> Session {
        let mut spare = self.spare.lock().expect("spare connections poisoned");
        spare.retain(|_, s| !s.handle.is_closed() && s.made.elapsed() < SPARE_LIFE);
        if spare.len() >= SPARE_MAX
            && let Some(oldest) = spare
                .iter()
                .min_by_key(|(_, s)| s.made)
                .map(|(name, _)| name.clone())
        {
            spare.remove(&oldest);
        }
        spare.insert(
            target.name.clone(),
            Spare {
                handle: session.handle.clone(),
                host_key: session.host_key.clone(),
                made: Instant::now(),
            },
        );
        session._permit = None;
        session.shared = true;
        session.spare = Some((self.spare.clone(), target.name.clone()));
        session
    }

    /// A channel on the worker's open watch connection, or nothing: never a connection
    /// of its own (for long-lived followers, which must not hold a session slot each).
    pub fn existing_session(&self, target: &Target) -> Option<Session> {
        self.shared_session(target)
    }

    /// A channel on the worker's watch connection, if one is open and was verified with
    /// the host key expected now.
    fn shared_session(&self, target: &Target) -> Option<Session> {
        let shared = self
            .shared
            .lock()
            .expect("shared sessions poisoned")
            .get(&target.name)
            .filter(|(handle, key)| {
                // Only a live connection verified with the key expected now.
                !handle.is_closed()
                    && target
                        .host_key
                        .as_ref()
                        .is_none_or(|expected| expected.key_data() == key.key_data())
            })
            .cloned();
        shared.map(|(handle, host_key)| self.on_kept(target, handle, host_key))
    }

    /// How many workers have a live watch connection open.
    pub fn watched(&self) -> usize {
        self.shared
            .lock()
            .expect("shared sessions poisoned")
            .values()
            .filter(|(handle, _)| !handle.is_closed())
            .count()
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
        let permit = self.session_slot().await;
        self.connect_in_slot(target, user, auth, permit).await
    }

    /// Waits for a free slot in the bound on open sessions.
    async fn session_slot(&self) -> OwnedSemaphorePermit {
        self.sessions
            .clone()
            .acquire_owned()
            .await
            .expect("the session semaphore is never closed")
    }

    async fn connect_in_slot(
        &self,
        target: &Target,
        user: &str,
        auth: Auth,
        permit: OwnedSemaphorePermit,
    ) -> Result<Session, SshError> {
        let (handle, host_key) = self.handshake(target, user, auth, &self.config).await?;
        Ok(Session {
            handle: Arc::new(handle),
            addr: target.addr(),
            host_key,
            command_timeout: self.command_timeout,
            open_timeout: self.connect_timeout,
            shared: false,
            spare: None,
            _permit: Some(permit),
        })
    }

    /// TCP connect, SSH handshake with host-key check, authentication; all under
    /// `connect_timeout`.
    async fn handshake(
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
        self.proven
            .lock()
            .expect("proof times poisoned")
            .entry(target.name.clone())
            .and_modify(|p| p.handshake = tokio::time::Instant::now())
            .or_insert(Proven {
                handshake: tokio::time::Instant::now(),
                exec: None,
            });
        Ok((handle, host_key))
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
    /// for a slot in the session bound does not count against `timeout`: a queue on
    /// Orion's side says nothing about the worker.
    pub async fn probe(&self, target: &Target, timeout: Duration) -> Result<Probe, SshError> {
        let proven = self
            .proven
            .lock()
            .expect("proof times poisoned")
            .get(&target.name)
            .copied();
        let now = tokio::time::Instant::now();
        let shared = probe_policy::may_share(proven, self.every, now)
            .then(|| self.shared_session(target))
            .flatten();
        let depth = probe_policy::depth(proven, shared.is_some(), self.every, now);
        let ready = match shared {
            Some(session) => Ok(session),
            None => Err(self.session_slot().await),
        };
        let started = Instant::now();
        let work = async {
            let session = match ready {
                Ok(session) => session,
                Err(slot) => {
                    let auth = Auth::Key(self.key.clone());
                    match self.connect_in_slot(target, &self.user, auth, slot).await {
                        Ok(session) => session,
                        Err(e) => return self.after_failed_handshake(target, e).await,
                    }
                }
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
        if depth != ProbeDepth::Keepalive
            && let Some(p) = self
                .proven
                .lock()
                .expect("proof times poisoned")
                .get_mut(&target.name)
        {
            p.exec = Some(tokio::time::Instant::now());
        }
        Ok(Probe {
            host_key,
            depth,
            latency: started.elapsed(),
        })
    }
}

impl SshClient {
    /// A probe's new connection failed with `failed`: the probe's outcome, as
    /// [`probe_policy::after_failed_handshake`] rules. A worker whose sshd is full
    /// answers with a keepalive on its kept connection, if it has one.
    async fn after_failed_handshake(
        &self,
        target: &Target,
        failed: SshError,
    ) -> Result<(PublicKey, ProbeDepth), SshError> {
        let failure = match failed {
            SshError::SshdFull { .. } => probe_policy::HandshakeFailure::SshdFull,
            _ => probe_policy::HandshakeFailure::Other,
        };
        let kept = self.shared_session(target);
        let (Some(depth), Some(kept)) = (
            probe_policy::after_failed_handshake(failure, kept.is_some()),
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

/// What a successful probe saw.
#[derive(Debug, Clone)]
pub struct Probe {
    pub host_key: PublicKey,
    pub depth: ProbeDepth,
    pub latency: Duration,
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

/// A long-lived, idle session to a worker, whose only job is to notice that the worker
/// went away: the worker closing the connection (sshd stopped, container stopped) or not
/// answering keepalives.
pub struct Watch {
    handle: Arc<Handle<Verifier>>,
    channel: russh::Channel<client::Msg>,
    /// The host key the worker presented.
    pub host_key: PublicKey,
    name: String,
    shared: Arc<Mutex<HashMap<String, SharedConnection>>>,
}

impl Drop for Watch {
    /// The connection is no longer offered to provisioning once its watch ends.
    fn drop(&mut self) {
        let mut shared = self.shared.lock().expect("shared sessions poisoned");
        if shared
            .get(&self.name)
            .is_some_and(|(h, _)| Arc::ptr_eq(h, &self.handle))
        {
            shared.remove(&self.name);
        }
    }
}

impl Watch {
    /// Resolves when the connection is gone.
    pub async fn closed(&mut self) {
        while let Some(msg) = self.channel.wait().await {
            if matches!(msg, ChannelMsg::Close | ChannelMsg::Eof) {
                return;
            }
        }
    }
}

/// An authenticated SSH connection to one worker. Closing it (or dropping it) frees its
/// slot in the client's session bound.
pub struct Session {
    handle: Arc<Handle<Verifier>>,
    addr: String,
    /// The host key the server presented (already checked against the expected one).
    pub host_key: PublicKey,
    command_timeout: Duration,
    /// Bound on opening a channel: a live server answers at once.
    open_timeout: Duration,
    /// A channel on a connection the client keeps (a watch's, or a spare one): closing
    /// the session must not close it.
    shared: bool,
    /// The spare map the connection is kept in, and under which worker: a connection on
    /// which no channel opens is let go from it, whoever was using it.
    spare: Option<(Spares, String)>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Session {
    /// Runs `command`, feeding it `stdin` then end-of-file, and collects its output.
    /// Secrets travel in `stdin`, never in `command`, which other users can see in `ps`.
    pub async fn exec(&self, command: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        let mut channel = self.open_channel().await?;
        let work = async {
            channel.exec(true, command).await.map_err(protocol)?;
            if let Some(input) = stdin {
                channel.data(input).await.map_err(protocol)?;
            }
            channel.eof().await.map_err(protocol)?;
            let mut collected = Collected::default();
            while let Some(msg) = channel.wait().await {
                collected.take(msg);
            }
            Ok(collected.output())
        };
        tokio::time::timeout(self.command_timeout, work)
            .await
            .map_err(|_| SshError::Timeout {
                addr: self.addr.clone(),
                stage: "command",
                after: self.command_timeout,
            })?
    }

    /// Runs a long-lived `command` (a stream of events) and calls `each` with every line
    /// of its stdout as it arrives, until the command ends or the connection drops. No
    /// command timeout: the caller bounds it (by dropping the future).
    pub async fn follow(&self, command: &str, mut each: impl FnMut(&str)) -> Result<(), SshError> {
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        let mut channel = self.open_channel().await?;
        channel.exec(true, command).await.map_err(protocol)?;
        channel.eof().await.map_err(protocol)?;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(msg) = channel.wait().await {
            if let ChannelMsg::Data { data } = msg {
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    each(String::from_utf8_lossy(&line).trim_end());
                }
                if pending.len() > MAX_CAPTURE {
                    pending.clear();
                }
            }
        }
        Ok(())
    }

    /// Opens a session channel, bounded by the open timeout: a live server answers at
    /// once, and a connection that died unnoticed fails here, before anything ran.
    async fn open_channel(&self) -> Result<russh::Channel<client::Msg>, SshError> {
        let not_opened = |cause: String| SshError::ChannelOpen {
            addr: self.addr.clone(),
            cause,
        };
        let failed =
            match tokio::time::timeout(self.open_timeout, self.handle.channel_open_session()).await
            {
                Ok(Ok(channel)) => return Ok(channel),
                Ok(Err(e)) => not_opened(e.to_string()),
                Err(_) => not_opened(format!("no answer within {:?}", self.open_timeout)),
            };
        if let Some((spare, name)) = &self.spare {
            let mut spare = spare.lock().expect("spare connections poisoned");
            if spare
                .get(name)
                .is_some_and(|s| Arc::ptr_eq(&s.handle, &self.handle))
            {
                spare.remove(name);
            }
        }
        Err(failed)
    }

    /// Starts `command` and returns its stdout as it comes, piece by piece
    /// ([`Reading::next`]): a stream too big to hold (a home's archive). The channel is
    /// not read while the caller works on a piece, so a slow reader slows the sender
    /// rather than filling memory.
    pub async fn exec_reading(&self, command: &str) -> Result<Reading, SshError> {
        let channel = self.open_channel().await?;
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        channel.exec(true, command).await.map_err(protocol)?;
        channel.eof().await.map_err(protocol)?;
        let (read, write) = channel.split();
        Ok(Reading {
            read,
            write,
            collected: Collected::default(),
            addr: self.addr.clone(),
            idle: self.command_timeout,
        })
    }

    /// Runs `command` with the pieces of `source` as its stdin, then end-of-file, and
    /// collects its (capped) output. Output is read while stdin is written, so a
    /// command that talks back cannot stall the stream. Fails if the command ends
    /// before it took everything, or if nothing moves for the command timeout.
    pub async fn exec_writing(
        &self,
        command: &str,
        source: impl futures::Stream<Item = anyhow::Result<Vec<u8>>>,
    ) -> anyhow::Result<Output> {
        use futures::StreamExt;
        let channel = self.open_channel().await?;
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        channel.exec(true, command).await.map_err(protocol)?;
        let (mut read, write) = channel.split();
        let idle = self.command_timeout;
        // When the stream last moved: the command may stay silent while it takes input.
        let base = Instant::now();
        let moved_ms = std::sync::atomic::AtomicU64::new(0);
        let since_moved = || {
            let at = Duration::from_millis(moved_ms.load(std::sync::atomic::Ordering::Relaxed));
            base.elapsed().saturating_sub(at)
        };
        let send = async {
            let sent = async {
                futures::pin_mut!(source);
                while let Some(piece) = source.next().await {
                    let piece = piece?;
                    tokio::time::timeout(idle, write.data(&piece[..]))
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!("{}: the command took no input for {idle:?}", self.addr)
                        })?
                        .map_err(protocol)?;
                    moved_ms.store(
                        base.elapsed().as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                write.eof().await.map_err(protocol)?;
                anyhow::Ok(())
            }
            .await;
            if sent.is_err() {
                // The command must not wait for the rest: closing ends it.
                let _ = write.close().await;
            }
            sent
        };
        let receive = async {
            let mut collected = Collected::default();
            loop {
                match tokio::time::timeout(idle, read.wait()).await {
                    Ok(Some(msg)) => collected.take(msg),
                    Ok(None) => break,
                    Err(_) if since_moved() < idle => continue,
                    Err(_) => break,
                };
            }
            collected.output()
        };
        let (sent, out) = tokio::join!(send, receive);
        if let Err(e) = sent
            && out.exit_status.is_none()
        {
            return Err(e);
        }
        Ok(out)
    }

    /// A keepalive request that the server must answer. OpenSSH answers it with a
    /// failure, as for any request it does not know: the answer is what counts.
    pub async fn keepalive(&self) -> Result<(), SshError> {
        match self
            .handle
            .send_global_request("keepalive@openssh.com", &[], true)
            .await
        {
            Ok(_) | Err(russh::Error::RequestDenied) => Ok(()),
            Err(cause) => Err(SshError::Protocol {
                addr: self.addr.clone(),
                cause,
            }),
        }
    }

    /// Whether this session is a channel on a worker's watch connection (rather than a
    /// connection of its own).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Says goodbye politely; errors are irrelevant at this point.
    pub async fn close(&self) {
        if self.shared {
            return;
        }
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// A command's stdout, read as it comes ([`Session::exec_reading`]).
pub struct Reading {
    read: russh::ChannelReadHalf,
    /// Kept so the channel stays open until the command ends, and to close it early.
    write: russh::ChannelWriteHalf<client::Msg>,
    /// The exit status and stderr as they arrive (stdout goes to the caller).
    collected: Collected,
    addr: String,
    /// The command fails if nothing arrives for this long.
    idle: Duration,
}

impl Reading {
    /// The next piece of stdout; `None` once the command has ended (then [`Reading::finish`]
    /// tells how).
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, SshError> {
        loop {
            let msg = tokio::time::timeout(self.idle, self.read.wait())
                .await
                .map_err(|_| SshError::Timeout {
                    addr: self.addr.clone(),
                    stage: "stream",
                    after: self.idle,
                })?;
            match msg {
                None => return Ok(None),
                Some(ChannelMsg::Data { data }) => return Ok(Some(data.to_vec())),
                Some(other) => self.collected.take(other),
            }
        }
    }

    /// Stops reading early: the channel is closed, so the command ends rather than
    /// sending the rest for nothing.
    pub async fn close(&self) {
        let _ = self.write.close().await;
    }

    /// What the command wrote on stderr so far (capped).
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.collected.stderr).into_owned()
    }

    /// The command's exit status and (capped) stderr, once [`Reading::next`] said `None`.
    pub fn finish(self) -> Output {
        self.collected.output()
    }
}

/// A command's output as it arrives: stdout and stderr capped, the exit status.
#[derive(Default)]
struct Collected {
    exit_status: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Collected {
    fn take(&mut self, msg: ChannelMsg) {
        match msg {
            ChannelMsg::Data { data } => append_capped(&mut self.stdout, &data),
            ChannelMsg::ExtendedData { data, .. } => append_capped(&mut self.stderr, &data),
            ChannelMsg::ExitStatus { exit_status } => self.exit_status = Some(exit_status),
            _ => {}
        }
    }

    fn output(self) -> Output {
        Output {
            exit_status: self.exit_status,
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
        }
    }
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_CAPTURE.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// russh callback that checks the server's host key against the expected one and keeps
/// the presented key for the caller.
struct Verifier {
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

    #[test]
    fn debug_output_never_shows_a_password() {
        let shown = format!("{:?}", Auth::Password("hunter2".into()));
        assert!(!shown.contains("hunter2"));
    }
}
