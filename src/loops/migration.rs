//! The migration loop: moves every rental off a dead (or quarantined, or retired) worker
//! to an alive free one, with the same username and credentials.
//!
//! A pass runs every `migration.interval`, and at once when a worker is declared dead.
//! Each move is recorded before it is taken ([`crate::store::Store::begin_migration`]:
//! old placement stale, new worker claimed, rental `migrating`), so a process killed in
//! the middle resumes it at the next pass. The old worker keeps the tenant's account
//! until it answers again; the cleanup loop removes it there before the worker is offered
//! to anyone (fencing). With no free worker the rental waits and is retried every pass.
//!
//! If most workers look dead at the same moment, Orion is probably the one cut off: the
//! pass moves nothing and says so, like Kubernetes' unhealthy-zone rule. "At the same
//! moment" is checked, not assumed: before moving anything, a pass probes the workers
//! not yet declared dead, since a cut is declared worker by worker.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use futures::StreamExt;
use tracing::Instrument;

use super::Pass;
use crate::context::Context;
use crate::model::{RentalStatus, WorkerStatus};
use crate::rentals;
use crate::store::{RentalRecord, WorkerCounts};

/// Name of this loop in logs and on the status endpoint.
pub const LOOP: &str = "migration";

/// Moves performed at once in one pass; each is a few SSH round trips.
const CONCURRENT_MOVES: usize = 16;

/// What the migration loop remembers between passes.
#[derive(Debug, Default)]
pub struct State {
    /// Whether the last pass held all moves (too many workers dead at once), so the
    /// condition is logged when it starts and when it clears, not every pass.
    held: AtomicBool,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// Rentals now active on a new worker.
    pub moved: usize,
    /// Rentals left waiting for a free worker.
    pub waiting: usize,
    /// Moves that failed on the new worker (retried next pass).
    pub failed: usize,
    /// True when the pass moved nothing because too many workers look dead.
    pub held: bool,
}

/// A pass runs again after `migration.interval`, or at once when woken: a rental left
/// waiting or a failed move is retried then.
impl Pass for PassSummary {}

pub use crate::probe_policy::should_hold;

/// Whether the workers not declared dead still answer, now: watch sessions cut by a
/// fault between Orion and the fleet drop one by one, each at its own keepalive, so the
/// first deaths are declared while the other workers still look alive in the database.
/// Before a pass moves anything, every such worker is probed (without recording
/// anything); returns how many did not answer. Stops as soon as the answer to "hold?"
/// is known, so one hung worker does not delay a move.
async fn unanswered_now(ctx: &Context, counts: &WorkerCounts) -> anyhow::Result<i64> {
    let limit = ctx.config.migration.max_dead_fraction * counts.total as f64;
    let workers = ctx
        .store
        .probe_targets()
        .await
        .context("Failed to list workers")?;
    let targets: Vec<_> = workers
        .iter()
        // A quarantined worker is out of service for another reason than this fault.
        .filter(|w| w.status != WorkerStatus::Dead && w.quarantine_reason.is_none())
        .map(|w| w.target())
        .collect();
    let timeout = ctx.config.health.probe_timeout;
    let mut probes: futures::stream::FuturesUnordered<_> = targets
        .iter()
        .map(|target| async move { ctx.ssh.probe(target, timeout).await.is_ok() })
        .collect();
    let candidates = targets.len() as i64;
    let (mut answered, mut unanswered) = (0, 0);
    while let Some(ok) = probes.next().await {
        if ok {
            answered += 1;
        } else {
            unanswered += 1;
        }
        let settled_hold = (counts.dead + unanswered) as f64 > limit;
        let settled_go = (counts.dead + candidates - answered) as f64 <= limit;
        if settled_hold || settled_go {
            break;
        }
    }
    Ok(unanswered)
}

