//! The guard on moves (of rentals and of apps' instances) that tells a lost site from
//! Orion cut off from every site. The migration and apps loops ask it before they move
//! anything ([`guard`]); the rules it applies are pure ([`super::policy::judge`]), its
//! memory is [`Holds`] (beside it, in [`super::holds`]), the probing of the fleet again
//! and the window after a hold are here.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;

pub use super::holds::{Holds, Mover};
use super::policy::{self, SiteHealth};
use crate::context::Context;
use crate::model::WorkerStatus;

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
/// anything moves, the workers not declared dead are probed again (`answering_now`).
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
