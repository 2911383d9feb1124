//! Orion's configuration: one documented struct, read from a TOML file and then from
//! `ORION_*` environment variables (nested keys joined by `__`, for example
//! `ORION_DATABASE__URL` or `ORION_HEALTH__INTERVAL=5s`).
//!
//! Typed at the door: a value written as text that means more (a size `256m`, a port
//! range `2200-2299`, Caddy's admin address) is read into its type (`config/values.rs`)
//! when the configuration is read, so that a bad one stops Orion at start naming its key,
//! and the code that uses it never parses it again.
//!
//! Each default is written once, beside its field (`#[serde_inline_default(…)]`); a
//! section left out of the file (`#[serde(default)]`) is every one of its fields at its
//! default, its `Default` derived from those (`default_from_fields!`).

#[cfg(test)]
mod reference;
mod values;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use serde_inline_default::serde_inline_default;

pub use values::{ByteSize, CaddyAdmin, Cpus};

/// Everything `orion serve` needs to run.
#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on. Behind Caddy this is only reachable on the
    /// control-plane network.
    #[serde_inline_default(SocketAddr::from(([0, 0, 0, 0], 8080)))]
    pub listen: SocketAddr,
    /// Path of the static inventory (TOML). Relative paths are taken from the directory
    /// `orion` runs in.
    #[serde_inline_default(PathBuf::from("inventory/local.toml"))]
    pub inventory: PathBuf,
    /// Directory holding the playbook templates (`create_user.sh.j2`, `delete_user.sh.j2`).
    #[serde_inline_default(PathBuf::from("playbooks"))]
    pub playbooks: PathBuf,
    /// How long Orion gives in-flight work after SIGTERM or Ctrl-C, all of it together:
    /// requests, loop passes, and the rents, releases and notifications running apart
    /// from them. Must stay below the time its supervisor waits before killing it
    /// (`stop_grace_period: 30s` in docker-compose.yml; Docker's default is 10 s), so
    /// that Orion, not a SIGKILL, decides what is cut.
    #[serde_inline_default(Duration::from_secs(20))]
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    pub database: DatabaseConfig,
    pub ssh: SshConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub provisioning: ProvisioningConfig,
    #[serde(default)]
    pub migration: MigrationConfig,
    #[serde(default)]
    pub cleanup: CleanupConfig,
    #[serde(default)]
    pub apps: AppsConfig,
    #[serde(default)]
    pub caddy: CaddyConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub snapshots: SnapshotsConfig,
    #[serde(default)]
    pub leader: LeaderConfig,
    #[serde(default)]
    pub tenants: TenantsConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Peers whose `X-Forwarded-For` is believed: the client address of a request is its
    /// TCP peer, unless the peer is one of these; then it is the right-most address of
    /// `X-Forwarded-For` that is not one of these (a proxy appends the address it saw;
    /// anything to its left was written by the client and may be forged). Loopback by
    /// default; behind Caddy on a container network, that network.
    #[serde_inline_default(vec![
        "127.0.0.0/8".parse().expect("a CIDR"),
        "::1/128".parse().expect("a CIDR"),
    ])]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Host names of trusted proxies (e.g. `caddy` on a container network), resolved
    /// again every 10 s: trusted like `trusted_proxies`, without trusting a whole
    /// network that others (workers on a site's network) may share.
    #[serde_inline_default(Vec::new())]
    pub trusted_proxy_hosts: Vec<String>,
    /// Refuse (403) every request whose TCP peer is not a trusted proxy: the API is
    /// reached through the proxy only, and nothing else can write `X-Forwarded-For`.
    /// Keep loopback in `trusted_proxies` for `orion healthcheck`.
    #[serde_inline_default(false)]
    pub proxied_only: bool,
    /// Requests that prove nothing (no token, an unknown or revoked token, the open
    /// routes) one client address may make at once…
    #[serde_inline_default(30)]
    pub anonymous_burst: u32,
    /// …and then per second. Beyond it: 429 with `Retry-After`, before any token is looked
    /// up. Requests with a good token are not counted.
    #[serde_inline_default(1.0)]
    pub anonymous_per_second: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The admin's bearer token (at least 24 characters): may do everything, including
    /// making tenant tokens. Best given as `ORION_AUTH__ADMIN_TOKEN` from a secret.
    pub admin_token: Secret,
}

