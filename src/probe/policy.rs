//! The pure rules of health probing, apart from the I/O that applies them: how deep a
//! probe goes ([`depth`]), when a worker's status changes ([`observe`]), and when the
//! guard on moves holds them ([`judge`]). All take their inputs (times, counts) as
//! arguments, so they are tested with paused tokio time and no worker.

use std::time::Duration;

use tokio::time::Instant;

use crate::model::WorkerStatus;

/// What a probe proved about a worker, from the deepest to the lightest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeDepth {
    /// A new connection: the worker accepts logins with its pinned host key and Orion's
    /// key, and runs a command.
    Handshake,
    /// A command in a new channel of the watch connection: the worker starts a session
    /// and a process.
    Exec,
    /// A keepalive request on the watch connection: the worker's kernel, network and
    /// sshd answer.
    Keepalive,
}

/// When a worker last completed a handshake and last ran a probe's command.
#[derive(Debug, Clone, Copy)]
pub struct Proven {
    pub handshake: Instant,
    pub exec: Option<Instant>,
}

/// How often each depth is due, from `health.handshake_every` and `health.exec_every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthEvery {
    /// A probe opens a new connection when the worker's last handshake is older.
    pub handshake: Duration,
    /// A probe over the watch connection runs a command when the worker's last one is
    /// older; otherwise it is a keepalive round trip.
    pub exec: Duration,
}

impl DepthEvery {
    /// As the configuration says (`[health]`).
    pub fn of(health: &crate::config::HealthConfig) -> Self {
        Self {
            handshake: health.handshake_every,
            exec: health.exec_every,
        }
    }
}

impl Default for DepthEvery {
    /// The configuration's defaults: a new connection and a command at least every five
    /// minutes.
    fn default() -> Self {
        Self::of(&crate::config::HealthConfig::default())
    }
}

/// Whether a probe at `now` may ride the worker's watch connection: only while its last
/// handshake is recent enough.
pub fn may_share(proven: Option<Proven>, every: DepthEvery, now: Instant) -> bool {
    proven.is_some_and(|p| now.duration_since(p.handshake) < every.handshake)
}

/// How deep a probe at `now` goes: a new connection when there is no watch connection to
/// ride (`shared` false, see [`may_share`]); over it, a command when the last one is older
/// than `every.exec`, otherwise a keepalive.
pub fn depth(proven: Option<Proven>, shared: bool, every: DepthEvery, now: Instant) -> ProbeDepth {
    if !shared {
        return ProbeDepth::Handshake;
    }
    match proven.and_then(|p| p.exec) {
        Some(exec) if now.duration_since(exec) < every.exec => ProbeDepth::Keepalive,
        _ => ProbeDepth::Exec,
    }
}

/// Why a probe's new connection failed, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The worker's sshd closed it at once saying `Exceeded MaxStartups`: the worker is
    /// up, and holds as many connections that have not logged in as sshd takes — which
    /// anyone who can reach its port can cause.
    SshdFull,
    /// Refused, silent, closed, a protocol error, a changed host key…
    Other,
}

/// How a probe whose new connection failed still proves the worker alive, if it can: a
/// worker whose sshd is full is asked with a keepalive on its kept (watch) connection,
/// if it has one, so that a flood of connections that never log in does not get it
/// declared dead and its rentals moved. Any other failure of a new connection stands:
/// a worker whose sshd no longer accepts logins while old connections live on must be
/// found (see [`may_share`]).
pub fn after_failed_handshake(failure: HandshakeFailure, kept: bool) -> Option<ProbeDepth> {
    (failure == HandshakeFailure::SshdFull && kept).then_some(ProbeDepth::Keepalive)
}

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

/// How many probes one worker gets in a row before the outcome is recorded: an alive (or
/// new) worker that fails is re-probed at once, up to `dead_after` times, so a real death
/// is confirmed in this round rather than the next one; a dead worker is probed once.
pub fn attempts(status: WorkerStatus, t: Thresholds) -> u32 {
    if status == WorkerStatus::Dead {
        1
    } else {
        t.dead_after
    }
}

/// One site's workers in service (not retired), for the guard that tells a lost site
/// from Orion cut off from every site.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SiteHealth {
    pub site: String,
    pub total: i64,
    pub dead: i64,
    /// Not (yet) dead, but their last probe failed (or, once probed again by the guard,
    /// not answering now).
    pub failing: i64,
}

/// What the guard on moves concludes from the health of each site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Hold every move: with at least 3 workers, **every** site has more than
    /// `max_fraction` of its workers dead or failing at the same moment. That looks like
    /// Orion cut off from the fleet, not the fleet dying (one site: the old rule).
    pub hold: bool,
    /// Sites whose every worker is dead or failing while another site answers: a site
    /// lost, whose rentals and instances move to the sites that answer.
    pub lost: Vec<String>,
    /// Held although some site answers: every site was cut moments ago, and the sites
    /// come back one by one; one still silent is not taken for lost yet.
    pub healing: bool,
}

/// The guard on moves (of rentals and of apps' instances), after Kubernetes' zone
/// rule: a lost zone is evicted while other zones are healthy; when all are unhealthy
/// at once, nothing is.
pub fn judge(sites: &[SiteHealth], max_fraction: f64) -> Verdict {
    let total: i64 = sites.iter().map(|s| s.total).sum();
    let beyond = |s: &SiteHealth| (s.dead + s.failing) as f64 > max_fraction * s.total as f64;
    let hold = total >= 3 && !sites.is_empty() && sites.iter().all(beyond);
    let lost = if hold || sites.len() < 2 {
        Vec::new()
    } else {
        sites
            .iter()
            .filter(|s| s.total > 0 && s.dead + s.failing >= s.total)
            .map(|s| s.site.clone())
            .collect()
    };
    Verdict {
        hold,
        lost,
        healing: false,
    }
}

