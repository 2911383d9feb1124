//! Watches: a long-lived, idle session per worker whose only job is to notice that the
//! worker went away (its connection closed, or keepalives unanswered). Its connection is
//! kept for commands meanwhile ([`super::pool`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::PublicKey;

use super::connect::{Verifier, client_algorithms};
use super::pool::SharedConnection;
use super::{Auth, SshClient, SshError, Target};

/// Keepalive period of watch sessions unless [`SshClient::set_keepalive`] says otherwise.
pub(super) const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);

/// Config of watch sessions: never idle-timed out, keepalives to notice a silent peer.
pub(super) fn watch_config(keepalive: Duration, max: usize) -> client::Config {
    client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive),
        keepalive_max: max,
        nodelay: true,
        preferred: client_algorithms(),
        ..Default::default()
    }
}

impl SshClient {
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
        let logged_in = tokio::time::Instant::now();
        self.shared
            .lock()
            .expect("shared sessions poisoned")
            .insert(
                target.name.clone(),
                (handle.clone(), host_key.clone(), logged_in),
            );
        Ok(Watch {
            handle,
            channel,
            host_key,
            name: target.name.clone(),
            shared: self.shared.clone(),
        })
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
            .is_some_and(|(h, _, _)| Arc::ptr_eq(h, &self.handle))
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