/// A configuration value that must never be printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// sqlx URL of the MariaDB database, e.g. `mysql://orion:secret@mariadb:3306/orion`.
    pub url: String,
    /// Upper bound on open connections: a burst of requests queues for a connection
    /// instead of exhausting the server.
    #[serde_inline_default(20)]
    pub max_connections: u32,
    /// How long a request waits for a connection before it is answered 503. Kept short so
    /// that a database outage is reported quickly instead of piling up requests.
    #[serde_inline_default(Duration::from_secs(3))]
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// Orion's private key (OpenSSH format). Its public half must be in the workers'
    /// `/root/.ssh/authorized_keys`.
    pub key: PathBuf,
    /// The account Orion logs in as to provision tenants; it must be able to create users.
    #[serde_inline_default("root".to_owned())]
    pub user: String,
    /// Bound on TCP connect + SSH handshake + authentication.
    #[serde_inline_default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on one playbook run on a worker.
    #[serde_inline_default(Duration::from_secs(60))]
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Bound on SSH sessions open at once, probes and playbooks together, so a burst of
    /// work queues instead of exhausting file descriptors or the workers' `MaxStartups`.
    #[serde_inline_default(256)]
    pub max_sessions: usize,
    /// Orion's SSH host certificate authority (an OpenSSH ed25519 private key, made at
    /// first start if the file is missing). It signs each worker's pinned host key, so
    /// that one `@cert-authority` line (`GET /api/ssh/known_hosts`) lets tenants' SSH
    /// clients trust every worker, before and after a move. Unset: no host certificates.
    /// Every control-plane replica must use the same key.
    #[serde_inline_default(None)]
    pub host_ca_key: Option<PathBuf>,
    /// How long a worker's host certificate is valid; a new one is installed when less
    /// than a quarter of this is left.
    #[serde_inline_default(Duration::from_secs(30 * 86_400))]
    #[serde(with = "humantime_serde")]
    pub host_cert_validity: Duration,
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between two probe rounds over the whole inventory.
    #[serde_inline_default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Bound on one probe (connect, authenticate, run `true`). A worker that does not
    /// answer within it counts one failure.
    #[serde_inline_default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Consecutive failed probes before a worker is declared dead. Above one, a single
    /// slow answer or an sshd restart never moves a tenant.
    #[serde_inline_default(3)]
    pub dead_after: u32,
    /// Consecutive successful probes before a dead worker is declared alive again.
    #[serde_inline_default(2)]
    pub alive_after: u32,
    /// Pause between the confirmation probes of one round, after a failure.
    #[serde_inline_default(Duration::from_millis(300))]
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// Keep one idle SSH session open per worker, so that a worker closing it (stopped,
    /// crashed, sshd gone) is re-probed at once instead of at the next round.
    #[serde_inline_default(true)]
    pub watch: bool,
    /// How often a watch session checks that a silent worker still answers.
    #[serde_inline_default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before a watch session counts as dropped.
    #[serde_inline_default(3)]
    pub keepalive_max: usize,
    /// Probes run over a worker's watch connection, but open a new one at least this
    /// often, so that a worker whose sshd no longer accepts logins while old sessions
    /// live on (sshd stopped on a systemd host) is still found.
    #[serde_inline_default(Duration::from_secs(300))]
    #[serde(with = "humantime_serde")]
    pub handshake_every: Duration,
    /// Probes over a worker's watch connection run `true` in a new channel at least this
    /// often (the worker can start a session and a process); in between they are a
    /// keepalive round trip (its kernel, network and sshd answer), which costs the worker
    /// no process. Zero: every probe runs `true`.
    #[serde_inline_default(Duration::from_secs(300))]
    #[serde(with = "humantime_serde")]
    pub exec_every: Duration,
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningConfig {
    /// `native` runs the shell playbooks (`*.sh.j2`) over Orion's own SSH session: the
    /// fast default. `ansible` runs `create_user.yml` / `delete_user.yml` with
    /// `ansible-playbook`, for teams that live in Ansible.
    #[serde_inline_default(ExecutorKind::Native)]
    pub executor: ExecutorKind,
    /// The `ansible-playbook` program, by name on `PATH` or by path.
    #[serde_inline_default(PathBuf::from("ansible-playbook"))]
    pub ansible_playbook: PathBuf,
    /// The floor of the uids Orion gives tenant accounts. Each placement's account gets
    /// `uid_min + its placement id`, so a uid is never handed to a second tenant on any
    /// worker, and nothing below the floor (system accounts, the machine's own users) is
    /// ever touched. Pick a range no other account on the workers uses; on a running
    /// fleet only ever raise it.
    #[serde_inline_default(200_000)]
    pub uid_min: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Native,
    Ansible,
}

impl Config {
    /// The longest a rent may take end to end: the SSH connection and command bounds of
    /// two tries, plus slack. The API's request timeout.
    pub fn rent_deadline(&self) -> Duration {
        self.ssh.connect_timeout * 2 + self.ssh.command_timeout * 2 + Duration::from_secs(5)
    }
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Time between two passes that move rentals off dead workers. A worker declared
    /// dead also wakes the loop at once; this is the bound when nothing does.
    #[serde_inline_default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// When more than this fraction of the (3 or more) workers is dead at once, Orion
    /// is more likely cut off than the workers dead: it moves nothing and waits.
    #[serde_inline_default(0.5)]
    pub max_dead_fraction: f64,
    /// Attempts to deliver a rental's `notify_url` notification, 1 s, 2 s, 4 s… apart.
    #[serde_inline_default(4)]
    pub notify_attempts: u32,
    /// Bound on one notification attempt.
    #[serde_inline_default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub notify_timeout: Duration,
    /// Networks a `notify_url` may reach although they are loopback, link-local or
    /// private (by default none: a tenant must not make Orion probe its own network).
    /// CIDRs, e.g. `["10.20.0.0/16"]` for a receiver on the operator's network.
    #[serde_inline_default(Vec::new())]
    pub notify_allow: Vec<ipnet::IpNet>,
}

