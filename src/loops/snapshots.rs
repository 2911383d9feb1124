//! The snapshots loop: every `snapshots.interval`, each active rental's home is
//! snapshotted if it changed since the last snapshot ([`crate::snapshots::take`]), a few
//! at a time. A snapshot that fails is retried at the next pass; the rental keeps its
//! last whole one.

use std::future::Future;

use anyhow::Context as _;
use futures::StreamExt;

use super::Pass;
use crate::context::Context;
use crate::snapshots::{self, Taken};

/// Name of this loop in logs and on the status endpoint.
pub const LOOP: &str = "snapshots";

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Homes snapshotted (they changed).
    pub stored: usize,
    /// Bytes stored, compressed.
    pub bytes: u64,
    /// Homes unchanged since their last snapshot.
    pub unchanged: usize,
    /// Homes over `snapshots.max_bytes`.
    pub too_big: usize,
    /// Snapshots that failed (retried next pass).
    pub failed: usize,
}

/// A pass runs again after `snapshots.interval`.
impl Pass for SnapshotSummary {}

/// One pass over every active rental; also drops the snapshots of rentals that ended.
pub async fn snapshot_pass(ctx: &Context) -> anyhow::Result<SnapshotSummary> {
    ctx.store
        .purge_snapshots()
        .await
        .context("Failed to drop the snapshots of ended rentals")?;
    let jobs = ctx
        .store
        .snapshot_jobs()
        .await
        .context("Failed to list the homes to snapshot")?;
    let taken: Vec<(String, anyhow::Result<Taken>)> = futures::stream::iter(jobs)
        .map(|job| async move {
            let result = snapshots::take(ctx, &job, false).await;
            (job.rental_id, result)
        })
        .buffer_unordered(ctx.config.snapshots.concurrency)
        .collect()
        .await;
    let mut summary = SnapshotSummary::default();
    for (rental_id, result) in taken {
        match result {
            Ok(Taken::Stored(bytes)) => {
                summary.stored += 1;
                summary.bytes += bytes;
            }
            Ok(Taken::Unchanged | Taken::Superseded) => summary.unchanged += 1,
            Ok(Taken::TooBig) => summary.too_big += 1,
            Err(e) => {
                summary.failed += 1;
                tracing::warn!(rental_id = %rental_id, error = format!("{e:#}"),
                    "snapshot failed; the last one is kept, retried next pass");
            }
        }
    }
    metrics::counter!(crate::metrics::names::SNAPSHOT_BYTES).increment(summary.bytes);
    Ok(summary)
}

/// Runs snapshot passes every `snapshots.interval` until `shutdown` resolves.
pub async fn run(ctx: Context, shutdown: impl Future<Output = ()>) {
    let interval = ctx.config.snapshots.interval;
    super::run_loop(
        LOOP,
        &ctx.loops,
        &ctx.leader,
        interval,
        None,
        shutdown,
        || {
            let ctx = ctx.clone();
            async move {
                let summary = snapshot_pass(&ctx).await?;
                if summary.stored + summary.failed + summary.too_big > 0 {
                    tracing::info!(?summary, "snapshot pass");
                }
                Ok(summary)
            }
        },
    )
    .await;
}
