//! Builds Orion from a [`Config`] and runs it until told to stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::config::Config;
use crate::config::ExecutorKind;
use crate::context::Context;
use crate::inventory::Inventory;
use crate::loops::{self, LoopRegistry, apps, cleanup, health, migration, snapshots, watch};
use crate::playbook::{Ansible, Executor, Playbook, Playbooks};
use crate::ssh::SshClient;
use crate::store::Store;

/// How long Orion waits for MariaDB at start before giving up (compose may start Orion
/// while the database is still initialising).
const DATABASE_WAIT: Duration = Duration::from_secs(60);

/// The loops' own state, made once at start and handed to them rather than kept in the
/// [`Context`] the API shares. Tests that call a pass directly pass it too, so that their
/// pass and the running loop's see the same locks and the same memory of the last pass.
#[derive(Debug, Clone)]
pub struct Loops {
    /// Shared by the probe rounds and the watches: both probe workers.
    pub probes: Arc<crate::probe::Probes>,
    /// Private to the migration loop.
    pub migration: Arc<crate::loops::migration::State>,
    /// Private to the apps loop.
    pub apps: Arc<crate::loops::apps::State>,
    /// Private to the snapshots loop.
    pub snapshots: Arc<crate::loops::snapshots::State>,
}

impl Loops {
    /// The state for a pool of `max_connections` database connections.
    pub fn new(max_connections: u32) -> Self {
        Self {
            probes: Arc::new(crate::probe::Probes::new(max_connections)),
            migration: Arc::default(),
            apps: Arc::default(),
            snapshots: Arc::default(),
        }
    }
}

/// A built, not yet running, Orion: API listener bound, schema applied, inventory synced.
pub struct Application {
    listener: TcpListener,
    /// The SSH gateway's listeners (`gateway.ports`), if it is on.
    gateway: Option<crate::gateway::Gateway>,
    ctx: Context,
    loops: Loops,
}