/// Limits that keep one tenant from taking the fleet.
#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsConfig {
    /// Most live rentals one tenant may hold at once; a token can carry its own limit
    /// (`POST /api/tokens` with `max_rentals`). The admin token has none.
    #[serde_inline_default(10)]
    pub max_rentals: u32,
    /// Longest `ttl` a rent or a renewal may ask for.
    #[serde_inline_default(Duration::from_secs(30 * 24 * 3600))]
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// The `ttl` of a tenant's rent that asks for none (unset: such rentals live until
    /// released). The admin's rentals never get one by default.
    #[serde_inline_default(None)]
    #[serde(with = "humantime_serde")]
    pub default_ttl: Option<Duration>,
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupConfig {
    /// Time between two passes that remove leftover tenant accounts from workers.
    #[serde_inline_default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppsConfig {
    /// Time between two passes that make the workers hold exactly the apps' instances.
    /// A change of an app, of a worker's status, or a container starting or dying on a
    /// worker also wakes the loop at once; this is the bound when nothing does.
    #[serde_inline_default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Whether apps may run on a worker rented to a tenant. Off: a rented worker hosts no
    /// instance (they move off it), and rents prefer workers without instances.
    #[serde_inline_default(false)]
    pub shared_workers: bool,
    /// Instances of an app run as uid and gid `uid_base` + the app's id: unprivileged
    /// whatever the image says, and never the uid of another app, so that one app's
    /// processes cannot signal or read another's (`/proc/<pid>/environ`) where they
    /// share a worker. Far above tenants' account uids (`provisioning.uid_min` + a
    /// placement's id).
    #[serde_inline_default(1_000_000_000)]
    pub uid_base: u32,
    /// Most memory of one instance, swap included (bytes, or e.g. `256m`).
    #[serde_inline_default(ByteSize::mib(256))]
    pub instance_memory: ByteSize,
    /// Most processes and threads in one instance.
    #[serde_inline_default(256)]
    pub instance_pids: u32,
    /// Most CPU one instance may use, in CPUs (e.g. `0.5`).
    #[serde_inline_default(Cpus::whole(1))]
    pub instance_cpus: Cpus,
    /// Largest log file of one instance (two are kept), e.g. `10m`: a chatty instance
    /// cannot fill its worker's disk.
    #[serde_inline_default(ByteSize::mib(10))]
    pub instance_log_max: ByteSize,
    /// Most instances a tenant's apps may ask for, all apps together (the admin's are
    /// not bounded).
    #[serde_inline_default(20)]
    pub max_instances_per_tenant: u32,
    /// Bounds on reading instances' logs (`GET /api/apps/{name}/logs`).
    #[serde(default)]
    pub log_reads: LogReadsConfig,
}

/// Reading an instance's log runs a command on its worker. A tenant's reads are bounded so
/// that they cannot crowd the worker's sshd or Orion's sessions (#24: 80 reads at once
/// kept an app's removed instance from coming back); past a bound they get 429 with
/// `Retry-After`. They also run on SSH connections of their own, apart from Orion's
/// probes, reconciles and provisioning, which never wait behind them.
#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogReadsConfig {
    /// Reads one tenant may have running at once.
    #[serde_inline_default(2)]
    pub per_tenant: u32,
    /// Reads of all tenants running at once (the admin's included).
    #[serde_inline_default(8)]
    pub total: u32,
    /// Reads one tenant may start in a burst…
    #[serde_inline_default(10)]
    pub burst: u32,
    /// …refilled at this many per second.
    #[serde_inline_default(1.0)]
    pub per_second: f64,
    /// Bytes of log one tenant may read per minute (a read's answer is at most 64 KiB).
    #[serde_inline_default(4 << 20)]
    pub bytes_per_minute: u64,
}

/// A DNS host name or an IPv4 address: what a Caddy site, a host certificate's
/// principal and a `known_hosts` pattern may all hold.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaddyConfig {
    /// Caddy's admin API, through which apps' routes are kept in sync:
    /// `unix:/path/to/admin.sock` (the platform's, in a volume only Caddy and Orion
    /// mount) or `http://host:port`. Unset: apps are not routed through Caddy.
    #[serde_inline_default(None)]
    pub admin: Option<CaddyAdmin>,
    /// The site's host name (`ORION_SITE`): Orion's API and dashboard are served there.
    #[serde_inline_default("localhost".into())]
    pub site: String,
    /// The domain apps are served under, each at `https://<name>.<apps_domain>/` (unset:
    /// `apps.<site>`). Never the site itself, nor a name under which the site lies: an app
    /// must not share an origin, or a parent domain's cookies, with the API and the
    /// dashboard (#24).
    #[serde_inline_default(None)]
    pub apps_domain: Option<String>,
}

impl CaddyConfig {
    /// The domain apps are served under.
    pub fn apps_domain(&self) -> String {
        // Empty counts as unset: what compose passes when ORION_APPS_DOMAIN is not set.
        match self.apps_domain.as_deref() {
            Some(domain) if !domain.is_empty() => domain.to_owned(),
            _ => format!("apps.{}", self.site),
        }
    }
}

