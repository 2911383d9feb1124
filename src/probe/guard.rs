//! The guard on moves (of rentals and of apps' instances) that tells a lost site from
//! Orion cut off from every site, with its memory of the last hold ([`Holds`]). The
//! migration and apps loops ask it before they move anything ([`guard`]); the rules it
//! applies are pure ([`super::policy::judge`]), the probing of the fleet again is here.
//! Everything about a hold and the window after it lives in this file.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;

use super::policy::{self, SiteHealth};
use crate::context::Context;
use crate::model::WorkerStatus;

/// The guard's memory, shared by the migration and apps loops (it is in the
/// [`Context`]): when it last held every move, whether each loop is held now, and which
/// sites are lost.
#[derive(Debug, Default)]
pub struct Holds {
    /// When the guard last held every move: for a while after a hold, workers declared
    /// dead are probed again before anything is moved off them (see [`guard`]).
    last: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether each [`Mover`] is held, so that each says when a hold begins and when it
    /// ends, not at every pass.
    held: [AtomicBool; 2],
    /// The sites found lost (every worker gone while another site answers), so that a
    /// loss and a return are each said once.
    lost: std::sync::Mutex<BTreeSet<String>>,
}

/// What a loop moves off a worker the guard lets go: each is held, and says so, on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mover {
    /// Rentals (the migration loop).
    Rentals,
    /// Apps' instances (the apps loop).
    Instances,
}

impl Holds {
    /// Records whether `mover` is held now, and returns whether it was before.
    pub fn swap_held(&self, mover: Mover, held: bool) -> bool {
        self.held[mover as usize].swap(held, Ordering::Relaxed)
    }

    /// Records the sites `lost` now, and returns those newly lost and those back (lost
    /// before, not now, and still among `sites`).
    pub fn lost_sites(&self, lost: &[String], sites: &[SiteHealth]) -> (Vec<String>, Vec<String>) {
        let mut known = self.lost.lock().expect("not poisoned");
        let new = lost
            .iter()
            .filter(|s| !known.contains(*s))
            .cloned()
            .collect();
        let back = known
            .iter()
            .filter(|s| !lost.contains(s) && sites.iter().any(|h| &h.site == *s))
            .cloned()
            .collect();
        *known = lost.iter().cloned().collect();
        (new, back)
    }

    fn held_now(&self) {
        *self.last.lock().expect("not poisoned") = Some(std::time::Instant::now());
    }

    /// Whether a hold ended less than `window` ago.
    fn settling(&self, window: Duration) -> bool {
        self.last
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| at.elapsed() < window)
    }
}

/// How long after a hold the sites are taken to be still coming back: `(alive_after + 1)`
/// probe intervals, the time a worker declared dead during the cut takes to be declared
/// alive again by the probe rounds.
fn settling_window(health: &crate::config::HealthConfig) -> Duration {
    health.interval * (health.alive_after + 1)
}

/// What the guard on moves concluded for one pass.
#[derive(Debug, Default)]
pub struct Guard {
    pub verdict: policy::Verdict,
    /// The health of each site it rests on.
    pub sites: Vec<SiteHealth>,
    /// Workers declared dead that answer now, found only in the minutes after a hold:
    /// Orion was cut off from them, they did not die. Nothing is moved off them; the
    /// probe loop soon declares them alive.
    pub revived: HashSet<u64>,
}

/// The guard on moves, for a pass of the migration or apps loop that has something to
/// move (`must_move`): see [`policy::judge`]. Watch sessions cut by a fault
/// between Orion and the fleet drop one by one, each at its own keepalive, so the first
/// deaths are declared while the other workers still look alive in the database: before
/// anything moves, the workers not declared dead are probed again ([`answering_now`]).
///
/// A cut also heals worker by worker: the workers declared dead during it come back
/// alive only after `health.alive_after` probe rounds, and meanwhile the sites that
/// answer first would make the others look lost. For `(alive_after + 1)` probe intervals
/// after a hold, the dead workers are probed too, those that answer are `revived`, and a
/// site still silent is not taken for lost: moves stay held (`healing`).
pub async fn guard(ctx: &Context, must_move: bool) -> anyhow::Result<Guard> {
    let max_fraction = ctx.config.migration.max_dead_fraction;
    let mut sites = ctx
        .store
        .site_health()
        .await
        .context("Failed to count workers by site")?;
    let mut verdict = policy::judge(&sites, max_fraction);
    let total: i64 = sites.iter().map(|s| s.total).sum();
    let settling = ctx.holds.settling(settling_window(&ctx.config.health));
    let mut revived = HashSet::new();
    if (!verdict.hold || settling) && must_move && total >= 3 {
        (sites, revived) = answering_now(ctx, sites, settling).await?;
        verdict = policy::judge(&sites, max_fraction);
    }
    if verdict.hold {
        ctx.holds.held_now();
    } else if settling && !verdict.lost.is_empty() {
        // The first site back would make the others look lost: hold until the window
        // has passed (not counted as a hold: it does not extend the window).
        verdict.hold = true;
        verdict.healing = true;
        // Not lost: not back yet.
        verdict.lost.clear();
    }
    Ok(Guard {
        verdict,
        sites,
        revived,
    })
}

