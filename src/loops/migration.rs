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

use anyhow::Context as _;
use futures::StreamExt;
use tracing::Instrument;

use super::Pass;
use crate::context::Context;
use crate::model::RentalStatus;
use crate::probe::guard::Mover;
use crate::probe::policy::SiteHealth;
use crate::rentals;
use crate::snapshots;
use crate::store::RentalRecord;

/// Name of this loop in logs and on the status endpoint.
pub const LOOP: &str = "migration";

/// Moves performed at once in one pass; each is a few SSH round trips.
const CONCURRENT_MOVES: usize = 16;

/// What the migration loop remembers between passes: nothing of its own. Whether it is
/// held and which sites are lost is the guard's memory ([`crate::probe::guard::Holds`]),
/// with the rest of what a hold is; the state stays so that this loop is driven like
/// every other.
#[derive(Debug, Default)]
pub struct State {}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// Rentals now active on a new worker.
    pub moved: usize,
    /// Rentals left waiting for a free worker.
    pub waiting: usize,
    /// Moves that failed on the new worker (retried next pass).
    pub failed: usize,
    /// True when the pass moved nothing because every site looks cut off at once.
    pub held: bool,
}

/// A pass runs again after `migration.interval`, or at once when woken: a rental left
/// waiting or a failed move is retried then.
impl Pass for PassSummary {}

/// One pass over every rental that must move.
pub async fn migration_pass(ctx: &Context, _state: &State) -> anyhow::Result<PassSummary> {
    let rentals = ctx
        .store
        .rentals_to_migrate()
        .await
        .context("Failed to list rentals to move")?;
    let guard = crate::probe::guard(ctx, !rentals.is_empty()).await?;
    let (hold, sites) = (guard.verdict.hold, &guard.sites);
    say_lost_sites(ctx, &guard.verdict.lost, sites).await;
    // A worker Orion was cut off from, answering again before the probes say so.
    let rentals: Vec<RentalRecord> = rentals
        .into_iter()
        .filter(|r| !r.worker_id.is_some_and(|w| guard.revived.contains(&w)))
        .collect();
    let was_held = ctx.holds.swap_held(Mover::Rentals, hold);
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
        let detail = crate::probe::policy::describe(sites);
        tracing::warn!(
            sites = %detail,
            "every site has most workers dead at once: Orion is probably cut off; holding migrations"
        );
        ctx.store
            .append_event(
                "migration.held",
                None,
                None,
                &if guard.verdict.healing {
                    format!(
                        "every site was cut off moments ago and the sites come back one by one ({detail} dead or not answering): no rental is moved until every worker has been probed again"
                    )
                } else {
                    format!(
                        "every site has most of its workers unreachable at once ({detail} dead or not answering): Orion is probably cut off from the fleet; no rental is moved until this clears"
                    )
                },
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

/// Says when a site is found lost (every worker gone while another site answers: its
/// rentals and instances move to the sites that answer) and when it answers again.
async fn say_lost_sites(ctx: &Context, lost: &[String], sites: &[SiteHealth]) {
    let (new, back) = ctx.holds.lost_sites(lost, sites);
    for site in new {
        let detail = crate::probe::policy::describe(sites);
        tracing::warn!(site, sites = %detail, "a whole site is lost while others answer: moving its rentals and instances");
        let msg = format!(
            "site {site} lost: none of its workers answers while other sites do ({detail}); its rentals and instances move to the sites that answer"
        );
        ctx.store
            .append_event("site.lost", None, None, &msg)
            .await
            .ok();
    }
    for site in back {
        tracing::info!(site, "a lost site answers again");
        let msg = format!(
            "site {site} answers again; its workers are fenced (leftover accounts removed) before they are used"
        );
        ctx.store
            .append_event("site.back", None, None, &msg)
            .await
            .ok();
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
    // A planned move (drained, retired): the old worker still answers, so the home's last
    // state is taken there once the move is recorded (see `final_snapshot`).
    let planned = planned_move(ctx, &rental).await?;
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
    if let Some(job) = planned {
        final_snapshot(ctx, &job).await;
    }
    let provisioned = match rentals::provision(ctx, &rental, &claim).await {
        Ok(()) => restore_home(ctx, &rental, &claim).await,
        Err(e) => Err(e.into()),
    };
    match provisioned {
        Ok(()) => {
            let activated = ctx
                .store
                .activate(&rental.id, worker, RentalStatus::Migrating, None)
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
                    ctx.config.gateway.host.clone(),
                ));
            }
            Ok(Outcome::Moved)
        }
        Err(e) => {
            let e = format!("{e:#}");
            tracing::warn!(error = %e, "move failed; will retry");
            metrics::counter!(crate::metrics::names::MIGRATIONS, "outcome" => "failed")
                .increment(1);
            ctx.store
                .abort_migration(&rental.id, worker, &e)
                .await
                .context("Failed to record a failed move")?;
            Ok(Outcome::Failed)
        }
    }
}

