//! The probe loop: every `health.interval`, probe **every** worker (rented or not)
//! over SSH, concurrently, and record what it concluded.
//!
//! A probe is connect + authenticate + `true`, bounded by `health.probe_timeout`. Status
//! changes go through hysteresis ([`observe`]): an alive worker is declared dead only after
//! `dead_after` failures in a row (confirmed within the same round, `retry_delay` apart),
//! and a dead one alive again only after `alive_after` successful rounds, so one slow
//! answer or an sshd restart never moves a tenant.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;

use crate::context::Context;
use crate::model::WorkerStatus;
use crate::ssh::{self, SshError, Target};
use crate::store::{ProbeRecord, Worker};

/// Name of this loop in logs and on the status endpoint.
pub const LOOP: &str = "health";

/// Hysteresis thresholds, from [`crate::config::HealthConfig`].
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub dead_after: u32,
    pub alive_after: u32,
}

/// A worker's health as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub status: WorkerStatus,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

/// Folds one probe outcome into a worker's health.
///
/// - `unknown` becomes `alive` on its first success (a fresh worker is usable at once) and
///   `dead` after `dead_after` failures;
/// - `alive` becomes `dead` after `dead_after` failures in a row;
/// - `dead` becomes `alive` after `alive_after` successes in a row.
pub fn observe(health: Health, success: bool, t: Thresholds) -> Health {
    if success {
        let successes = health.consecutive_successes.saturating_add(1);
        let status = match health.status {
            WorkerStatus::Unknown | WorkerStatus::Alive => WorkerStatus::Alive,
            WorkerStatus::Dead if successes >= t.alive_after => WorkerStatus::Alive,
            WorkerStatus::Dead => WorkerStatus::Dead,
        };
        Health {
            status,
            consecutive_failures: 0,
            consecutive_successes: successes,
        }
    } else {
        let failures = health.consecutive_failures.saturating_add(1);
        let status = if failures >= t.dead_after {
            WorkerStatus::Dead
        } else {
            health.status
        };
        Health {
            status,
            consecutive_failures: failures,
            consecutive_successes: 0,
        }
    }
}

/// What one round saw, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundSummary {
    pub probed: usize,
    pub alive: usize,
    pub dead: usize,
    pub unknown: usize,
}