/// Each site's unhealthy workers, for an event: `a: 3 of 3, b: 3 of 3`.
pub fn describe(sites: &[SiteHealth]) -> String {
    sites
        .iter()
        .map(|s| format!("{}: {} of {}", s.site, s.dead + s.failing, s.total))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: DepthEvery = DepthEvery {
        handshake: Duration::from_secs(300),
        exec: Duration::from_secs(60),
    };

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

    /// The depth of a probe made now, as the prober decides it.
    fn depth_now(proven: Option<Proven>) -> ProbeDepth {
        let now = Instant::now();
        depth(proven, may_share(proven, EVERY, now), EVERY, now)
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_never_proven_gets_a_new_connection() {
        assert_eq!(depth_now(None), ProbeDepth::Handshake);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_handshake_probes_run_a_command_then_keepalives_until_exec_every() {
        let proven = Some(Proven {
            handshake: Instant::now(),
            exec: Some(Instant::now()),
        });
        assert_eq!(depth_now(proven), ProbeDepth::Keepalive);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(depth_now(proven), ProbeDepth::Keepalive);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(depth_now(proven), ProbeDepth::Exec);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_older_than_handshake_every_forces_a_new_connection() {
        let proven = Some(Proven {
            handshake: Instant::now(),
            exec: None,
        });
        assert_eq!(depth_now(proven), ProbeDepth::Exec);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(depth_now(proven), ProbeDepth::Exec);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(depth_now(proven), ProbeDepth::Handshake);
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_watch_connection_every_probe_is_a_handshake() {
        let now = Instant::now();
        let proven = Some(Proven {
            handshake: now,
            exec: Some(now),
        });
        assert_eq!(depth(proven, false, EVERY, now), ProbeDepth::Handshake);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exec_every_of_zero_makes_every_shared_probe_run_a_command() {
        let every = DepthEvery {
            exec: Duration::ZERO,
            ..EVERY
        };
        let now = Instant::now();
        let proven = Some(Proven {
            handshake: now,
            exec: Some(now),
        });
        assert_eq!(depth(proven, true, every, now), ProbeDepth::Exec);
    }

    #[test]
    fn only_a_full_sshd_is_asked_again_on_the_kept_connection() {
        use HandshakeFailure::*;
        assert_eq!(
            after_failed_handshake(SshdFull, true),
            Some(ProbeDepth::Keepalive)
        );
        assert_eq!(after_failed_handshake(SshdFull, false), None);
        assert_eq!(after_failed_handshake(Other, true), None);
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

    #[test]
    fn only_a_worker_not_yet_dead_gets_its_failure_confirmed() {
        assert_eq!(attempts(WorkerStatus::Alive, T), 3);
        assert_eq!(attempts(WorkerStatus::Unknown, T), 3);
        assert_eq!(attempts(WorkerStatus::Dead, T), 1);
    }
}

#[cfg(test)]
mod hold_tests {
    use super::*;
    use SiteHealth;

    fn site(name: &str, total: i64, dead: i64) -> SiteHealth {
        SiteHealth {
            site: name.into(),
            total,
            dead,
            failing: 0,
        }
    }

    fn holds(sites: &[SiteHealth]) -> bool {
        judge(sites, 0.5).hold
    }

    #[test]
    fn one_dead_worker_out_of_three_is_moved() {
        assert!(!holds(&[site("a", 3, 1)]));
    }

    #[test]
    fn most_workers_of_a_single_site_dead_at_once_holds_all_moves() {
        assert!(holds(&[site("a", 3, 2)]));
        assert!(holds(&[site("a", 10, 6)]));
    }

    #[test]
    fn workers_still_failing_their_confirmation_count_as_unhealthy() {
        let mut a = site("a", 3, 1);
        a.failing = 1;
        assert!(holds(&[a]));
    }

    #[test]
    fn exactly_the_threshold_still_moves() {
        assert!(!holds(&[site("a", 10, 5)]));
    }

    #[test]
    fn tiny_fleets_are_never_held() {
        assert!(!holds(&[site("a", 2, 2)]));
        assert!(!holds(&[site("a", 1, 1)]));
        assert!(!holds(&[site("a", 1, 1), site("b", 1, 1)]));
    }

    #[test]
    fn a_whole_site_lost_while_another_answers_is_moved_and_named() {
        let v = judge(&[site("a", 3, 3), site("b", 3, 0)], 0.5);
        assert_eq!(
            v,
            Verdict {
                hold: false,
                lost: vec!["a".into()],
                healing: false,
            }
        );
    }

    #[test]
    fn every_site_unreachable_at_once_holds() {
        let v = judge(&[site("a", 3, 3), site("b", 3, 2)], 0.5);
        assert!(v.hold);
        assert!(v.lost.is_empty(), "nothing is lost while held: {v:?}");
    }

    #[test]
    fn a_site_half_gone_while_another_answers_is_moved_but_not_lost() {
        let v = judge(&[site("a", 4, 3), site("b", 4, 0)], 0.5);
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn the_description_names_each_site() {
        assert_eq!(
            describe(&[site("a", 3, 3), site("b", 3, 1)]),
            "a: 3 of 3, b: 1 of 3"
        );
    }
}
