//! Logs, and what each control loop last did.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global `tracing` subscriber: human-readable or JSON, filtered by
/// `RUST_LOG` if set, else by the configured filter. Safe to call twice (tests).
pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(config.filter.clone()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// What one control loop last did, as shown on `/health`.
#[derive(Debug, Clone, Default, Serialize)]
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

/// Drives a control loop: runs `pass` now and then again after `interval` (or sooner,
/// with back-off, after a failure), until `shutdown` resolves. A pass in progress is let
/// finish; the caller bounds how long it waits. Errors are logged with the loop's name,
/// loudly the first time and quietly while they repeat, and kept in `loops`.
pub async fn run_loop<F, Fut>(
    name: &'static str,
    loops: &LoopRegistry,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    run_loop_woken(name, loops, interval, None, shutdown, pass).await;
}

/// [`run_loop`], and a pass also starts as soon as `wake` is notified.
pub async fn run_loop_woken<F, Fut>(
    name: &'static str,
    loops: &LoopRegistry,
    interval: Duration,
    wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    shutdown: impl std::future::Future<Output = ()>,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::pin!(shutdown);
    loop {
        let errors = match pass().await {
            Ok(()) => {
                let state = loops.snapshot().get(name).cloned().unwrap_or_default();
                if state.consecutive_errors > 0 {
                    tracing::info!(loop_name = name, "loop recovered");
                }
                loops.success(name);
                metrics::gauge!(crate::metrics::names::LOOP_LAST_SUCCESS, "loop" => name)
                    .set(Utc::now().timestamp() as f64);
                0
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
                errors
            }
        };
        let woken = async {
            match &wake {
                Some(notify) => notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff(interval, errors)) => {}
            _ = woken => tracing::debug!(loop_name = name, "woken early"),
            _ = &mut shutdown => break,
        }
    }
    tracing::info!(loop_name = name, "loop stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
