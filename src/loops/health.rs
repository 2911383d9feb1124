//! The probe loop: every `health.interval`, probe **every** worker (rented or not)
//! over SSH, concurrently, and record what it concluded.
//!
//! A probe is connect + authenticate + `true`, bounded by `health.probe_timeout`. Status
//! changes go through hysteresis ([`crate::probe::policy::observe`]): an alive worker is declared dead only after
//! `dead_after` failures in a row (confirmed within the same round, `retry_delay` apart),
//! and a dead one alive again only after `alive_after` successful rounds, so one slow
//! answer or an sshd restart never moves a tenant.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;

use super::Pass;
use crate::context::Context;
use crate::model::WorkerStatus;
use crate::probe::{InRound, Probes, probe_in_round};

/// Name of this loop in logs and on the status endpoint.
pub const LOOP: &str = "health";

/// What one round saw, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundSummary {
    pub probed: usize,
    pub alive: usize,
    pub dead: usize,
    pub unknown: usize,
}

/// A round runs again after `health.interval` (or when a pass is due sooner).
impl Pass for RoundSummary {}

/// One probe round over every non-retired worker. Each worker is probed in its own task,
/// so a hung worker costs only its own timeout.
///
/// The common case, an alive worker answering its probe, changes nothing but the time of
/// the last probe and its latency: those are written for the whole round in one
/// statement. Every other outcome (a failure, a status change, a first contact) is
/// handled and recorded worker by worker, as [`crate::probe::probe_worker`] does.
pub async fn probe_round(ctx: &Context, probes: &Arc<Probes>) -> anyhow::Result<RoundSummary> {
    let workers = ctx
        .store
        .probe_targets()
        .await
        .context("Failed to list the workers to probe")?;
    let mut tasks = JoinSet::new();
    for worker in workers {
        let (ctx, probes) = (ctx.clone(), probes.clone());
        tasks.spawn(async move { probe_in_round(&ctx, &probes, worker).await });
    }
    let mut summary = RoundSummary::default();
    let mut routine = Vec::new();
    let mut first_error = None;
    // Routine outcomes are written in batches as they come, so a hung worker's probe
    // holds up nobody's record for longer than one flush period.
    let mut flush =
        tokio::time::interval_at(tokio::time::Instant::now() + ROUTINE_FLUSH, ROUTINE_FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let joined = tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => joined,
                None => break,
            },
            _ = flush.tick(), if !routine.is_empty() => {
                if let Err(e) = record_routine(ctx, &mut routine).await {
                    first_error.get_or_insert(e);
                }
                continue;
            }
        };
        match joined.context("A probe task panicked")? {
            Ok(outcome) => {
                summary.probed += 1;
                let status = match outcome {
                    InRound::Routine { id, latency_ms } => {
                        routine.push((id, latency_ms));
                        WorkerStatus::Alive
                    }
                    InRound::Recorded(status) => status,
                };
                match status {
                    WorkerStatus::Alive => summary.alive += 1,
                    WorkerStatus::Dead => summary.dead += 1,
                    WorkerStatus::Unknown => summary.unknown += 1,
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Err(e) = record_routine(ctx, &mut routine).await {
        first_error.get_or_insert(e);
    }
    match first_error {
        // Probing worked but recording failed (the database): the round failed.
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// How often a round writes the routine outcomes collected so far.
const ROUTINE_FLUSH: Duration = Duration::from_millis(250);

/// Writes and clears the routine outcomes collected so far.
async fn record_routine(ctx: &Context, routine: &mut Vec<(u64, u32)>) -> anyhow::Result<()> {
    let batch = std::mem::take(routine);
    ctx.store
        .record_routine_probes(&batch)
        .await
        .context("Failed to record the probes")
}

/// Hands the memory freed since the last call back to the system. A round over hundreds
/// of workers allocates in a burst (a handshake per new connection, a task per worker);
/// glibc keeps what the burst freed in its per-thread arenas, which would leave
/// `orion serve` holding the peak of its busiest round for good.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps to the
    // kernel; it touches no memory that is in use and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs probe rounds every `health.interval`, and at once when woken (the inventory
/// changed), until `shutdown` resolves. A failing round
/// is logged once when it starts failing, retried with a capped back-off, and reported on
/// the status endpoint; the loop itself never stops on an error.
pub async fn run(ctx: Context, probes: Arc<Probes>, shutdown: impl Future<Output = ()>) {
    let interval = ctx.config.health.interval;
    let wake = ctx.wake.health.clone();
    super::run_loop(
        LOOP,
        &ctx.loops,
        &ctx.leader,
        interval,
        Some(&wake),
        shutdown,
        || {
            let (ctx, probes) = (ctx.clone(), probes.clone());
            async move {
                let summary = probe_round(&ctx, &probes).await?;
                release_free_memory();
                Ok(summary)
            }
        },
    )
    .await;
}