/// The SSH gateway: one port per rental, stable for its whole life, whose connections
/// are forwarded (bytes only: SSH runs end to end between the client and the worker) to
/// the worker serving the rental now.
#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The ports rentals are given, `first-last` (e.g. `2200-2299`); the gateway listens
    /// on all of them (at most 4096). Unset: no gateway, rentals have no endpoint.
    #[serde_inline_default(None)]
    #[serde(deserialize_with = "values::port_range")]
    pub ports: Option<RangeInclusive<u16>>,
    /// Address the gateway's ports are bound on.
    #[serde_inline_default(std::net::IpAddr::from([0, 0, 0, 0]))]
    pub listen: std::net::IpAddr,
    /// The host name clients are told to connect to (the endpoint's `host`). It is also a
    /// principal of every worker's host certificate.
    #[serde_inline_default("localhost".into())]
    pub host: String,
    /// More names the gateway is reached by (principals of the host certificates, and
    /// patterns of the `@cert-authority` line).
    #[serde_inline_default(Vec::new())]
    pub names: Vec<String>,
    /// How long a new connection waits for its rental to be active again (a move in
    /// progress) before it is closed.
    #[serde_inline_default(Duration::from_secs(20))]
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// How long a new connection may stay silent: an SSH client sends its banner at
    /// once, so one that has sent nothing by then is closed, having cost neither a
    /// lookup nor a connection to a worker.
    #[serde_inline_default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub first_bytes_timeout: Duration,
    /// Connections open at once from one address (an IPv6 /64 counts as one), silent,
    /// waiting or forwarded: beyond, a new one is closed at once. Behind a TCP proxy
    /// (the `--ha` platform's HAProxy) every client has the proxy's address: there the
    /// proxy caps each address, and this must hold all of them.
    #[serde_inline_default(32)]
    pub max_per_source: usize,
    /// Connections waiting at once for their rental to become active (a move, a rent
    /// just made), all ports together; beyond, a connection that would wait is closed
    /// at once.
    #[serde_inline_default(256)]
    pub max_waiting: usize,
    /// Connections waiting at once on one port; beyond, closed at once.
    #[serde_inline_default(16)]
    pub max_waiting_per_port: usize,
    /// How long the gateway trusts its copy of the ports' rentals: it reads the whole
    /// table at most this often for connections whose rental is active, and again (at
    /// most ten times a second) when a rental is not active or its worker not
    /// answering. Every replica keeps its own copy: after a move, a replica may lead a
    /// new connection to the old worker for at most this long, and only if the whole
    /// move (which passes through `migrating`) took less.
    #[serde_inline_default(Duration::from_secs(1))]
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl GatewayConfig {
    /// Every name the gateway is reached by, `host` first.
    pub fn all_names(&self) -> Vec<String> {
        let mut names = vec![self.host.clone()];
        for n in &self.names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }
}

/// Leading the control loops when several `orion` processes share one database.
#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderConfig {
    /// This process's name among the replicas, in `/health`, events and the lease. Unset:
    /// the host name, the process id and a random suffix (unique per start).
    #[serde_inline_default(None)]
    pub instance: Option<String>,
    /// How long a lease lasts unless renewed: a dead leader is replaced within about
    /// this plus `renew_every`.
    #[serde_inline_default(Duration::from_secs(3))]
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often every process tries to take or renew the lease.
    #[serde_inline_default(Duration::from_secs(1))]
    #[serde(with = "humantime_serde")]
    pub renew_every: Duration,
}

impl LeaderConfig {
    /// This process's instance name: the configured one, or a new unique one.
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "orion".into());
            format!(
                "{host}-{}-{:04x}",
                std::process::id(),
                rand::random::<u16>()
            )
        })
    }
}

/// Snapshots of rentals' homes, restored on the new worker when a rental moves.
#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// Whether homes are snapshotted (and restored after a move).
    #[serde_inline_default(true)]
    pub enabled: bool,
    /// Time between two snapshots of a home; one is taken only if something changed.
    /// What a failover loses is at most about this much of the tenant's work.
    #[serde_inline_default(Duration::from_secs(60))]
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Largest home snapshotted, e.g. `256m`: the apparent size of its files, measured on
    /// the worker before anything is sent (a home over it costs no transfer, whatever it
    /// holds), and the compressed snapshot is held to it as it streams. A bigger home
    /// keeps its last snapshot, with a `snapshot.too_big` event.
    #[serde_inline_default(ByteSize::mib(256))]
    pub max_bytes: ByteSize,
    /// Homes snapshotted at once by one pass.
    #[serde_inline_default(4)]
    pub concurrency: usize,
    /// Longest one snapshot or restore may take, end to end. A tenant can stop or slow its
    /// own snapshot (it is read as the tenant); at this deadline the job is ended, on
    /// Orion's side and on the worker's, with a `snapshot.deadline` event (a restore's
    /// move is tried again). A job still running is not waited for by the next pass.
    #[serde_inline_default(Duration::from_secs(600))]
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

#[serde_inline_default]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log collectors.
    #[serde_inline_default(LogFormat::Text)]
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `orion=debug,info`; `RUST_LOG` wins if set.
    #[serde_inline_default("info".to_owned())]
    pub filter: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `Default` for sections whose every field has a default: what a section left out of the
/// file means, taken from the `#[serde_inline_default]` beside each field (the one place a
/// default is written) by reading the section from no fields at all.
macro_rules! default_from_fields {
    ($($section:ty),* $(,)?) => {$(
        impl Default for $section {
            fn default() -> Self {
                from_no_fields()
            }
        }
    )*};
}

default_from_fields!(
    HttpConfig,
    HealthConfig,
    ProvisioningConfig,
    MigrationConfig,
    TenantsConfig,
    CleanupConfig,
    AppsConfig,
    LogReadsConfig,
    CaddyConfig,
    GatewayConfig,
    LeaderConfig,
    SnapshotsConfig,
    LogConfig,
);

fn from_no_fields<T: serde::de::DeserializeOwned>() -> T {
    let none = serde::de::value::MapDeserializer::<_, serde::de::value::Error>::new(
        std::iter::empty::<(&str, &str)>(),
    );
    T::deserialize(none).expect("every field of a section has a default")
}

/// The top-level keys of [`Config`], for picking configuration out of the environment.
const TOP_LEVEL_FIELDS: &[&str] = &[
    "listen",
    "inventory",
    "playbooks",
    "database",
    "ssh",
    "health",
    "provisioning",
    "migration",
    "cleanup",
    "apps",
    "caddy",
    "gateway",
    "snapshots",
    "leader",
    "tenants",
    "auth",
    "http",
    "log",
    "shutdown_deadline",
];

