//! The control loops, and the driver that runs them.
//!
//! Each loop is one file with one public pass that tests call directly and that says,
//! through its summary ([`Pass::next`]), when it wants to run next; and a `run` that
//! repeats the pass through [`run_loop`] until shutdown. A loop never imports another
//! for a helper: what two loops share lives outside this folder ([`crate::probe`],
//! [`crate::rentals`]), and the one signal between loops is a [`Wakers`] handle.
//!
//! - [`health`]: probe every worker each `health.interval`, record what hysteresis concludes.
//! - [`watch`]: one idle SSH session per worker, re-probed the moment it drops.
//! - [`migration`]: move rentals off dead workers, same credentials.
//! - [`cleanup`]: remove leftover accounts before a worker is offered again, and keep
//!   every worker's host certificate current.
//! - [`snapshots`]: snapshot each active rental's home when it changed.
//!
//! The driver keeps each loop's last success and last error in a [`LoopRegistry`]
//! (shown on `/api/status`) and backs off, capped, while a pass fails.

pub mod apps;
pub mod cleanup;
pub mod health;
pub mod migration;
pub mod snapshots;
pub mod watch;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;

/// When a loop wants its next pass, as its pass says (like kube-rs' `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Next {
    /// After the loop's configured interval, or sooner if woken.
    #[default]
    Interval,
    /// After this long (at most the loop's interval), or sooner if woken.
    After(Duration),
}

/// What a loop's pass returns: its summary, which says when the loop runs next.
pub trait Pass: Debug {
    fn next(&self) -> Next {
        Next::Interval
    }
}

/// The signals that make a loop run its next pass now rather than at its next tick.
/// The one channel between loops (and from the API to a loop): the sender never waits
/// and never learns what the woken loop did.
#[derive(Debug, Clone, Default)]
pub struct Wakers {
    /// Wakes the probe loop: the inventory changed (a new worker is probed at once).
    pub health: Arc<Notify>,
    /// Wakes the migration loop: a worker was declared dead, quarantined or drained.
    pub migration: Arc<Notify>,
    /// Wakes the apps loop: an app changed, a worker changed status, or a worker's
    /// engine reported a container starting or dying.
    pub apps: Arc<Notify>,
}

/// What one control loop last did, as shown on `/api/status`.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct LoopState {
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Failed passes since the last success (drives the back-off).
    pub consecutive_errors: u32,
    pub passes: u64,
}

/// The states of all loops, keyed by loop name.
#[derive(Debug, Default)]
pub struct LoopRegistry {
    states: Mutex<BTreeMap<&'static str, LoopState>>,
}

impl LoopRegistry {
    pub fn success(&self, name: &'static str) {
        let mut states = self.states.lock().expect("loop registry poisoned");
        let state = states.entry(name).or_default();
        state.last_success = Some(Utc::now());
        state.consecutive_errors = 0;
        state.passes += 1;
    }

    /// Records a failed pass. Returns how many passes have failed in a row, so the loop
    /// can log the first failure loudly and the following ones quietly.
    pub fn failure(&self, name: &'static str, error: &anyhow::Error) -> u32 {
        let mut states = self.states.lock().expect("loop registry poisoned");
        let state = states.entry(name).or_default();
        state.last_error = Some(format!("{error:#}"));
        state.last_error_at = Some(Utc::now());
        state.consecutive_errors += 1;
        state.passes += 1;
        state.consecutive_errors
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, LoopState> {
        self.states.lock().expect("loop registry poisoned").clone()
    }
}

/// Delay before the next pass of a loop that has failed `errors` times in a row: the
/// normal interval after a success, then doubling from one second, capped at the interval
/// (a failing loop retries sooner than usual at first, never later than usual).
pub fn backoff(interval: Duration, errors: u32) -> Duration {
    if errors == 0 {
        return interval;
    }
    let exp = Duration::from_secs(1u64 << errors.saturating_sub(1).min(16));
    exp.min(interval)
}

/// Delay before the next pass: what a successful pass asked for, or the back-off after
/// `errors` failed passes in a row.
pub fn delay(interval: Duration, outcome: Result<Next, u32>) -> Duration {
    match outcome {
        Ok(Next::Interval) => interval,
        // Sooner than the interval, never later: one pass's wish does not slow the loop.
        Ok(Next::After(d)) => d.min(interval),
        Err(errors) => backoff(interval, errors),
    }
}

/// What wakes a loop before its time, and how soon after a pass a wake-up may start the
/// next one.
#[derive(Debug, Clone, Copy)]
pub struct Wake<'a> {
    pub notify: &'a Notify,
    /// Least time from the end of a pass to the start of a pass a wake-up asks for.
    /// Wake-ups that come meanwhile are one pass, run when the rest ends: a burst of
    /// them (a container killed by the kernel in a loop) costs at most one pass per
    /// rest, however long it lasts, never passes back to back.
    pub rest: Duration,
}

