//! Probing: how Orion learns whether each worker answers, and what it does with that.
//!
//! - this file: one worker's probe, confirmed by quick retries while it fails, folded
//!   into the worker's health by the hysteresis of [`policy`], and recorded. Shared by the
//!   probe rounds ([`crate::loops::health`]) and the watches ([`crate::loops::watch`]),
//!   which both probe workers; the probes of one worker never overlap.
//! - [`depth`]: one probe over SSH, as deep as it is due ([`Prober`]), and the memory of
//!   what each worker last proved. The SSH client only runs what the prober asks.
//! - [`policy`]: the pure rules (depth, hysteresis, the guard's verdict).
//! - [`guard`](mod@guard): the guard on moves when Orion looks cut off, and [`holds`] its memory.

pub mod depth;
pub mod guard;
pub mod holds;
pub mod policy;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;

pub use depth::{Probe, Prober};
pub use guard::{Guard, guard};
pub use policy::ProbeDepth;

use crate::context::Context;
use crate::model::WorkerStatus;
use crate::ssh::{self, SshError};
use crate::store::{ProbeRecord, Worker};
use policy::{Health, Thresholds, observe};

/// What probing keeps between probes, shared by every task that probes a worker.
#[derive(Debug)]
pub struct Probes {
    /// Serialises the probes of one worker (a round's probe and a watch-triggered one),
    /// so that each reads the counts the previous one wrote.
    locks: KeyedLocks,
    /// Bounds the database work of probes recorded one by one and of watches (half the
    /// pool), so that hundreds of workers changing at once (the first round, a fleet-wide
    /// outage, every watch opening at start) queue here instead of timing out on the
    /// pool, and the API keeps connections of its own.
    db: tokio::sync::Semaphore,
}

impl Probes {
    /// For a pool of `max_connections` database connections.
    pub fn new(max_connections: u32) -> Self {
        Self {
            locks: KeyedLocks::default(),
            db: tokio::sync::Semaphore::new((max_connections as usize / 2).max(1)),
        }
    }

    /// A turn in the bound on the probes' and watches' database work.
    pub async fn db_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.db
            .acquire()
            .await
            .expect("the probe database bound is never closed")
    }
}

/// One async mutex per key, made on first use.
#[derive(Debug, Default)]
struct KeyedLocks {
    locks: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    fn get(&self, key: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("keyed locks poisoned")
            .entry(key.to_owned())
            .or_default()
            .clone()
    }
}

/// What one worker's probe in a round came to.
pub enum InRound {
    /// An alive worker with a known host key answered: only its latency is new.
    Routine { id: u64, latency_ms: u32 },
    /// Anything else, already recorded; the worker's status after it.
    Recorded(WorkerStatus),
}

/// A worker's probe in a round: the common case (an alive worker with a known host key
/// answering) is left for the round to record in a batch; anything else is recorded now.
pub async fn probe_in_round(
    ctx: &Context,
    probes: &Probes,
    worker: Worker,
) -> anyhow::Result<InRound> {
    let lock = probes.locks.get(&worker.name);
    let _guard = lock.lock().await;
    let routine = worker.answers()
        && worker.consecutive_failures == 0
        && worker.expected_host_key().is_some();
    if !routine {
        return probe_locked(ctx, probes, worker, None)
            .await
            .map(InRound::Recorded);
    }
    // The batched write only applies to a worker still alive with no failure, so a
    // watch-triggered probe that saw something else since this round listed the worker
    // keeps the last word.
    match probe_once(ctx, &worker.target()).await {
        Ok(probe) => Ok(InRound::Routine {
            id: worker.id,
            latency_ms: duration_ms(probe.latency),
        }),
        failed => probe_locked(ctx, probes, worker, Some(failed))
            .await
            .map(InRound::Recorded),
    }
}

/// One SSH probe, counted in the metrics.
async fn probe_once(ctx: &Context, target: &ssh::Target) -> Result<Probe, SshError> {
    // Never while Orion reloads the worker's sshd for its certificate: a new connection
    // may meet the moment it drops them, which says nothing of the worker.
    let _not_reloading = match &ctx.host_ca {
        Some(ca) => Some(ca.not_reloading(&target.name).await),
        None => None,
    };
    let outcome = ctx
        .prober
        .probe(target, ctx.config.health.probe_timeout)
        .await;
    match &outcome {
        Ok(probe) => metrics::histogram!(crate::metrics::names::PROBE_DURATION)
            .record(probe.latency.as_secs_f64()),
        Err(_) => metrics::counter!(crate::metrics::names::PROBE_FAILURES).increment(1),
    }
    outcome
}

/// Probes one worker now, confirming a failure with quick retries, and records the result.
/// Returns the worker's status after the probe. Probes of one worker never overlap: each
/// starts from the counts the previous one wrote. A worker declared dead wakes the
/// migration loop.
pub async fn probe_worker(
    ctx: &Context,
    probes: &Probes,
    worker: Worker,
) -> anyhow::Result<WorkerStatus> {
    let lock = probes.locks.get(&worker.name);
    let _guard = lock.lock().await;
    probe_locked(ctx, probes, worker, None).await
}

/// [`probe_worker`] under the worker's probe lock; `first` is the outcome of a probe
/// already made, counted as the first attempt.
async fn probe_locked(
    ctx: &Context,
    probes: &Probes,
    worker: Worker,
    mut first: Option<Result<Probe, SshError>>,
) -> anyhow::Result<WorkerStatus> {
    let writes = || probes.db_slot();
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
    let target = worker.target();
    let attempts = policy::attempts(worker.status, thresholds);
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
        ctx.wake.migration.notify_one();
    }
    if health.status != worker.status || matches!(&outcome, Err(SshError::HostKeyMismatch { .. })) {
        // Its instances move away, or it may take instances again.
        ctx.wake.apps.notify_one();
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

/// A duration in whole milliseconds, saturating.
fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