/// One pass over every rental that must move.
pub async fn migration_pass(ctx: &Context, state: &State) -> anyhow::Result<PassSummary> {
    let mut counts = ctx
        .store
        .worker_counts()
        .await
        .context("Failed to count workers")?;
    let mut hold = should_hold(&counts, ctx.config.migration.max_dead_fraction);
    let rentals = ctx
        .store
        .rentals_to_migrate()
        .await
        .context("Failed to list rentals to move")?;
    if !hold && !rentals.is_empty() && counts.free > 0 && counts.total >= 3 {
        counts.failing = unanswered_now(ctx, &counts).await?;
        hold = should_hold(&counts, ctx.config.migration.max_dead_fraction);
    }
    let was_held = state.held.swap(hold, Ordering::Relaxed);
    if hold && was_held {
        return Ok(PassSummary {
            held: true,
            ..PassSummary::default()
        });
    }
    if !hold && was_held {
        tracing::info!("enough workers answer again; migrations resume");
        ctx.store
            .append_event(
                "migration.resumed",
                None,
                None,
                "enough workers answer again",
            )
            .await
            .ok();
    }
    if hold {
        tracing::warn!(
            dead = counts.dead,
            total = counts.total,
            "most workers look dead at once: Orion is probably cut off; holding migrations"
        );
        ctx.store
            .append_event(
                "migration.held",
                None,
                None,
                &format!(
                    "{} of {} workers look dead at once; no rental is moved until this clears",
                    counts.dead + counts.failing,
                    counts.total
                ),
            )
            .await
            .ok();
        return Ok(PassSummary {
            held: true,
            ..PassSummary::default()
        });
    }
    let mut summary = PassSummary::default();
    let outcomes: Vec<anyhow::Result<Outcome>> = futures::stream::iter(rentals)
        .map(|rental| {
            let ctx = ctx.clone();
            async move { migrate(&ctx, rental).await }
        })
        .buffer_unordered(CONCURRENT_MOVES)
        .collect()
        .await;
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(Outcome::Moved) => summary.moved += 1,
            Ok(Outcome::Waiting) => summary.waiting += 1,
            Ok(Outcome::Failed) => summary.failed += 1,
            Ok(Outcome::Nothing) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

enum Outcome {
    Moved,
    Waiting,
    Failed,
    Nothing,
}

/// Moves one rental: claim (recorded), provision with the same credentials, activate.
async fn migrate(ctx: &Context, rental: RentalRecord) -> anyhow::Result<Outcome> {
    let span =
        tracing::info_span!("migrate", rental_id = %rental.id, worker = tracing::field::Empty);
    migrate_inner(ctx, rental).instrument(span).await
}

async fn migrate_inner(ctx: &Context, rental: RentalRecord) -> anyhow::Result<Outcome> {
    let started = tokio::time::Instant::now();
    let Some(claim) = ctx
        .store
        .begin_migration(&rental.id, ctx.executor.uid_min())
        .await
        .context("Failed to record the start of a move")?
    else {
        return Ok(match ctx.store.rental(&rental.id).await? {
            Some(r) if r.status == RentalStatus::Waiting => Outcome::Waiting,
            _ => Outcome::Nothing,
        });
    };
    let worker = &claim.worker;
    tracing::Span::current().record("worker", worker.name.as_str());
    match rentals::provision(ctx, &rental, &claim).await {
        Ok(()) => {
            let activated = ctx
                .store
                .activate(&rental.id, worker, RentalStatus::Migrating)
                .await
                .context("Failed to record a finished move")?;
            if !activated {
                // Released while it was being moved: the new account must go too.
                ctx.store.orphan_placement(&rental.id, worker).await?;
                return Ok(Outcome::Nothing);
            }
            metrics::counter!(crate::metrics::names::MIGRATIONS, "outcome" => "moved").increment(1);
            metrics::histogram!(crate::metrics::names::MIGRATION_DURATION)
                .record(started.elapsed().as_secs_f64());
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "rental moved"
            );
            if let Some(url) = rental.notify_url.clone() {
                // Tracked, so that a shutdown waits for it under its deadline.
                ctx.tasks.spawn(ctx.notifier.clone().deliver(
                    ctx.store.clone(),
                    rental.id.clone(),
                    url,
                ));
            }
            Ok(Outcome::Moved)
        }
        Err(e) => {
            tracing::warn!(error = %e, "move failed; will retry");
            metrics::counter!(crate::metrics::names::MIGRATIONS, "outcome" => "failed")
                .increment(1);
            ctx.store
                .abort_migration(&rental.id, worker, &e.to_string())
                .await
                .context("Failed to record a failed move")?;
            Ok(Outcome::Failed)
        }
    }
}

/// Runs migration passes every `migration.interval`, and at once when woken
/// ([`crate::loops::Wakers::migration`]: a worker declared dead, quarantined or drained),
/// until `shutdown` resolves.
pub async fn run(ctx: Context, state: std::sync::Arc<State>, shutdown: impl Future<Output = ()>) {
    let interval = ctx.config.migration.interval;
    let wake = ctx.wake.migration.clone();
    super::run_loop(
        LOOP,
        &ctx.loops.clone(),
        interval,
        Some(&wake),
        shutdown,
        || {
            let (ctx, state) = (ctx.clone(), state.clone());
            async move {
                let summary = migration_pass(&ctx, &state).await?;
                if summary != PassSummary::default() {
                    tracing::info!(?summary, "migration pass");
                }
                Ok(summary)
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(total: i64, dead: i64) -> WorkerCounts {
        WorkerCounts {
            total,
            dead,
            ..WorkerCounts::default()
        }
    }

    #[test]
    fn one_dead_worker_out_of_three_is_moved() {
        assert!(!should_hold(&counts(3, 1), 0.5));
    }

    #[test]
    fn most_workers_dead_at_once_holds_all_moves() {
        assert!(should_hold(&counts(3, 2), 0.5));
        assert!(should_hold(&counts(10, 6), 0.5));
    }

    #[test]
    fn workers_still_failing_their_confirmation_count_as_unhealthy() {
        let c = WorkerCounts {
            total: 3,
            dead: 1,
            failing: 1,
            ..WorkerCounts::default()
        };
        assert!(should_hold(&c, 0.5));
    }

    #[test]
    fn exactly_the_threshold_still_moves() {
        assert!(!should_hold(&counts(10, 5), 0.5));
    }

    #[test]
    fn tiny_fleets_are_never_held() {
        assert!(!should_hold(&counts(2, 2), 0.5));
        assert!(!should_hold(&counts(1, 1), 0.5));
    }
}