impl Application {
    /// Validates the inventory and playbooks, loads Orion's key, applies the schema, syncs
    /// the inventory into the database, finishes work a previous process left half-done,
    /// and binds the listener. Any failure stops here, before anything is served.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Installed first, so nothing recorded from here on is lost.
        crate::metrics::handle();
        Inventory::load(&config.inventory)?;
        let playbooks = Playbooks::load(&config.playbooks)?;
        let mut ssh = SshClient::new(
            &config.ssh.key,
            &config.ssh.user,
            config.ssh.connect_timeout,
            config.ssh.command_timeout,
            config.ssh.max_sessions,
        )?;
        ssh.set_keepalive(
            config.health.keepalive_interval,
            config.health.keepalive_max,
        );
        let store = Store::connect_lazy(
            &config.database.url,
            config.database.max_connections,
            config.database.acquire_timeout,
        )?;
        migrate_when_ready(&store, DATABASE_WAIT).await?;
        crate::inventory::apply_file(&store, &config.inventory, true).await?;
        let mut executor = Executor::new(
            Arc::new(playbooks),
            ssh.clone(),
            config.provisioning.uid_min,
        );
        if config.provisioning.executor == ExecutorKind::Ansible {
            for playbook in Playbook::WITH_TWINS {
                let path = config.playbooks.join(format!("{}.yml", playbook.name()));
                anyhow::ensure!(
                    path.is_file(),
                    "Ansible playbook {} is missing",
                    path.display()
                );
            }
            executor = executor.with_ansible(Ansible {
                program: config.provisioning.ansible_playbook.clone(),
                playbooks: config.playbooks.clone(),
                key: config.ssh.key.clone(),
                user: config.ssh.user.clone(),
                timeout: config.ssh.command_timeout,
            });
        }
        // Apps' routes through Caddy, when its admin API is configured.
        let router = config.caddy.admin.clone().map(|admin| {
            Arc::new(crate::apps::caddy::Router::new(
                admin,
                &config.caddy.apps_domain(),
            ))
        });
        let host_ca = config
            .ssh
            .host_ca_key
            .as_deref()
            .map(crate::hostca::HostCa::load_or_create)
            .transpose()
            .context("Failed to load the SSH host certificate authority")?
            .map(Arc::new);
        let gateway = match config.gateway.ports.clone() {
            Some(ports) => {
                store
                    .sync_endpoints(ports.clone())
                    .await
                    .context("Failed to record the gateway's ports")?;
                Some(crate::gateway::Gateway::bind(config.gateway.listen, ports).await?)
            }
            None => None,
        };
        let admin_token_hash = crate::auth::token_hash(config.auth.admin_token.expose());
        let config_leader = config.leader.clone();
        let loops = Loops::new(config.database.max_connections);
        let notifier = crate::notify::Notifier::new(
            crate::notify::AddressPolicy::new(config.migration.notify_allow.clone()),
            config.migration.notify_attempts,
            config.migration.notify_timeout,
        )
        .context("Failed to build the HTTP client")?;
        let limiter = crate::ratelimit::AddressLimiter::new(
            config.http.anonymous_burst,
            config.http.anonymous_per_second,
        );
        let proxies = crate::proxies::TrustedProxies::new(&config.http);
        let reads_ssh = ssh.apart(config.apps.log_reads.total as usize);
        let reads = crate::ratelimit::TenantReads::new(config.apps.log_reads.clone());
        let prober = crate::probe::Prober::new(
            ssh.clone(),
            crate::probe::policy::DepthEvery::of(&config.health),
        );
        let ctx = Context {
            store,
            ssh,
            prober,
            reads_ssh,
            reads: Arc::new(reads),
            executor,
            config: Arc::new(config),
            loops: Arc::new(LoopRegistry::default()),
            wake: loops::Wakers::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            admin_token_hash,
            stopping: CancellationToken::new(),
            notifier,
            limiter: Arc::new(limiter),
            clock: crate::clock::Clock::default(),
            proxies: Arc::new(proxies),
            holds: Arc::default(),
            router,
            host_ca,
            leader: Arc::new(crate::leader::Leadership::new(
                config_leader.instance_name(),
            )),
        };
        // A lone process leads from its first pass; one of several learns here which.
        crate::leader::try_lead(
            &ctx.store,
            &ctx.leader,
            ctx.config.leader.lease,
            ctx.config.leader.lease,
        )
        .await;
        let listener = TcpListener::bind(ctx.config.listen)
            .await
            .with_context(|| format!("Failed to listen on {}", ctx.config.listen))?;
        Ok(Self {
            listener,
            gateway,
            ctx,
            loops,
        })
    }

    /// The port the API listens on (useful when configured as 0).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The loops' own state, for tests that run a pass next to the running loops.
    pub fn loops(&self) -> &Loops {
        &self.loops
    }

    /// Serves the API and runs the control loops until `shutdown` is cancelled, then gives
    /// in-flight requests, loop passes and tracked tasks (rents, releases, notifications)
    /// `shutdown_deadline` to finish, all together.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            gateway,
            ctx,
            loops,
        } = self;
        tracing::info!(listen = %listener.local_addr()?, "orion serving");
        let stopping = ctx.stopping.clone();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            signal.cancelled().await;
            stopping.cancel();
        });
        // SIGHUP: the inventory file is read again and applied, live.
        let (hup_ctx, hup_stop) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let kind = tokio::signal::unix::SignalKind::hangup();
            let Ok(mut hup) = tokio::signal::unix::signal(kind) else {
                tracing::warn!("cannot listen for SIGHUP: the inventory reloads only by the API");
                return;
            };
            loop {
                tokio::select! {
                    () = hup_stop.cancelled() => break,
                    got = hup.recv() => match got {
                        Some(()) => crate::inventory::reload(&hup_ctx).await,
                        None => break,
                    },
                }
            }
        });
        // The loops are tracked with the rest, so the deadline covers them too; kept in
        // a set as well, to be aborted if they overrun it.
        let tasks = ctx.tasks.clone();
        let stop = || shutdown.clone().cancelled_owned();
        let mut running = tokio::task::JoinSet::new();
        // The lease is renewed until the loops' last passes are over, then given up.
        // In a set of its own: dropped (the process killed), it stops renewing at once.
        let elector_stop = CancellationToken::new();
        let mut elector = tokio::task::JoinSet::new();
        elector.spawn(crate::leader::run(
            ctx.store.clone(),
            ctx.leader.clone(),
            ctx.config.leader.lease,
            ctx.config.leader.renew_every,
            elector_stop.clone(),
        ));
        // The API writes as any replica; the loops only while this process leads.
        let api_ctx = ctx.clone();
        let ctx = Context {
            store: ctx.store.fenced(ctx.leader.fence()),
            ..ctx
        };
        running.spawn(tasks.track_future(health::run(ctx.clone(), loops.probes.clone(), stop())));
        running.spawn(tasks.track_future(migration::run(
            ctx.clone(),
            loops.migration.clone(),
            stop(),
        )));
        running.spawn(tasks.track_future(cleanup::run(ctx.clone(), stop())));
        running.spawn(tasks.track_future(apps::run(ctx.clone(), loops.apps.clone(), stop())));
        if ctx.config.snapshots.enabled {
            running.spawn(tasks.track_future(snapshots::run(
                ctx.clone(),
                loops.snapshots.clone(),
                stop(),
            )));
        }
        if let Some(gateway) = gateway {
            let forwarding = crate::gateway::Forwarding::new(
                ctx.store.clone(),
                ctx.config.ssh.connect_timeout,
                &ctx.config.gateway,
            );
            running.spawn(tasks.track_future(gateway.serve(forwarding, shutdown.clone())));
        }
        if ctx.config.health.watch {
            running.spawn(tasks.track_future(watch::run(
                ctx.clone(),
                loops.probes.clone(),
                shutdown.clone(),
            )));
            running.spawn(tasks.track_future(apps::follow_runtimes(ctx.clone(), shutdown.clone())));
        }
        let deadline_after = ctx.config.shutdown_deadline;

        // The peer's address is the client's, or its proxy's (see `api::client_address`).
        let server = axum::serve(
            listener,
            api::app(api_ctx.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(stop())
        .into_future();
        tokio::pin!(server);
        let served = tokio::select! {
            served = &mut server => Some(served),
            () = shutdown.cancelled() => None,
        };
        let deadline = tokio::time::Instant::now() + deadline_after;
        let served = match served {
            Some(served) => Some(served),
            None => {
                tracing::info!("shutting down: finishing in-flight work");
                tokio::time::timeout_at(deadline, &mut server).await.ok()
            }
        };
        match served {
            Some(served) => served.context("HTTP server failed")?,
            None => tracing::warn!("in-flight requests cut at the shutdown deadline"),
        }
        if !drain(&tasks, deadline).await {
            tracing::warn!("loop passes and tracked tasks cut at the shutdown deadline");
            running.abort_all();
        }
        elector_stop.cancel();
        while elector.join_next().await.is_some() {}
        crate::leader::give_up(&api_ctx.store, &api_ctx.leader).await;
        tracing::info!("orion stopped");
        Ok(())
    }
}