/// A configuration that cannot be used, with the file and the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path`, then applies `ORION_*` environment overrides, then checks values that
    /// the types alone do not rule out.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Missing(path.to_owned()));
        }
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Self::environment());
        Self::from_figment(figment)
    }

    /// `ORION_*` variables that name a configuration field. Others (`ORION_CONFIG`, the
    /// test harness's `ORION_TEST_*`) are not configuration and are left alone.
    fn environment() -> Env {
        Env::prefixed("ORION_")
            .filter(|key| {
                let top = key.as_str().split("__").next().unwrap_or_default();
                TOP_LEVEL_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(top))
            })
            .split("__")
    }

    /// Reads a configuration from TOML text alone (tests, `orion check`).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|errors| {
            // figment names the key and the file (or environment variable) it came from.
            let all: Vec<String> = errors.into_iter().map(|e| e.to_string()).collect();
            ConfigError::Invalid(all.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, why: &str| Err(ConfigError::Invalid(format!("`{field}` {why}")));
        if self.auth.admin_token.expose().len() < 24 {
            return bad("auth.admin_token", "must be at least 24 characters");
        }
        if self.health.dead_after == 0 {
            return bad("health.dead_after", "must be at least 1");
        }
        if self.health.alive_after == 0 {
            return bad("health.alive_after", "must be at least 1");
        }
        if self.health.interval.is_zero() {
            return bad("health.interval", "must be longer than zero");
        }
        if self.migration.interval.is_zero() {
            return bad("migration.interval", "must be longer than zero");
        }
        if !(0.0..=1.0).contains(&self.migration.max_dead_fraction) {
            return bad("migration.max_dead_fraction", "must be between 0 and 1");
        }
        if self.health.handshake_every.is_zero() {
            return bad("health.handshake_every", "must be longer than zero");
        }
        if self.health.keepalive_interval.is_zero() {
            return bad("health.keepalive_interval", "must be longer than zero");
        }
        if self.cleanup.interval.is_zero() {
            return bad("cleanup.interval", "must be longer than zero");
        }
        if !is_host_name(&self.caddy.site) {
            return bad("caddy.site", "must be a host name");
        }
        let apps = self.caddy.apps_domain().to_ascii_lowercase();
        let site = self.caddy.site.to_ascii_lowercase();
        if !is_host_name(&apps) {
            return bad("caddy.apps_domain", "must be a host name");
        }
        // An app's host under the site's own name is fine (`web.apps.<site>`); the site
        // under the apps domain, or the site itself, is not: the API would be an app's
        // sibling origin, sharing what browsers scope to a parent domain.
        if apps == site || site.ends_with(&format!(".{apps}")) {
            return bad(
                "caddy.apps_domain",
                "must not be the site nor a domain the site lies under (apps get origins of their own)",
            );
        }
        if self.gateway.first_bytes_timeout.is_zero() {
            return bad("gateway.first_bytes_timeout", "must be longer than zero");
        }
        if self.gateway.max_per_source == 0
            || self.gateway.max_waiting == 0
            || self.gateway.max_waiting_per_port == 0
        {
            return bad(
                "gateway.max_per_source",
                "gateway.max_waiting and gateway.max_waiting_per_port must be above zero",
            );
        }
        if self.gateway.cache_ttl > Duration::from_secs(10) {
            return bad(
                "gateway.cache_ttl",
                "must be at most 10s (a move must reach every replica's gateway soon)",
            );
        }
        if self.gateway.all_names().iter().any(|n| !is_host_name(n)) {
            return bad("gateway.host", "and gateway.names must be host names");
        }
        if self.snapshots.max_bytes < ByteSize::mib(1) {
            return Err(ConfigError::Invalid(format!(
                "snapshots.max_bytes `{}` is below 1 MiB",
                self.snapshots.max_bytes
            )));
        }
        if self.snapshots.interval.is_zero() || self.snapshots.concurrency == 0 {
            return bad(
                "snapshots.interval",
                "and snapshots.concurrency must be above zero",
            );
        }
        if self.snapshots.deadline < Duration::from_secs(1) {
            return bad("snapshots.deadline", "must be at least 1s");
        }
        if self.leader.renew_every.is_zero() || self.leader.lease < self.leader.renew_every * 2 {
            return bad(
                "leader.lease",
                "must be at least twice leader.renew_every (a renewal may be late once)",
            );
        }
        if self
            .leader
            .instance
            .as_ref()
            .is_some_and(|i| i.is_empty() || i.len() > 128)
        {
            return bad("leader.instance", "must be 1 to 128 characters");
        }
        if self.ssh.host_cert_validity < Duration::from_secs(3600) {
            return bad("ssh.host_cert_validity", "must be at least 1h");
        }
        if self.apps.interval.is_zero() {
            return bad("apps.interval", "must be longer than zero");
        }
        if self.apps.instance_memory < ByteSize::mib(6) {
            return Err(ConfigError::Invalid(format!(
                "apps.instance_memory `{}` is below Docker's 6 MiB minimum",
                self.apps.instance_memory
            )));
        }
        if self.apps.instance_log_max < ByteSize::mib(1) {
            return Err(ConfigError::Invalid(format!(
                "apps.instance_log_max `{}` is below 1 MiB",
                self.apps.instance_log_max
            )));
        }
        if self.apps.instance_pids == 0 {
            return bad("apps.instance_pids", "must be at least 1");
        }
        if self.apps.uid_base <= self.provisioning.uid_min || self.apps.uid_base > 2_000_000_000 {
            return bad(
                "apps.uid_base",
                "must be above provisioning.uid_min and at most 2000000000",
            );
        }
        if self.provisioning.uid_min < 1000 {
            return bad(
                "provisioning.uid_min",
                "must be at least 1000: below are the system's own accounts",
            );
        }
        if self
            .tenants
            .default_ttl
            .is_some_and(|t| t > self.tenants.max_ttl)
        {
            return bad("tenants.default_ttl", "must not exceed tenants.max_ttl");
        }
        let reads = &self.apps.log_reads;
        if reads.per_tenant == 0 || reads.total == 0 || reads.burst == 0 {
            return bad(
                "apps.log_reads",
                "per_tenant, total and burst must be at least 1",
            );
        }
        if !(reads.per_second > 0.0 && reads.per_second.is_finite()) || reads.bytes_per_minute == 0
        {
            return bad(
                "apps.log_reads",
                "per_second and bytes_per_minute must be above zero",
            );
        }
        if self
            .http
            .trusted_proxy_hosts
            .iter()
            .any(|h| !is_host_name(h))
        {
            return bad("http.trusted_proxy_hosts", "must be host names");
        }
        if self.ssh.max_sessions == 0 {
            return bad("ssh.max_sessions", "must be at least 1");
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1");
        }
        if self.http.anonymous_burst == 0 {
            return bad("http.anonymous_burst", "must be at least 1");
        }
        // Below one per day it is a ban, not a limit; and not a number is no limit.
        let rate = self.http.anonymous_per_second;
        if rate.is_nan() || rate < 1.0 / 86_400.0 {
            return bad(
                "http.anonymous_per_second",
                "must be at least 1/86400 (one a day)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [database]
        url = "mysql://root@127.0.0.1/orion"
        [ssh]
        key = "/etc/orion/id_ed25519"
        [auth]
        admin_token = "0123456789abcdefghijklmnop"
    "#;

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(config.health.interval, Duration::from_secs(30));
        assert_eq!(config.cleanup.interval, Duration::from_secs(10));
        assert_eq!(config.ssh.user, "root");
        assert_eq!(config.listen.port(), 8080);
    }

    #[test]
    fn a_partial_section_takes_the_rest_from_its_defaults() {
        let text = format!("{MINIMAL}\n[health]\ndead_after = 5\n");
        let text = text.replacen("[ssh]\n", "[ssh]\nuser = \"orion\"\n", 1);
        let config = Config::from_toml_str(&text).unwrap();
        assert_eq!(config.health.dead_after, 5);
        assert_eq!(
            config.health.alive_after,
            HealthConfig::default().alive_after
        );
        assert_eq!(config.health.interval, HealthConfig::default().interval);
        assert_eq!(config.ssh.user, "orion");
        assert_eq!(config.ssh.max_sessions, 256);
        assert_eq!(config.tenants.default_ttl, None);
    }

    #[test]
    fn durations_are_read_in_human_form() {
        let text = format!("{MINIMAL}\n[health]\ninterval = \"5s\"\nprobe_timeout = \"750ms\"\n");
        let config = Config::from_toml_str(&text).unwrap();
        assert_eq!(config.health.interval, Duration::from_secs(5));
        assert_eq!(config.health.probe_timeout, Duration::from_millis(750));
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let text = format!("{MINIMAL}\n[health]\ndead_after = \"three\"\n");
        let err = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("dead_after"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_refused_by_name() {
        let text = format!("{MINIMAL}\n[health]\nintervall = \"5s\"\n");
        let err = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("intervall"), "{err}");
    }

    #[test]
    fn a_missing_section_is_named() {
        let err = Config::from_toml_str(
            "[ssh]\nkey = \"k\"\n[auth]\nadmin_token = \"0123456789abcdefghijklmnop\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("database"), "{err}");
    }

    #[test]
    fn zero_thresholds_are_refused() {
        let text = format!("{MINIMAL}\n[health]\ndead_after = 0\n");
        let err = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("health.dead_after"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid_and_shows_the_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/orion.example.toml"))
                .unwrap();
        let example = Config::from_toml_str(&text).unwrap();
        let defaults = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(example.health.interval, defaults.health.interval);
        assert_eq!(example.health.dead_after, defaults.health.dead_after);
        assert_eq!(example.health.alive_after, defaults.health.alive_after);
        assert_eq!(example.health.probe_timeout, defaults.health.probe_timeout);
        assert_eq!(example.health.retry_delay, defaults.health.retry_delay);
        assert_eq!(example.cleanup.interval, defaults.cleanup.interval);
        assert_eq!(example.health.watch, defaults.health.watch);
        assert_eq!(
            example.health.keepalive_interval,
            defaults.health.keepalive_interval
        );
        assert_eq!(example.health.keepalive_max, defaults.health.keepalive_max);
        assert_eq!(
            example.health.handshake_every,
            defaults.health.handshake_every
        );
        assert_eq!(example.health.exec_every, defaults.health.exec_every);
        assert_eq!(example.migration.interval, defaults.migration.interval);
        assert_eq!(
            example.migration.max_dead_fraction,
            defaults.migration.max_dead_fraction
        );
        assert_eq!(
            example.migration.notify_attempts,
            defaults.migration.notify_attempts
        );
        assert_eq!(
            example.migration.notify_timeout,
            defaults.migration.notify_timeout
        );
        assert_eq!(example.ssh.connect_timeout, defaults.ssh.connect_timeout);
        assert_eq!(example.ssh.command_timeout, defaults.ssh.command_timeout);
        assert_eq!(example.ssh.max_sessions, defaults.ssh.max_sessions);
        assert_eq!(
            example.database.max_connections,
            defaults.database.max_connections
        );
        assert_eq!(example.listen, defaults.listen);
        assert_eq!(
            example.gateway.first_bytes_timeout,
            defaults.gateway.first_bytes_timeout
        );
        assert_eq!(
            example.gateway.max_per_source,
            defaults.gateway.max_per_source
        );
        assert_eq!(example.gateway.max_waiting, defaults.gateway.max_waiting);
        assert_eq!(
            example.gateway.max_waiting_per_port,
            defaults.gateway.max_waiting_per_port
        );
        assert_eq!(example.gateway.cache_ttl, defaults.gateway.cache_ttl);
        assert_eq!(example.snapshots.deadline, defaults.snapshots.deadline);
        assert_eq!(example.shutdown_deadline, defaults.shutdown_deadline);
        assert_eq!(example.http.trusted_proxies, defaults.http.trusted_proxies);
        assert_eq!(
            example.http.trusted_proxy_hosts,
            defaults.http.trusted_proxy_hosts
        );
        assert_eq!(example.http.proxied_only, defaults.http.proxied_only);
        let (reads, default_reads) = (&example.apps.log_reads, &defaults.apps.log_reads);
        assert_eq!(reads.per_tenant, default_reads.per_tenant);
        assert_eq!(reads.total, default_reads.total);
        assert_eq!(reads.burst, default_reads.burst);
        assert_eq!(reads.per_second, default_reads.per_second);
        assert_eq!(reads.bytes_per_minute, default_reads.bytes_per_minute);
        assert_eq!(example.http.anonymous_burst, defaults.http.anonymous_burst);
        assert_eq!(
            example.http.anonymous_per_second,
            defaults.http.anonymous_per_second
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn trusted_proxies_are_cidrs_from_the_file_or_the_environment() {
        let text = format!("{MINIMAL}\n[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1/128\"]\n");
        let config = Config::from_toml_str(&text).unwrap();
        assert_eq!(config.http.trusted_proxies.len(), 2);
        let text = format!("{MINIMAL}\n[http]\ntrusted_proxies = [\"10.0.0.300/8\"]\n");
        let err = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("trusted_proxies"), "{err}");
        figment::Jail::expect_with(|jail| {
            jail.create_file("orion.toml", MINIMAL)?;
            jail.set_env(
                "ORION_HTTP__TRUSTED_PROXIES",
                "[127.0.0.0/8, 172.16.0.0/12, \"fd00::/8\"]",
            );
            let config = Config::load(Path::new("orion.toml")).map_err(|e| e.to_string())?;
            assert_eq!(config.http.trusted_proxies.len(), 3);
            assert_eq!(config.http.trusted_proxies[1].to_string(), "172.16.0.0/12");
            Ok(())
        });
    }

    #[test]
    fn a_rate_that_is_no_rate_is_refused() {
        for bad in ["0", "-1", "nan"] {
            let text = format!("{MINIMAL}\n[http]\nanonymous_per_second = {bad}\n");
            let err = Config::from_toml_str(&text).unwrap_err().to_string();
            assert!(err.contains("http.anonymous_per_second"), "{bad}: {err}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn environment_variables_override_the_file_and_others_are_ignored() {
        figment::Jail::expect_with(|jail| {
            let without_auth = MINIMAL.replace("[auth]", "").replace("admin_token", "# ");
            jail.create_file("orion.toml", &without_auth)?;
            jail.set_env("ORION_AUTH__ADMIN_TOKEN", "from-the-environment-0123456789");
            jail.set_env("ORION_DATABASE__URL", "mysql://orion:s3cret@db:3306/orion");
            jail.set_env("ORION_HEALTH__INTERVAL", "7s");
            jail.set_env("ORION_TENANTS__MAX_RENTALS", "3");
            jail.set_env("ORION_SHUTDOWN_DEADLINE", "5s");
            jail.set_env("ORION_CONFIG", "/somewhere/else.toml");
            jail.set_env("ORION_TEST_DATABASE_URL", "mysql://root@127.0.0.1");
            let config = Config::load(Path::new("orion.toml")).map_err(|e| e.to_string())?;
            assert_eq!(config.database.url, "mysql://orion:s3cret@db:3306/orion");
            assert_eq!(config.health.interval, Duration::from_secs(7));
            assert_eq!(config.tenants.max_rentals, 3);
            assert_eq!(config.shutdown_deadline, Duration::from_secs(5));
            assert_eq!(
                config.auth.admin_token.expose(),
                "from-the-environment-0123456789"
            );
            Ok(())
        });
    }

    #[test]
    fn a_short_admin_token_is_refused_and_the_token_never_printed() {
        let text = MINIMAL.replace("0123456789abcdefghijklmnop", "short");
        let err = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("auth.admin_token"), "{err}");
        let config = Config::from_toml_str(MINIMAL).unwrap();
        assert!(!format!("{config:?}").contains("0123456789abcdefghijklmnop"));
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = Config::load(Path::new("/nonexistent/orion.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/orion.toml"), "{err}");
    }

    #[test]
    fn the_gateway_ports_are_a_bounded_range_and_its_names_host_names() {
        let ports = |p: &str| {
            Config::from_toml_str(&format!("{MINIMAL}\n[gateway]\nports = \"{p}\"\n"))
                .map(|c| c.gateway.ports)
                .map_err(|e| e.to_string())
        };
        assert_eq!(ports("2200-2219").unwrap(), Some(2200..=2219));
        assert_eq!(ports(" 22 - 22 ").unwrap(), Some(22..=22));
        for bad in ["2200", "2219-2200", "0-10", "a-b", "1-70000", "1000-9000"] {
            let err = ports(bad).unwrap_err();
            assert!(err.contains("gateway.ports"), "{bad}: {err}");
        }
        assert_eq!(GatewayConfig::default().ports, None);
        let text = format!("{MINIMAL}\n[gateway]\nports = \"2200-2201\"\nnames = [\"a b\"]\n");
        let err = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("gateway.host"), "{err}");
        let named = GatewayConfig {
            names: vec!["gw.example.org".into(), "localhost".into()],
            ..GatewayConfig::default()
        };
        assert_eq!(named.all_names(), ["localhost", "gw.example.org"]);
    }

    #[test]
    fn sizes_ranges_and_addresses_are_typed_when_read() {
        let text = format!(
            "{MINIMAL}\n[apps]\ninstance_memory = \"512m\"\ninstance_log_max = \"20971520\"\n\
             instance_cpus = 0.5\n[snapshots]\nmax_bytes = \"1g\"\n[gateway]\n\
             ports = \"2200-2219\"\n[caddy]\nadmin = \"http://127.0.0.1:2019\"\n"
        );
        let config = Config::from_toml_str(&text).unwrap();
        assert_eq!(config.apps.instance_memory.bytes(), 512 << 20);
        assert_eq!(config.apps.instance_log_max, ByteSize::mib(20));
        assert_eq!(config.apps.instance_cpus.milli(), 500);
        assert_eq!(config.snapshots.max_bytes.bytes(), 1 << 30);
        assert_eq!(config.gateway.ports, Some(2200..=2219));
        assert_eq!(
            config.caddy.admin,
            Some(CaddyAdmin::Tcp("127.0.0.1:2019".into()))
        );
        let defaults = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(defaults.apps.instance_memory, ByteSize::mib(256));
        assert_eq!(defaults.apps.instance_log_max, ByteSize::mib(10));
        assert_eq!(defaults.snapshots.max_bytes, ByteSize::mib(256));
        assert_eq!(defaults.caddy.admin, None);
    }

    #[test]
    fn a_bad_size_cpu_share_or_admin_address_is_refused_by_name() {
        for (section, line, named) in [
            ("apps", "instance_memory = \"lots\"", "apps.instance_memory"),
            (
                "apps",
                "instance_memory = \"4m\"",
                "apps.instance_memory `4m` is below",
            ),
            ("apps", "instance_log_max = \"1t\"", "apps.instance_log_max"),
            (
                "apps",
                "instance_log_max = \"512k\"",
                "apps.instance_log_max `512k`",
            ),
            ("apps", "instance_cpus = 0.001", "apps.instance_cpus"),
            (
                "snapshots",
                "max_bytes = \"10k\"",
                "snapshots.max_bytes `10k` is below",
            ),
            ("caddy", "admin = \"unix:relative.sock\"", "caddy.admin"),
            ("caddy", "admin = \"https://x\"", "caddy.admin"),
        ] {
            let text = format!("{MINIMAL}\n[{section}]\n{line}\n");
            let err = Config::from_toml_str(&text).unwrap_err().to_string();
            assert!(err.contains(named), "{line}: {err}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn typed_values_come_from_the_environment_as_compose_writes_them() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("orion.toml", MINIMAL)?;
            jail.set_env("ORION_GATEWAY__PORTS", "2200-2219");
            jail.set_env("ORION_CADDY__ADMIN", "unix:/run/caddy-admin/admin.sock");
            jail.set_env("ORION_APPS__INSTANCE_MEMORY", "512m");
            let config = Config::load(Path::new("orion.toml")).map_err(|e| e.to_string())?;
            assert_eq!(config.gateway.ports, Some(2200..=2219));
            assert_eq!(
                config.caddy.admin,
                Some(CaddyAdmin::Unix("/run/caddy-admin/admin.sock".into()))
            );
            assert_eq!(config.apps.instance_memory, ByteSize::mib(512));
            jail.set_env("ORION_GATEWAY__PORTS", "2219-2200");
            // figment names the variable's key as it is written there: `GATEWAY.PORTS`.
            let err = Config::load(Path::new("orion.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.to_lowercase().contains("gateway.ports"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_section_left_out_is_each_of_its_fields_at_its_default() {
        // Each `Default` is read from the fields' own defaults: none may be missing.
        let _ = (
            HttpConfig::default(),
            HealthConfig::default(),
            ProvisioningConfig::default(),
            MigrationConfig::default(),
            TenantsConfig::default(),
            CleanupConfig::default(),
            AppsConfig::default(),
            CaddyConfig::default(),
            GatewayConfig::default(),
            LeaderConfig::default(),
            SnapshotsConfig::default(),
            LogConfig::default(),
        );
        assert_eq!(HealthConfig::default().dead_after, 3);
        assert_eq!(AppsConfig::default().log_reads.burst, 10);
        assert_eq!(ProvisioningConfig::default().executor, ExecutorKind::Native);
        assert_eq!(HttpConfig::default().trusted_proxies.len(), 2);
        let config = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(config.ssh.host_ca_key, None);
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn every_section_of_the_example_can_come_from_the_environment() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/orion.example.toml"))
                .unwrap();
        let table: toml::Table = text.parse().unwrap();
        for key in table.keys() {
            assert!(
                TOP_LEVEL_FIELDS.contains(&key.as_str()),
                "ORION_{}__… would be ignored: add `{key}` to TOP_LEVEL_FIELDS",
                key.to_uppercase()
            );
        }
    }
}
