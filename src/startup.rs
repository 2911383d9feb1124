//! Builds Orion from a [`Config`] and runs it until told to stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::config::ExecutorKind;
use crate::context::Context;
use crate::inventory::Inventory;
use crate::playbook::{Ansible, Executor, Playbook, Playbooks};
use crate::ssh::SshClient;
use crate::store::Store;
use crate::telemetry::LoopRegistry;
use crate::{api, cleanup, health, migration, rentals, watch};

/// How long Orion waits for MariaDB at start before giving up (compose may start Orion
/// while the database is still initialising).
const DATABASE_WAIT: Duration = Duration::from_secs(60);

/// How long in-flight requests and loop passes get to finish after a shutdown signal.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// A built, not yet running, Orion: API listener bound, schema applied, inventory synced.
pub struct Application {
    listener: TcpListener,
    ctx: Context,
}

impl Application {
    /// Validates the inventory and playbooks, loads Orion's key, applies the schema, syncs
    /// the inventory into the database, finishes work a previous process left half-done,
    /// and binds the listener. Any failure stops here, before anything is served.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Installed first, so nothing recorded from here on is lost.
        crate::metrics::handle();
        let inventory = Inventory::load(&config.inventory)?;
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
        ssh.set_handshake_every(config.health.handshake_every);
        ssh.set_exec_every(config.health.exec_every);
        let store = Store::connect_lazy(
            &config.database.url,
            config.database.max_connections,
            config.database.acquire_timeout,
        )?;
        migrate_when_ready(&store, DATABASE_WAIT).await?;
        for change in store
            .sync_inventory(&inventory)
            .await
            .context("Failed to sync the inventory into the database")?
        {
            tracing::info!("inventory: {change}");
        }
        let mut executor = Executor::new(
            Arc::new(playbooks),
            ssh.clone(),
            config.provisioning.uid_min,
        );
        if config.provisioning.executor == ExecutorKind::Ansible {
            for playbook in Playbook::ALL {
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
        let admin_token_hash = crate::auth::token_hash(config.auth.admin_token.expose());
        let probe_db = (config.database.max_connections as usize / 2).max(1);
        let notify_policy =
            crate::notify::AddressPolicy::new(config.migration.notify_allow.clone());
        let limiter = crate::ratelimit::AddressLimiter::new(
            config.http.anonymous_burst,
            config.http.anonymous_per_second,
        );
        let ctx = Context {
            store,
            ssh,
            executor,
            config: Arc::new(config),
            loops: Arc::new(LoopRegistry::default()),
            probe_locks: Arc::default(),
            probe_db: Arc::new(tokio::sync::Semaphore::new(probe_db)),
            migrate_now: Arc::default(),
            migration_held: Arc::default(),
            admin_token_hash,
            stopping: CancellationToken::new(),
            http: crate::notify::client(&notify_policy)
                .context("Failed to build the HTTP client")?,
            notify_policy,
            limiter: Arc::new(limiter),
        };
        let recovered = rentals::recover(&ctx)
            .await
            .context("Failed to recover interrupted rentals")?;
        if recovered > 0 {
            tracing::warn!(recovered, "finished work interrupted by the last stop");
        }
        let listener = TcpListener::bind(ctx.config.listen)
            .await
            .with_context(|| format!("Failed to listen on {}", ctx.config.listen))?;
        Ok(Self { listener, ctx })
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

    /// Serves the API and runs the control loops until `shutdown` is cancelled, then gives
    /// in-flight requests and loop passes [`SHUTDOWN_DEADLINE`] to finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ctx = self.ctx;
        tracing::info!(listen = %self.listener.local_addr()?, "orion serving");
        let stopping = ctx.stopping.clone();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            signal.cancelled().await;
            stopping.cancel();
        });
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(health::run(ctx.clone(), shutdown.clone().cancelled_owned()));
        loops.spawn(migration::run(
            ctx.clone(),
            shutdown.clone().cancelled_owned(),
        ));
        loops.spawn(cleanup::run(
            ctx.clone(),
            shutdown.clone().cancelled_owned(),
        ));
        if ctx.config.health.watch {
            loops.spawn(watch::run(ctx.clone(), shutdown.clone()));
        }

        // The peer's address is the client's, or its proxy's (see `api::client_address`).
        let server = axum::serve(
            self.listener,
            api::app(ctx).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let deadline = async {
            shutdown.cancelled().await;
            tracing::info!("shutting down: finishing in-flight work");
            tokio::time::sleep(SHUTDOWN_DEADLINE).await;
        };
        tokio::select! {
            served = server => served.context("HTTP server failed")?,
            () = deadline => tracing::warn!("in-flight requests cut at the shutdown deadline"),
        }
        let drained = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
            while loops.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("loop passes cut at the shutdown deadline");
            loops.abort_all();
        }
        tracing::info!("orion stopped");
        Ok(())
    }
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