/// Waits for every task in `tasks` (no new one is accepted) until `deadline`. Returns
/// whether they all finished; those still running are dropped with the runtime.
pub async fn drain(tasks: &TaskTracker, deadline: tokio::time::Instant) -> bool {
    tasks.close();
    tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_ok()
}

/// Applies the schema, retrying while the database is not reachable yet.
async fn migrate_when_ready(store: &Store, wait: Duration) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut logged = false;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(()),
            Err(crate::store::StoreError::Unavailable(e)) if started.elapsed() < wait => {
                if !logged {
                    tracing::warn!(error = %e, "database not reachable yet; waiting");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context("Failed to apply the database schema"),
        }
    }
}

/// Resolves on SIGTERM (`docker stop`) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c()
            .await
            .expect("failed to listen for Ctrl-C");
    };
    #[cfg(unix)]
    let terminate = async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("failed to listen for SIGTERM")
            .recv()
            .await;
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tracked_task_in_flight_at_shutdown_is_waited_for() {
        let tasks = TaskTracker::new();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let finished = done.clone();
        // A rent still provisioning when the signal comes.
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let started = tokio::time::Instant::now();
        assert!(drain(&tasks, started + Duration::from_secs(20)).await);
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tracked_task_that_overruns_is_cut_at_the_deadline() {
        let tasks = TaskTracker::new();
        tasks.spawn(tokio::time::sleep(Duration::from_secs(600)));
        let started = tokio::time::Instant::now();
        assert!(!drain(&tasks, started + Duration::from_secs(20)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(20));
    }

    #[test]
    fn the_default_shutdown_deadline_is_below_the_compose_grace_period() {
        let compose =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
                .unwrap();
        let grace = compose
            .lines()
            .find_map(|l| l.trim().strip_prefix("stop_grace_period:"))
            .map(|v| humantime::parse_duration(v.trim()).unwrap())
            .unwrap_or(Duration::from_secs(10));
        let text = "[database]\nurl = \"mysql://x@localhost/x\"\n[ssh]\nkey = \"k\"\n\
                    [auth]\nadmin_token = \"0123456789abcdef0123456789\"\n";
        let config = Config::from_toml_str(text).unwrap();
        assert!(
            config.shutdown_deadline < grace,
            "{:?} is not below {grace:?}",
            config.shutdown_deadline
        );
    }
}
