//! Watches: one idle SSH session per alive worker, so that a worker that goes away is
//! noticed within milliseconds rather than at the next probe round.
//!
//! When a watched worker closes the connection (container stopped, machine crashed,
//! sshd killed) the worker is probed at once, with the usual confirmation retries and
//! hysteresis ([`crate::probe::probe_worker`]): a restarted sshd answers the
//! confirmation probe and nothing happens; a dead worker fails it and is declared dead
//! in about `(dead_after - 1) × retry_delay`, which wakes the migration loop. A worker
//! that hangs without closing the connection stops answering keepalives and is treated
//! the same way after `keepalive_interval × (keepalive_max + 1)`; the probe rounds stay
//! the bound for anything slower.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::model::WorkerStatus;
use crate::probe::{Probes, probe_worker};

/// How long a watcher waits before looking again at a worker it cannot watch (dead,
/// quarantined, or refusing the session).
const IDLE_RECHECK: Duration = Duration::from_secs(2);

/// A watch that drops sooner than this after opening is not reopened before this long.
const MIN_WATCH: Duration = Duration::from_secs(1);

/// Watches every worker of the inventory until `shutdown` is cancelled. Not a periodic
/// pass: one long-lived task per worker, each waiting on its session. The inventory is
/// looked at again every [`IDLE_RECHECK`], so that a worker added while Orion runs is
/// watched too (a retired one's watcher ends by itself).
pub async fn run(ctx: Context, probes: Arc<Probes>, shutdown: CancellationToken) {
    let mut watched: HashSet<String> = HashSet::new();
    let mut watchers = JoinSet::new();
    while !shutdown.is_cancelled() {
        match ctx.store.probe_targets().await {
            Ok(workers) => {
                for w in workers.into_iter().filter(|w| !w.retired) {
                    if watched.insert(w.name.clone()) {
                        watchers.spawn(watch_worker(
                            ctx.clone(),
                            probes.clone(),
                            w.name,
                            shutdown.clone(),
                        ));
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "watch: cannot list workers now"),
        }
        let look_again = tokio::time::sleep(IDLE_RECHECK);
        tokio::pin!(look_again);
        loop {
            tokio::select! {
                () = &mut look_again => break,
                () = shutdown.cancelled() => break,
                Some(Ok(name)) = watchers.join_next() => {
                    watched.remove(&name);
                }
            }
        }
    }
    while watchers.join_next().await.is_some() {}
}

/// Keeps a watch session open on one worker and probes it whenever the session drops.
async fn watch_worker(
    ctx: Context,
    probes: Arc<Probes>,
    name: String,
    shutdown: CancellationToken,
) -> String {
    watch_until_retired(&ctx, &probes, &name, &shutdown).await;
    name
}

async fn watch_until_retired(
    ctx: &Context,
    probes: &Arc<Probes>,
    name: &str,
    shutdown: &CancellationToken,
) {
    let (ctx, probes, shutdown) = (ctx.clone(), probes.clone(), shutdown.clone());
    while !shutdown.is_cancelled() {
        // Only the leading process watches (and probes, and records what it found).
        if !ctx.leader.is_leading() {
            tokio::select! {
                () = ctx.leader.leading() => {}
                () = shutdown.cancelled() => return,
            }
        }
        let db = probes.db_slot().await;
        let read = ctx.store.worker_by_name(name).await;
        drop(db);
        let worker = match read {
            Ok(Some(w)) if w.retired => return,
            Ok(Some(w)) => w,
            Ok(None) => return,
            Err(_) => {
                // The database is down; the loops report it. Look again shortly.
                pause(&shutdown, IDLE_RECHECK).await;
                continue;
            }
        };
        if !worker.answers() {
            pause(&shutdown, IDLE_RECHECK).await;
            continue;
        }
        let target = worker.target();
        let opened = tokio::time::Instant::now();
        match ctx.ssh.watch(&target).await {
            Ok(mut watch) => {
                tracing::debug!(worker = %name, "watching");
                tokio::select! {
                    () = watch.closed() => {
                        tracing::info!(worker = %name, "watch session dropped; probing now");
                    }
                    // Another process leads now: it watches; this one lets go.
                    () = ctx.leader.stepped_down() => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            Err(e) => {
                tracing::debug!(worker = %name, error = %e, "cannot open a watch session; probing now");
            }
        }
        // Either the session dropped or it could not be opened: let a probe decide.
        match probe_worker(&ctx, &probes, worker).await {
            // Alive after all: watch again, but never spin on a session that keeps dropping.
            Ok(WorkerStatus::Alive) if opened.elapsed() < MIN_WATCH => {
                pause(&shutdown, MIN_WATCH).await;
            }
            Ok(WorkerStatus::Alive) => {}
            Ok(_) => pause(&shutdown, IDLE_RECHECK).await,
            Err(e) => {
                tracing::warn!(worker = %name, error = format!("{e:#}"), "watch-triggered probe failed");
                pause(&shutdown, IDLE_RECHECK).await;
            }
        }
    }
}

async fn pause(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = shutdown.cancelled() => {}
    }
}