/// One probe round over every non-retired worker. Each worker is probed in its own task,
/// so a hung worker costs only its own timeout.
///
/// The common case, an alive worker answering its probe, changes nothing but the time of
/// the last probe and its latency: those are written for the whole round in one
/// statement. Every other outcome (a failure, a status change, a first contact) is
/// handled and recorded worker by worker, as [`probe_worker`] does.
pub async fn probe_round(ctx: &Context) -> anyhow::Result<RoundSummary> {
    let workers = ctx
        .store
        .probe_targets()
        .await
        .context("Failed to list the workers to probe")?;
    let mut tasks = JoinSet::new();
    for worker in workers {
        let ctx = ctx.clone();
        tasks.spawn(async move { probe_in_round(&ctx, worker).await });
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

/// What one worker's probe in a round came to.
enum InRound {
    /// An alive worker with a known host key answered: only its latency is new.
    Routine { id: u64, latency_ms: u32 },
    /// Anything else, already recorded; the worker's status after it.
    Recorded(WorkerStatus),
}

async fn probe_in_round(ctx: &Context, worker: Worker) -> anyhow::Result<InRound> {
    let lock = ctx.probe_locks.get(&worker.name);
    let _guard = lock.lock().await;
    let routine = worker.status == WorkerStatus::Alive
        && worker.consecutive_failures == 0
        && worker.quarantine_reason.is_none()
        && worker.expected_host_key().is_some();
    if !routine {
        return probe_locked(ctx, worker, None).await.map(InRound::Recorded);
    }
    // The batched write only applies to a worker still alive with no failure, so a
    // watch-triggered probe that saw something else since this round listed the worker
    // keeps the last word.
    match probe_once(ctx, &target_of(&worker)).await {
        Ok(probe) => Ok(InRound::Routine {
            id: worker.id,
            latency_ms: duration_ms(probe.latency),
        }),
        failed => probe_locked(ctx, worker, Some(failed))
            .await
            .map(InRound::Recorded),
    }
}

/// One SSH probe, counted in the metrics.
async fn probe_once(ctx: &Context, target: &ssh::Target) -> Result<ssh::Probe, SshError> {
    let outcome = ctx.ssh.probe(target, ctx.config.health.probe_timeout).await;
    match &outcome {
        Ok(probe) => metrics::histogram!(crate::metrics::names::PROBE_DURATION)
            .record(probe.latency.as_secs_f64()),
        Err(_) => metrics::counter!(crate::metrics::names::PROBE_FAILURES).increment(1),
    }
    outcome
}

/// Probes one worker, confirming a failure with quick retries, and records the result.
/// Returns the worker's status after the probe. Probes of one worker never overlap: each
/// starts from the counts the previous one wrote. A worker declared dead wakes the
/// migration loop.
pub async fn probe_worker(ctx: &Context, worker: Worker) -> anyhow::Result<WorkerStatus> {
    let lock = ctx.probe_locks.get(&worker.name);
    let _guard = lock.lock().await;
    probe_locked(ctx, worker, None).await
}

/// [`probe_worker`] under the worker's probe lock; `first` is the outcome of a probe
/// already made, counted as the first attempt.
async fn probe_locked(
    ctx: &Context,
    worker: Worker,
    mut first: Option<Result<ssh::Probe, SshError>>,
) -> anyhow::Result<WorkerStatus> {
    let writes = || ctx.probe_db_slot();
    let db = writes().await;
    let worker = ctx
        .store
        .worker_by_id(worker.id)
        .await
        .context("Failed to re-read a worker")?
        .unwrap_or(worker);
    drop(db);
    let cfg = &ctx.config.health;
    let thresholds = Thresholds {
        dead_after: cfg.dead_after,
        alive_after: cfg.alive_after,
    };
    let mut health = Health {
        status: worker.status,
        consecutive_failures: worker.consecutive_failures,
        consecutive_successes: worker.consecutive_successes,
    };
    let target = target_of(&worker);
    // An alive (or new) worker that fails is re-probed at once, up to `dead_after` times,
    // so a real death is confirmed in this round rather than the next one.
    let attempts = if worker.status == WorkerStatus::Dead {
        1
    } else {
        cfg.dead_after
    };
    let mut outcome;
    let mut attempt = 0;
    loop {
        attempt += 1;
        outcome = match first.take() {
            Some(outcome) => outcome,
            None => probe_once(ctx, &target).await,
        };
        health = observe(health, outcome.is_ok(), thresholds);
        if outcome.is_ok() || attempt >= attempts || health.status == WorkerStatus::Dead {
            break;
        }
        // Record the failure before confirming it: while confirmations run, the migration
        // loop sees this worker as failing, so a fault hitting most workers at once is
        // recognised as one even though their deaths are declared one by one.
        let db = writes().await;
        ctx.store
            .record_failing(&worker, health.consecutive_failures)
            .await
            .context("Failed to record a failed probe")?;
        drop(db);
        tokio::time::sleep(cfg.retry_delay).await;
    }

    let _db = writes().await;
    let (latency_ms, error) = match &outcome {
        Ok(probe) => {
            if target.host_key.is_none() {
                trust_on_first_use(ctx, &worker, &probe.host_key).await?;
            }
            (Some(duration_ms(probe.latency)), None)
        }
        Err(e) => {
            if let SshError::HostKeyMismatch { .. } = e {
                let reason = format!("host key changed: {e}");
                tracing::error!(worker = %worker.name, "{reason}; worker quarantined");
                ctx.store
                    .quarantine(&worker, &reason)
                    .await
                    .context("Failed to quarantine a worker")?;
            } else {
                tracing::debug!(worker = %worker.name, error = %e, "probe failed");
            }
            (None, Some(e.to_string()))
        }
    };
    let died = health.status == WorkerStatus::Dead && worker.status != WorkerStatus::Dead;
    if health.status != worker.status {
        tracing::info!(worker = %worker.name, from = %worker.status, to = %health.status,
            "worker status changed");
    }
    let record = ProbeRecord {
        status: health.status,
        consecutive_failures: health.consecutive_failures,
        consecutive_successes: health.consecutive_successes,
        reached: outcome.is_ok(),
        latency_ms,
        error,
    };
    ctx.store
        .record_probe(&worker, &record)
        .await
        .with_context(|| format!("Failed to record the probe of {}", worker.name))?;
    if died || matches!(&outcome, Err(SshError::HostKeyMismatch { .. })) {
        ctx.migrate_now.notify_one();
    }
    Ok(health.status)
}

async fn trust_on_first_use(
    ctx: &Context,
    worker: &Worker,
    key: &russh::keys::PublicKey,
) -> anyhow::Result<()> {
    let line = ssh::host_key_line(key);
    let recorded = ctx
        .store
        .trust_host_key(worker, &line)
        .await
        .context("Failed to record a host key")?;
    if recorded {
        tracing::info!(worker = %worker.name, "host key trusted on first use");
        return Ok(());
    }
    // Someone recorded a key between our read and our write: it must be the same one.
    let current = ctx
        .store
        .worker_by_name(&worker.name)
        .await
        .context("Failed to re-read a worker")?;
    let stored = current.and_then(|w| w.known_host_key);
    if stored.as_deref() != Some(line.as_str()) {
        let reason = "host key changed between two first connections".to_owned();
        ctx.store
            .quarantine(worker, &reason)
            .await
            .context("Failed to quarantine a worker")?;
    }
    Ok(())
}

/// The SSH target of a worker, with the host key it must present.
pub fn target_of(worker: &Worker) -> Target {
    Target {
        name: worker.name.clone(),
        host: worker.ssh_host.clone(),
        port: worker.ssh_port,
        host_key: worker.expected_host_key().and_then(ssh::parse_host_key),
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
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

/// Runs probe rounds every `health.interval` until `shutdown` resolves. A failing round
/// is logged once when it starts failing, retried with a capped back-off, and reported on
/// the status endpoint; the loop itself never stops on an error.
pub async fn run(ctx: Context, shutdown: impl Future<Output = ()>) {
    let interval = ctx.config.health.interval;
    crate::telemetry::run_loop(LOOP, &ctx.loops.clone(), interval, shutdown, || {
        let ctx = ctx.clone();
        async move {
            let summary = probe_round(&ctx).await?;
            tracing::debug!(?summary, "probe round done");
            release_free_memory();
            Ok(())
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        dead_after: 3,
        alive_after: 2,
    };

    fn start(status: WorkerStatus) -> Health {
        Health {
            status,
            consecutive_failures: 0,
            consecutive_successes: 0,
        }
    }

    fn fold(mut h: Health, outcomes: &[bool]) -> Health {
        for &ok in outcomes {
            h = observe(h, ok, T);
        }
        h
    }

    #[test]
    fn a_new_worker_is_alive_at_its_first_success() {
        assert_eq!(
            fold(start(WorkerStatus::Unknown), &[true]).status,
            WorkerStatus::Alive
        );
    }

    #[test]
    fn an_alive_worker_survives_fewer_failures_than_the_threshold() {
        let h = fold(start(WorkerStatus::Alive), &[false, false]);
        assert_eq!(h.status, WorkerStatus::Alive);
        assert_eq!(h.consecutive_failures, 2);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let h = fold(
            start(WorkerStatus::Alive),
            &[false, false, true, false, false],
        );
        assert_eq!(h.status, WorkerStatus::Alive);
    }

    #[test]
    fn an_alive_worker_dies_at_the_threshold() {
        let h = fold(start(WorkerStatus::Alive), &[false, false, false]);
        assert_eq!(h.status, WorkerStatus::Dead);
    }

    #[test]
    fn a_dead_worker_needs_enough_successes_in_a_row_to_come_back() {
        let dead = fold(start(WorkerStatus::Alive), &[false, false, false]);
        assert_eq!(fold(dead, &[true]).status, WorkerStatus::Dead);
        assert_eq!(fold(dead, &[true, false, true]).status, WorkerStatus::Dead);
        assert_eq!(fold(dead, &[true, true]).status, WorkerStatus::Alive);
    }

    #[test]
    fn an_unknown_worker_that_never_answers_becomes_dead() {
        let h = fold(start(WorkerStatus::Unknown), &[false, false]);
        assert_eq!(h.status, WorkerStatus::Unknown);
        assert_eq!(fold(h, &[false]).status, WorkerStatus::Dead);
    }

    #[test]
    fn with_a_threshold_of_one_a_single_failure_kills() {
        let t = Thresholds {
            dead_after: 1,
            alive_after: 1,
        };
        let h = observe(start(WorkerStatus::Alive), false, t);
        assert_eq!(h.status, WorkerStatus::Dead);
        assert_eq!(observe(h, true, t).status, WorkerStatus::Alive);
    }
}