/// The old worker's side of a planned move, if this is one: the rental is on (or, for a
/// move interrupted by a restart, moving off) a worker that still answers (drained or
/// retired, not dead, not quarantined: a changed host key is not to be trusted with
/// anything), and snapshots are on.
async fn planned_move(
    ctx: &Context,
    rental: &RentalRecord,
) -> anyhow::Result<Option<crate::store::SnapshotJob>> {
    if !ctx.config.snapshots.enabled {
        return Ok(None);
    }
    // The old worker still answers and is trusted: else there is nothing to take.
    let from = match (rental.status, rental.worker_id) {
        (RentalStatus::Active, Some(id)) => match ctx.store.worker_by_id(id).await? {
            Some(old) if old.answers() => ctx
                .store
                .live_uid(&rental.id, old.id)
                .await?
                .map(|uid| (old, uid)),
            _ => None,
        },
        (RentalStatus::Migrating, _) => ctx
            .store
            .moving_from(&rental.id)
            .await?
            .filter(|(old, _)| old.answers()),
        _ => None,
    };
    let Some((old, uid)) = from else {
        return Ok(None);
    };
    Ok(Some(crate::store::SnapshotJob {
        rental_id: rental.id.clone(),
        username: rental.username.clone(),
        uid,
        worker: old,
        fingerprint: None,
    }))
}

/// A planned move's last snapshot on the old worker: the tenant's sessions there end
/// first, so nothing written before the move is lost. If it cannot be taken (the old
/// worker fails now, the home is over the cap), the move goes on with the last snapshot
/// taken, and an event says so.
async fn final_snapshot(ctx: &Context, job: &crate::store::SnapshotJob) {
    let failure = match snapshots::take(ctx, job, true).await {
        Ok(snapshots::Taken::Stored(bytes)) => {
            tracing::info!(bytes, from = %job.worker.name, "final snapshot of a planned move");
            return;
        }
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("{e:#}"),
    };
    tracing::warn!(from = %job.worker.name, error = %failure,
        "no final snapshot; the move restores the last one taken");
    ctx.store
        .append_event(
            "snapshot.final_failed",
            Some(&job.worker.name),
            Some(&job.rental_id),
            &format!(
                "no final snapshot on {} ({failure}): the move restores the last one taken",
                job.worker.name
            ),
        )
        .await
        .ok();
}

/// Restores the rental's last snapshot into its new account, before it is active.
async fn restore_home(
    ctx: &Context,
    rental: &RentalRecord,
    claim: &crate::store::Claim,
) -> anyhow::Result<()> {
    if !ctx.config.snapshots.enabled {
        return Ok(());
    }
    let restored = snapshots::restore(ctx, rental, claim).await?;
    let outcome = match &restored {
        None => "none",
        Some(r) if r.incomplete.is_some() => "incomplete",
        Some(_) => "restored",
    };
    metrics::counter!(crate::metrics::names::RESTORES, "outcome" => outcome).increment(1);
    let Some(restored) = restored else {
        return Ok(());
    };
    let mut message = format!(
        "home restored on {} from the snapshot of {} ({} bytes)",
        claim.worker.name,
        restored.taken_at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
        restored.bytes
    );
    let kind = match &restored.incomplete {
        Some(what) => {
            message.push_str(&format!("; not restored: {what}"));
            "snapshot.restore_incomplete"
        }
        None => "snapshot.restored",
    };
    tracing::info!(
        bytes = restored.bytes,
        incomplete = restored.incomplete.is_some(),
        "home restored"
    );
    ctx.store
        .append_event(kind, Some(&claim.worker.name), Some(&rental.id), &message)
        .await?;
    Ok(())
}

/// Runs migration passes every `migration.interval`, and at once when woken
/// ([`crate::loops::Wakers::migration`]: a worker declared dead, quarantined or drained),
/// until `shutdown` resolves.
pub async fn run(ctx: Context, state: std::sync::Arc<State>, shutdown: impl Future<Output = ()>) {
    let interval = ctx.config.migration.interval;
    let wake = ctx.wake.migration.clone();
    super::run_loop(
        LOOP,
        &ctx.loops,
        &ctx.leader,
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