/// Drives a control loop while this process leads ([`crate::leader`]): runs `pass` now
/// and then again when it asks ([`Pass::next`],
/// at most `interval` apart by default), sooner with back-off after a failure, or at once
/// when `wake` is notified, until `shutdown` resolves. A pass in progress is let finish;
/// the caller bounds how long it waits. Errors are logged with the loop's name, loudly
/// the first time and quietly while they repeat, and kept in `loops`.
pub async fn run_loop<F, Fut, S>(
    name: &'static str,
    loops: &LoopRegistry,
    leader: &crate::leader::Leadership,
    interval: Duration,
    wake: Option<&Notify>,
    shutdown: impl Future<Output = ()>,
    pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<S>>,
    S: Pass,
{
    let wake = wake.map(|notify| Wake {
        notify,
        rest: Duration::ZERO,
    });
    drive(name, loops, leader, interval, wake, shutdown, pass).await;
}

/// [`run_loop`] for a loop whose wake-ups may come in bursts: a woken pass starts no
/// sooner than `wake.rest` after the previous pass ended.
pub async fn run_loop_resting<F, Fut, S>(
    name: &'static str,
    loops: &LoopRegistry,
    leader: &crate::leader::Leadership,
    interval: Duration,
    wake: Wake<'_>,
    shutdown: impl Future<Output = ()>,
    pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<S>>,
    S: Pass,
{
    drive(name, loops, leader, interval, Some(wake), shutdown, pass).await;
}

async fn drive<F, Fut, S>(
    name: &'static str,
    loops: &LoopRegistry,
    leader: &crate::leader::Leadership,
    interval: Duration,
    wake: Option<Wake<'_>>,
    shutdown: impl Future<Output = ()>,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<S>>,
    S: Pass,
{
    tokio::pin!(shutdown);
    loop {
        // Only the process that leads runs the loops; the others wait for their turn.
        if !leader.is_leading() {
            tracing::debug!(loop_name = name, "not leading: waiting");
            tokio::select! {
                () = leader.leading() => {}
                _ = &mut shutdown => break,
            }
        }
        let outcome = match pass().await {
            Ok(summary) => {
                tracing::debug!(loop_name = name, ?summary, "pass done");
                let state = loops.snapshot().get(name).cloned().unwrap_or_default();
                if state.consecutive_errors > 0 {
                    tracing::info!(loop_name = name, "loop recovered");
                }
                loops.success(name);
                metrics::gauge!(crate::metrics::names::LOOP_LAST_SUCCESS, "loop" => name)
                    .set(Utc::now().timestamp() as f64);
                Ok(summary.next())
            }
            Err(e) if is_fenced(&e) => {
                // Not a fault: this process stopped leading mid-pass, and the database
                // refused the write. The next pass waits for leadership.
                tracing::info!(loop_name = name, "no longer leading: pass stopped");
                Ok(Next::Interval)
            }
            Err(e) => {
                let errors = loops.failure(name, &e);
                if errors == 1 {
                    tracing::error!(
                        loop_name = name,
                        error = format!("{e:#}"),
                        "loop pass failed"
                    );
                } else {
                    tracing::debug!(
                        loop_name = name,
                        errors,
                        error = format!("{e:#}"),
                        "loop pass failed again"
                    );
                }
                Err(errors)
            }
        };
        let ended = tokio::time::Instant::now();
        let woken = async {
            match wake {
                Some(wake) => wake.notify.notified().await,
                None => std::future::pending().await,
            }
        };
        let early = tokio::select! {
            _ = tokio::time::sleep(delay(interval, outcome)) => false,
            _ = woken => {
                tracing::debug!(loop_name = name, "woken early");
                true
            }
            _ = &mut shutdown => break,
        };
        if let Some(wake) = wake
            && early
            && ended.elapsed() < wake.rest
        {
            tokio::select! {
                _ = tokio::time::sleep_until(ended + wake.rest) => {}
                _ = &mut shutdown => break,
            }
            // What woke it meanwhile is seen by the pass about to run: not one more.
            let _ = futures::FutureExt::now_or_never(wake.notify.notified());
        }
    }
    tracing::info!(loop_name = name, "loop stopped");
}

/// Whether a pass failed because this process no longer leads.
fn is_fenced(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<crate::store::StoreError>()
            .is_some_and(|s| matches!(s, crate::store::StoreError::Fenced { .. }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn backoff_doubles_then_caps_at_the_interval() {
        let i = Duration::from_secs(10);
        assert_eq!(backoff(i, 0), i);
        assert_eq!(backoff(i, 1), Duration::from_secs(1));
        assert_eq!(backoff(i, 2), Duration::from_secs(2));
        assert_eq!(backoff(i, 4), Duration::from_secs(8));
        assert_eq!(backoff(i, 5), i);
        assert_eq!(backoff(i, 60), i);
    }

    #[test]
    fn the_registry_counts_errors_until_a_success() {
        let r = LoopRegistry::default();
        assert_eq!(r.failure("health", &anyhow::anyhow!("db down")), 1);
        assert_eq!(r.failure("health", &anyhow::anyhow!("db down")), 2);
        r.success("health");
        let s = &r.snapshot()["health"];
        assert_eq!(s.consecutive_errors, 0);
        assert_eq!(s.passes, 3);
        assert_eq!(s.last_error.as_deref(), Some("db down"));
    }

    #[derive(Debug)]
    struct Asked(Next);

    impl Pass for Asked {
        fn next(&self) -> Next {
            self.0
        }
    }

    /// Runs a loop whose passes fail `failures` times then ask for `next`, and returns
    /// the times (from the start) at which its first `passes` passes began.
    async fn pass_times(failures: usize, next: Next, wake: Option<Wake<'_>>) -> Vec<Duration> {
        let start = Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let registry = LoopRegistry::default();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let recorded = times.clone();
        let stop = shutdown.clone();
        let leader = crate::leader::Leadership::leading_alone("test");
        drive(
            "test",
            &registry,
            &leader,
            Duration::from_secs(10),
            wake,
            shutdown.cancelled(),
            move || {
                let mut times = recorded.lock().unwrap();
                times.push(start.elapsed());
                let n = times.len();
                if n == 8 {
                    stop.cancel();
                }
                async move {
                    if n <= failures {
                        anyhow::bail!("pass {n} failed")
                    }
                    Ok(Asked(next))
                }
            },
        )
        .await;
        times.lock().unwrap().clone()
    }

    fn secs(s: &[u64]) -> Vec<Duration> {
        s.iter().map(|&s| Duration::from_secs(s)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_loop_backs_off_doubling_then_at_the_interval_and_recovers() {
        // Fails 5 times: retried after 1, 2, 4, 8 (capped at 10) s, then every 10 s.
        let times = pass_times(5, Next::Interval, None).await;
        assert_eq!(times, secs(&[0, 1, 3, 7, 15, 25, 35, 45]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_that_asks_for_a_delay_runs_again_after_it() {
        let times = pass_times(0, Next::After(Duration::from_secs(3)), None).await;
        assert_eq!(times, secs(&[0, 3, 6, 9, 12, 15, 18, 21]));
    }

    #[test]
    fn a_pass_never_delays_the_next_beyond_the_interval() {
        let interval = Duration::from_secs(10);
        assert_eq!(
            delay(interval, Ok(Next::After(Duration::from_secs(300)))),
            interval
        );
        assert_eq!(
            delay(interval, Ok(Next::After(Duration::from_secs(2)))),
            Duration::from_secs(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_woken_loop_runs_its_next_pass_at_once() {
        let wake = Arc::new(Notify::new());
        let waker = wake.clone();
        let ringer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            waker.notify_one();
        });
        let times = pass_times(0, Next::Interval, Some(resting(&wake, 0))).await;
        ringer.await.unwrap();
        assert_eq!(
            &times[..3],
            &[
                Duration::ZERO,
                Duration::from_millis(2500),
                Duration::from_millis(12500)
            ]
        );
    }

    fn resting(notify: &Notify, rest_secs: u64) -> Wake<'_> {
        Wake {
            notify,
            rest: Duration::from_secs(rest_secs),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_wake_ups_runs_at_most_one_pass_per_rest() {
        let wake = Arc::new(Notify::new());
        let waker = wake.clone();
        // Every 10 ms for 5 s, as a worker reports a container the kernel kills in a loop.
        let burst = tokio::spawn(async move {
            for _ in 0..499 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                waker.notify_one();
            }
        });
        let times = pass_times(0, Next::Interval, Some(resting(&wake, 1))).await;
        burst.await.unwrap();
        // One pass per second while the burst lasts (not 499), the last one seeing its
        // end; then none until the interval.
        assert_eq!(times, secs(&[0, 1, 2, 3, 4, 5, 15, 25]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_long_after_the_last_pass_is_not_held_back_by_the_rest() {
        let wake = Arc::new(Notify::new());
        let waker = wake.clone();
        let ringer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            waker.notify_one();
            tokio::time::sleep(Duration::from_millis(200)).await;
            waker.notify_one();
        });
        let times = pass_times(0, Next::Interval, Some(resting(&wake, 1))).await;
        ringer.await.unwrap();
        assert_eq!(
            &times[..4],
            &[
                Duration::ZERO,
                Duration::from_millis(2500),
                Duration::from_millis(3500),
                Duration::from_millis(13500)
            ]
        );
    }
}
