//! The shared handles every part of Orion works with, built once at start.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::loops::{LoopRegistry, Wakers};
use crate::notify::Notifier;
use crate::playbook::Executor;
use crate::ssh::SshClient;
use crate::store::Store;

/// Handles shared by the API handlers and the control loops. Cheap to clone.
///
/// What a loop keeps to itself (the probes' locks, the migration loop's memory) is not
/// here but in [`crate::startup::Loops`], handed to the loops at start.
#[derive(Clone)]
pub struct Context {
    /// The database: the only shared state between tasks and between Orion processes.
    pub store: Store,
    /// Orion's SSH client (probes, watches, and the native playbook executor).
    pub ssh: SshClient,
    /// Orion's probes of workers over [`Self::ssh`], with their memory of what each worker
    /// last proved (which decides how deep the next probe goes): shared by the probe
    /// rounds, the watches and the guard on moves.
    pub prober: crate::probe::depth::Prober,
    /// The SSH client for what tenants ask to read on workers (instances' logs): its own
    /// connections and session slots ([`SshClient::apart`]), so that tenants' reads never
    /// delay Orion's probes, reconciles and provisioning.
    pub reads_ssh: SshClient,
    /// The bounds on tenants' reads (`[apps.log_reads]`).
    pub reads: Arc<crate::ratelimit::TenantReads>,
    /// Runs playbooks on workers.
    pub executor: Executor,
    /// The configuration Orion was started with.
    pub config: Arc<Config>,
    /// Last success and last error of each control loop, for the status endpoint.
    pub loops: Arc<LoopRegistry>,
    /// Wakes a loop at once instead of at its next tick: the one signal between loops
    /// (a probe declares a worker dead, the migration loop moves its rentals), also sent
    /// by the API (a drained worker). Kept here because its senders are the probe code
    /// and the API, which hold nothing else of the loops.
    pub wake: Wakers,
    /// Work that outlives the request or pass that started it (rents and releases run
    /// apart from their client; notifications after a move): shutdown waits for it,
    /// up to `shutdown_deadline`.
    pub tasks: TaskTracker,
    /// SHA-256 of the admin token, compared with the hash of each request's token.
    pub admin_token_hash: String,
    /// Cancelled when Orion starts shutting down, so that long-lived responses (the event
    /// stream) end and the server can drain.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Delivers rental notifications (`notify_url`) to permitted addresses only.
    pub notifier: Notifier,
    /// Per client address, the budget of requests without a valid token
    /// (`[http]` in the configuration).
    pub limiter: Arc<crate::ratelimit::AddressLimiter>,
    /// The time `limiter`, `reads` and `proxies` are asked at: `Instant::now()`, or a
    /// time a test holds still, so that what they allow does not depend on the machine's
    /// speed.
    pub clock: crate::clock::Clock,
    /// The proxies whose `X-Forwarded-For` is believed (`[http]`).
    pub proxies: Arc<crate::proxies::TrustedProxies>,
    /// Keeps Caddy's app routes in sync (`[caddy] admin`), if apps are routed.
    pub router: Option<Arc<crate::apps::caddy::Router>>,
    /// Signs workers' host keys (`ssh.host_ca_key`), if configured.
    pub host_ca: Option<Arc<crate::hostca::HostCa>>,
    /// The memory of the guard on moves (when it last held them, whether each loop is
    /// held, which sites are lost), shared by the migration and apps loops.
    pub holds: Arc<crate::probe::holds::Holds>,
    /// Whether this process leads the control loops (one of several replicas does).
    pub leader: Arc<crate::leader::Leadership>,
}
