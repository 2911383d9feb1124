//! The cleanup loop: removes tenant accounts left on workers by rentals that no longer
//! live there (released while the worker was down, failed mid-provisioning, moved away),
//! and only then frees the worker. A worker is never offered to a new tenant while an old
//! tenant's account may still be on it. It also keeps every worker's host certificate
//! current (a new worker, a certificate near its end).

use std::future::Future;

use anyhow::Context as _;

use super::Pass;
use crate::context::Context;
use crate::rentals;
use crate::store::Cleanup;

/// Name of this loop in logs and on the status endpoint.
pub const LOOP: &str = "cleanup";

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupSummary {
    /// Leftover accounts removed (their workers are free again).
    pub removed: usize,
    /// Host certificates installed (new workers, new keys, certificates near their end).
    pub certified: usize,
}

/// A pass runs again after `cleanup.interval`; an account whose worker failed is retried
/// then.
impl Pass for CleanupSummary {}

/// One pass: rentals stuck in `provisioning` are failed (their account becomes a leftover),
/// rentals whose time is up are released, then every stale placement on an alive worker
/// gets `delete_user`. Says how many accounts were removed; an account whose worker
/// fails is retried next pass.
pub async fn cleanup_pass(ctx: &Context) -> anyhow::Result<CleanupSummary> {
    rentals::resolve_stuck_provisioning(ctx)
        .await
        .context("Failed to resolve rentals stuck in provisioning")?;
    rentals::finish_stuck_releases(ctx)
        .await
        .context("Failed to finish releases cut short")?;
    rentals::release_expired(ctx)
        .await
        .context("Failed to release expired rentals")?;
    let pending = ctx
        .store
        .pending_cleanups()
        .await
        .context("Failed to list leftover accounts")?;
    let mut removed = 0;
    for cleanup in pending {
        match remove_account(ctx, &cleanup).await {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(worker = %cleanup.worker.name, rental_id = %cleanup.rental_id,
                error = format!("{e:#}"), "could not remove a leftover account; will retry"),
        }
    }
    ctx.store
        .purge_idempotency_keys(crate::api::IDEMPOTENCY_KEPT)
        .await
        .context("Failed to drop old idempotency keys")?;
    ctx.store
        .purge_replicas(crate::api::IDEMPOTENCY_KEPT)
        .await
        .context("Failed to forget the processes gone for a day")?;
    let mut certified = 0;
    if let Some(ca) = &ctx.host_ca {
        let until = chrono::Utc::now() + ctx.config.ssh.host_cert_validity / 4;
        for worker in ctx
            .store
            .workers_needing_host_cert(until)
            .await
            .context("Failed to list workers needing a host certificate")?
        {
            match ca
                .ensure_certificate(&ctx.executor, &ctx.store, &ctx.config, &worker)
                .await
            {
                Ok(true) => certified += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(worker = %worker.name, error = format!("{e:#}"),
                    "could not install the host certificate; will retry"),
            }
        }
    }
    Ok(CleanupSummary { removed, certified })
}

async fn remove_account(ctx: &Context, cleanup: &Cleanup) -> anyhow::Result<()> {
    rentals::deprovision(ctx, &cleanup.username, cleanup.uid, &cleanup.worker).await?;
    ctx.store
        .finish_cleanup(cleanup)
        .await
        .context("Failed to record a cleanup")?;
    tracing::info!(worker = %cleanup.worker.name, rental_id = %cleanup.rental_id,
        "leftover account removed; worker free");
    Ok(())
}

/// Runs cleanup passes every `cleanup.interval` until `shutdown` resolves.
pub async fn run(ctx: Context, shutdown: impl Future<Output = ()>) {
    let interval = ctx.config.cleanup.interval;
    super::run_loop(
        LOOP,
        &ctx.loops,
        &ctx.leader,
        interval,
        None,
        shutdown,
        || {
            let ctx = ctx.clone();
            async move { cleanup_pass(&ctx).await }
        },
    )
    .await;
}