/// Probes every worker not declared dead (and, with `dead_too`, the dead ones), without
/// recording anything, and returns the sites with `failing` = those that did not answer
/// (a dead one that answers counts as neither dead nor failing), and the dead workers
/// that answered. Stops as soon as the verdict is known (a site answers, or every site
/// is beyond the limit), so one hung worker does not delay a move; with `dead_too` every
/// answer is waited for.
async fn answering_now(
    ctx: &Context,
    mut sites: Vec<SiteHealth>,
    dead_too: bool,
) -> anyhow::Result<(Vec<SiteHealth>, HashSet<u64>)> {
    let max_fraction = ctx.config.migration.max_dead_fraction;
    let workers = ctx
        .store
        .probe_targets()
        .await
        .context("Failed to list workers")?;
    let targets: Vec<_> = workers
        .iter()
        // A withdrawn worker (quarantined, retired) is out of service for another reason
        // than this fault.
        .filter(|w| (dead_too || w.status != WorkerStatus::Dead) && !w.is_withdrawn())
        .map(|w| {
            (
                w.id,
                w.status == WorkerStatus::Dead,
                w.site.clone(),
                w.target(),
            )
        })
        .collect();
    let mut candidates: HashMap<String, i64> = HashMap::new();
    for (_, dead, site, _) in &targets {
        if !dead {
            *candidates.entry(site.clone()).or_default() += 1;
        }
    }
    for s in &mut sites {
        s.failing = 0;
    }
    let timeout = ctx.config.health.probe_timeout;
    let mut probes: futures::stream::FuturesUnordered<_> = targets
        .iter()
        .map(|(id, dead, site, target)| async move {
            (
                *id,
                *dead,
                site,
                ctx.prober.probe(target, timeout).await.is_ok(),
            )
        })
        .collect();
    let mut answered: HashMap<String, i64> = HashMap::new();
    let mut revived = HashSet::new();
    while let Some((id, dead, site, ok)) = probes.next().await {
        let Some(s) = sites.iter_mut().find(|s| &s.site == site) else {
            continue;
        };
        match (dead, ok) {
            (true, true) => {
                revived.insert(id);
                s.dead -= 1;
            }
            (true, false) => {}
            (false, true) => *answered.entry(site.clone()).or_default() += 1,
            (false, false) => s.failing += 1,
        }
        if dead_too {
            continue;
        }
        let limit = |s: &SiteHealth| max_fraction * s.total as f64;
        let settled_hold = sites.iter().all(|s| (s.dead + s.failing) as f64 > limit(s));
        let settled_go = sites.iter().any(|s| {
            let unsure = candidates.get(&s.site).copied().unwrap_or(0)
                - answered.get(&s.site).copied().unwrap_or(0);
            (s.dead + unsure) as f64 <= limit(s)
        });
        if settled_hold || settled_go {
            break;
        }
    }
    Ok((sites, revived))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, dead: i64) -> SiteHealth {
        SiteHealth {
            site: name.into(),
            total: 3,
            dead,
            failing: 0,
        }
    }

    #[test]
    fn a_site_lost_and_back_is_said_once_each() {
        let holds = Holds::default();
        let sites = [site("a", 3), site("b", 0)];
        let lost = vec!["a".to_owned()];
        assert_eq!(holds.lost_sites(&lost, &sites), (lost.clone(), vec![]));
        assert_eq!(holds.lost_sites(&lost, &sites), (vec![], vec![]));
        assert_eq!(holds.lost_sites(&[], &sites), (vec![], lost));
        assert_eq!(holds.lost_sites(&[], &sites), (vec![], vec![]));
    }

    #[test]
    fn a_lost_site_gone_from_the_inventory_is_not_said_back() {
        let holds = Holds::default();
        let lost = vec!["a".to_owned()];
        holds.lost_sites(&lost, &[site("a", 3), site("b", 0)]);
        assert_eq!(holds.lost_sites(&[], &[site("b", 0)]), (vec![], vec![]));
    }

    #[test]
    fn each_mover_is_held_on_its_own() {
        let holds = Holds::default();
        assert!(!holds.swap_held(Mover::Rentals, true));
        assert!(!holds.swap_held(Mover::Instances, false));
        assert!(holds.swap_held(Mover::Rentals, false));
        assert!(!holds.swap_held(Mover::Instances, true));
        assert!(holds.swap_held(Mover::Instances, true));
    }
}
