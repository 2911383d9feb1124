//! The connections the client keeps open, and sessions on them: a worker's watch
//! connection (opened by [`super::watch`]) carries its commands without a new handshake;
//! without one, the last command's connection is kept a short while for the next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::Handle;
use russh::keys::PublicKey;

use super::connect::Verifier;
use super::{Session, SshClient, SshError, Target};

/// A watch's authenticated connection, the host key it was verified with, and when it
/// logged in ([`Session::logged_in`]).
pub(super) type SharedConnection = (Arc<Handle<Verifier>>, PublicKey, tokio::time::Instant);

/// A connection kept for the next commands, and when it was made. It holds no slot in
/// the session bound (it is idle between commands; each session on it is bounded by
/// its caller), so that kept connections can never starve new ones.
pub(super) struct Spare {
    pub(super) handle: Arc<Handle<Verifier>>,
    pub(super) host_key: PublicKey,
    pub(super) made: tokio::time::Instant,
}

/// The spare connections by worker name.
pub(super) type Spares = Arc<Mutex<HashMap<String, Spare>>>;

/// How long a spare connection is used for (well under the connections' inactivity
/// timeout): then the next command makes a new one, so that a connection that died
/// unnoticed is not handed out for long. And how many are kept at most.
const SPARE_LIFE: Duration = Duration::from_secs(30);
const SPARE_MAX: usize = 16;

impl SshClient {
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
        let mut session = self.on_kept(
            target,
            kept.handle.clone(),
            kept.host_key.clone(),
            kept.made,
        );
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
        logged_in: tokio::time::Instant,
    ) -> Session {
        Session {
            handle,
            addr: target.addr(),
            host_key,
            logged_in,
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
                made: session.logged_in,
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
            .filter(|(handle, key, _)| {
                // Only a live connection verified with the key expected now.
                !handle.is_closed()
                    && target
                        .host_key
                        .as_ref()
                        .is_none_or(|expected| expected.key_data() == key.key_data())
            })
            .cloned();
        shared
            .map(|(handle, host_key, logged_in)| self.on_kept(target, handle, host_key, logged_in))
    }

    /// How many workers have a live watch connection open.
    pub fn watched(&self) -> usize {
        self.shared
            .lock()
            .expect("shared sessions poisoned")
            .values()
            .filter(|(handle, _, _)| !handle.is_closed())
            .count()
    }
}
