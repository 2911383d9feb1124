//! The shared handles every part of Orion works with, built once at start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::config::Config;
use crate::playbook::Executor;
use crate::ssh::SshClient;
use crate::store::Store;
use crate::telemetry::LoopRegistry;

/// Handles shared by the API handlers and the control loops. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    /// The database: the only shared state between tasks and between Orion processes.
    pub store: Store,
    /// Orion's SSH client (probes, watches, and the native playbook executor).
    pub ssh: SshClient,
    /// Runs playbooks on workers.
    pub executor: Executor,
    /// The configuration Orion was started with.
    pub config: Arc<Config>,
    /// Last success and last error of each control loop, for the status endpoint.
    pub loops: Arc<LoopRegistry>,
    /// Serialises the probes of one worker (a round's probe and a watch-triggered one),
    /// so that each reads the counts the previous one wrote.
    pub probe_locks: Arc<KeyedLocks>,
    /// Bounds the database work of probes recorded one by one and of watches (half the
    /// pool), so that hundreds of workers changing at once (the first round, a fleet-wide
    /// outage, every watch opening at start) queue here instead of timing out on the
    /// pool, and the API keeps connections of its own.
    pub probe_db: Arc<tokio::sync::Semaphore>,
    /// Wakes the migration loop at once when a worker is declared dead, instead of
    /// waiting for its next tick.
    pub migrate_now: Arc<Notify>,
    /// Whether the last migration pass held all moves (too many workers dead at once),
    /// so the condition is logged when it starts and when it clears, not every pass.
    pub migration_held: Arc<std::sync::atomic::AtomicBool>,
    /// SHA-256 of the admin token, compared with the hash of each request's token.
    pub admin_token_hash: String,
    /// Cancelled when Orion starts shutting down, so that long-lived responses (the event
    /// stream) end and the server can drain.
    pub stopping: tokio_util::sync::CancellationToken,
    /// HTTP client for rental notifications (`notify_url`): no redirects, names resolved
    /// through [`Context::notify_policy`].
    pub http: reqwest::Client,
    /// Which addresses a `notify_url` may reach.
    pub notify_policy: crate::notify::AddressPolicy,
    /// Per client address, the budget of requests without a valid token
    /// (`[http]` in the configuration).
    pub limiter: Arc<crate::ratelimit::AddressLimiter>,
}

impl Context {
    /// A turn in the bound on the probes' and watches' database work
    /// ([`Context::probe_db`]).
    pub async fn probe_db_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.probe_db
            .acquire()
            .await
            .expect("the probe database bound is never closed")
    }
}

/// One async mutex per key, made on first use.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("keyed locks poisoned")
            .entry(key.to_owned())
            .or_default()
            .clone()
    }
}
