//! The pure decisions of the apps loop, apart from any I/O so that each is tested on its
//! own:
//!
//! - [`schedule`]: from an app's wish and its live instances, which instances to place
//!   (and where, [`place`]) and which to stop: scaling, rolling replacement of an older
//!   generation (the new instance running before an old one goes), moving off workers
//!   apps may no longer use;
//! - [`reconcile_node`]: from a worker's wanted instances and the containers observed on
//!   it, what to remove, what to (re)start and what to record;
//! - [`backoff`]: the crash back-off, as Kubernetes does it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::InstanceState;
use super::runtime::Observed;

/// An app as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct AppWish {
    pub id: u64,
    pub replicas: u32,
    pub generation: u32,
    pub port: Option<u16>,
    pub deleting: bool,
}

/// A live instance (not gone) as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Live {
    pub id: u64,
    pub app_id: u64,
    pub worker_id: u64,
    pub generation: u32,
    pub state: InstanceState,
    /// Seen running for at least [`MIN_READY`] without a crash since: a rolling change
    /// only goes on past such an instance (Kubernetes' `minReadySeconds`).
    pub ready: bool,
}

/// How long a new instance must have been seen running, with no crash, before a rolling
/// change stops an old one for it.
pub const MIN_READY: Duration = Duration::from_secs(3);

/// A worker that could host instances.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: u64,
    pub site: String,
    /// Apps may be placed there now (alive, not quarantined, drained, retired, nor held
    /// by a rental unless workers are shared). Instances on an unfit worker move away.
    pub fit: bool,
    /// Live instances there, of every app.
    pub load: usize,
    /// Ports taken there by live instances (they share the worker's network).
    pub ports: HashSet<u16>,
}

/// What the scheduler decided for one app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Workers to place a new instance of the current generation on.
    pub place: Vec<u64>,
    /// Instances to stop (they are removed from their workers by the node pass).
    pub stop: Vec<u64>,
    /// Instances wanted that no worker can take now.
    pub unplaced: u32,
}

/// Decides what happens to one app's instances. `live` holds the app's instances that
/// are not gone (stopping ones included); `workers` every worker that exists.
pub fn schedule(app: &AppWish, live: &[Live], workers: &[Candidate]) -> Schedule {
    let mut out = Schedule::default();
    let active: Vec<&Live> = live
        .iter()
        .filter(|i| i.state != InstanceState::Stopping && i.state != InstanceState::Gone)
        .collect();
    if app.deleting || app.replicas == 0 {
        out.stop = active.iter().map(|i| i.id).collect();
        return out;
    }
    let fit: HashMap<u64, &Candidate> = workers
        .iter()
        .filter(|w| w.fit)
        .map(|w| (w.id, w))
        .collect();
    let (mut current, mut old): (Vec<&Live>, Vec<&Live>) = active
        .iter()
        .partition(|i| i.generation == app.generation && fit.contains_key(&i.worker_id));
    let wanted = app.replicas as usize;
    // Spread again over sites (after a site's loss and return): one instance of a
    // crowded site is replaced, as an older generation would be, by one on a site with
    // fewer.
    if old.is_empty()
        && current.len() >= wanted
        && let Some(id) = misplaced(app, &current, workers)
    {
        current.retain(|i| i.id != id);
        old.extend(active.iter().filter(|i| i.id == id));
    }

    // An old instance that is not running serves nobody: it goes at once.
    let (old_running, old_idle): (Vec<&Live>, Vec<&Live>) =
        old.iter().partition(|i| i.state == InstanceState::Running);
    out.stop.extend(old_idle.iter().map(|i| i.id));

    if old_running.is_empty() {
        if current.len() < wanted {
            let n = wanted - current.len();
            out.place = place(n, app, &current, workers);
            out.unplaced = (n - out.place.len()) as u32;
        } else {
            // Too many: the ones that do not run first, then those of the most crowded
            // site, then the newest.
            let crowding = per_site(&current, workers);
            let site_of = |i: &Live| {
                workers
                    .iter()
                    .find(|w| w.id == i.worker_id)
                    .map(|w| w.site.as_str())
            };
            let mut extra = current.clone();
            extra.sort_by_key(|i| {
                let crowd = site_of(i)
                    .and_then(|s| crowding.get(s))
                    .copied()
                    .unwrap_or(0);
                (
                    i.state == InstanceState::Running,
                    std::cmp::Reverse(crowd),
                    std::cmp::Reverse(i.id),
                )
            });
            out.stop
                .extend(extra.iter().take(current.len() - wanted).map(|i| i.id));
        }
        return out;
    }

    // Rolling: one instance at a time, the new one ready before an old one goes.
    if current.iter().any(|i| !i.ready) {
        return out;
    }
    if current.len() + old_running.len() > wanted && !current.is_empty() {
        let oldest = old_running.iter().min_by_key(|i| i.id).expect("not empty");
        out.stop.push(oldest.id);
    } else if current.len() < wanted {
        out.place = place(1, app, &current, workers);
        if out.place.is_empty() {
            out.unplaced = 1;
            // Nowhere to put the new one beside the old: replace in place, one at a
            // time, and only while the app has all its instances (never below that).
            if current.len() + old_running.len() >= wanted {
                let oldest = old_running.iter().min_by_key(|i| i.id).expect("not empty");
                out.stop.push(oldest.id);
            }
        }
    } else {
        // Enough current ones already: the old ones are extra.
        out.stop.extend(old_running.iter().map(|i| i.id));
    }
    out
}

/// How many of `instances` each site holds.
fn per_site<'a>(instances: &[&Live], workers: &'a [Candidate]) -> HashMap<&'a str, usize> {
    let mut count = HashMap::new();
    for i in instances {
        if let Some(w) = workers.iter().find(|w| w.id == i.worker_id) {
            *count.entry(w.site.as_str()).or_default() += 1;
        }
    }
    count
}

/// The instance to move so that the app spreads over sites again: the newest of the
/// site holding the most **ready** instances, when that is at least two more than a
/// site that has room for one (a fit worker without an instance of the app, its port
/// free). Counting only ready instances keeps the decision until the new instance is
/// ready, so the move ends the way it began.
fn misplaced(app: &AppWish, current: &[&Live], workers: &[Candidate]) -> Option<u64> {
    let ready: Vec<&Live> = current.iter().copied().filter(|i| i.ready).collect();
    let count = per_site(&ready, workers);
    let taken: HashSet<u64> = current.iter().map(|i| i.worker_id).collect();
    let fewest = workers
        .iter()
        .filter(|w| w.fit && !taken.contains(&w.id))
        .filter(|w| app.port.is_none_or(|p| !w.ports.contains(&p)))
        .map(|w| count.get(w.site.as_str()).copied().unwrap_or(0))
        .min()?;
    let (crowded, most) = count
        .iter()
        .max_by_key(|(site, n)| (**n, std::cmp::Reverse(**site)))?;
    if *most < fewest + 2 {
        return None;
    }
    ready
        .iter()
        .filter(|i| {
            workers
                .iter()
                .any(|w| w.id == i.worker_id && w.site == *crowded)
        })
        .max_by_key(|i| i.id)
        .map(|i| i.id)
}

/// Picks `n` workers for new instances of `app`: fit workers that hold none of its
/// instances yet and whose network does not already use its port; sites holding the
/// fewest of its instances first, then the least loaded worker, then the lowest id.
pub fn place(n: usize, app: &AppWish, current: &[&Live], workers: &[Candidate]) -> Vec<u64> {
    let mut taken: HashSet<u64> = current.iter().map(|i| i.worker_id).collect();
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for i in current {
        if let Some(w) = workers.iter().find(|w| w.id == i.worker_id) {
            *per_site.entry(w.site.as_str()).or_default() += 1;
        }
    }
    let mut load: HashMap<u64, usize> = workers.iter().map(|w| (w.id, w.load)).collect();
    let mut chosen = Vec::new();
    for _ in 0..n {
        let best = workers
            .iter()
            .filter(|w| w.fit && !taken.contains(&w.id))
            .filter(|w| app.port.is_none_or(|p| !w.ports.contains(&p)))
            .min_by_key(|w| {
                (
                    per_site.get(w.site.as_str()).copied().unwrap_or(0),
                    load[&w.id],
                    w.id,
                )
            });
        let Some(w) = best else { break };
        taken.insert(w.id);
        *per_site.entry(w.site.as_str()).or_default() += 1;
        *load.get_mut(&w.id).expect("known worker") += 1;
        chosen.push(w.id);
    }
    chosen
}

/// The crash back-off before starting an instance again after its `crashes`-th exit in a
/// row: at once for the first, then 10 s doubling up to 5 min (Kubernetes' rule).
pub fn backoff(crashes: u32) -> Duration {
    match crashes {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(10u64.saturating_mul(1 << (n - 2).min(5)).min(300)),
    }
}

/// A run this long resets the crash count: the instance was healthy, its next exit is
/// a first one again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(600);

/// A wanted instance on the worker being reconciled, as the database holds it.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub id: u64,
    pub container: String,
    pub state: InstanceState,
    pub crashes: u32,
    pub next_start_at: Option<DateTime<Utc>>,
}

/// What one worker's containers call for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePlan {
    /// Containers to remove, with the instance each belongs to (if Orion knows it):
    /// unknown to Orion, over, or stopping. Done before anything starts, so a worker
    /// that comes back is fenced before it gets new work.
    pub remove: Vec<(String, Option<u64>)>,
    /// Stopping instances with no container left: simply over.
    pub gone: Vec<u64>,
    /// Instances to start (create, or start again).
    pub start: Vec<u64>,
    /// What was observed of instances, to record.
    pub record: Vec<Record>,
}

/// An observation to record on an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Running {
        id: u64,
        started_at: Option<DateTime<Utc>>,
    },
    /// Seen exited: the crash count and when it may start again.
    Exited {
        id: u64,
        exit_code: Option<i64>,
        crashes: u32,
        next_start_at: DateTime<Utc>,
    },
}

/// Compares a worker's wanted instances with the containers observed there (those
/// labelled with its node: Orion's and only Orion's).
pub fn reconcile_node(wanted: &[Wanted], observed: &[Observed], now: DateTime<Utc>) -> NodePlan {
    let mut plan = NodePlan::default();
    let by_name: HashMap<&str, &Wanted> =
        wanted.iter().map(|w| (w.container.as_str(), w)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    for o in observed {
        match by_name.get(o.name.as_str()) {
            None => plan.remove.push((o.name.clone(), o.instance())),
            Some(w) if w.state == InstanceState::Stopping => {
                plan.remove.push((o.name.clone(), Some(w.id)));
                seen.insert(w.container.as_str());
            }
            Some(w) => {
                seen.insert(w.container.as_str());
                if o.is_running() {
                    if w.state != InstanceState::Running {
                        plan.record.push(Record::Running {
                            id: w.id,
                            started_at: o.started_at,
                        });
                    }
                    continue;
                }
                // Exited (or created and never started).
                if w.state != InstanceState::Exited {
                    let ran = match (o.started_at, o.finished_at) {
                        (Some(s), Some(f)) => (f - s).to_std().unwrap_or_default(),
                        _ => Duration::ZERO,
                    };
                    let crashes = if ran >= HEALTHY_RUN { 1 } else { w.crashes + 1 };
                    let delay = chrono::Duration::from_std(backoff(crashes)).unwrap_or_default();
                    let next_start_at = now + delay;
                    plan.record.push(Record::Exited {
                        id: w.id,
                        exit_code: o.exit_code,
                        crashes,
                        next_start_at,
                    });
                    if next_start_at <= now {
                        plan.start.push(w.id);
                    }
                } else if w.next_start_at.is_none_or(|t| t <= now) {
                    plan.start.push(w.id);
                }
            }
        }
    }
    for w in wanted {
        if seen.contains(w.container.as_str()) {
            continue;
        }
        match w.state {
            InstanceState::Stopping => plan.gone.push(w.id),
            InstanceState::Gone => {}
            // Never started, or its container vanished (removed by hand): start it now.
            _ if w.next_start_at.is_none_or(|t| t <= now) => plan.start.push(w.id),
            _ => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    fn app(replicas: u32) -> AppWish {
        AppWish {
            id: 1,
            replicas,
            generation: 1,
            port: Some(8080),
            deleting: false,
        }
    }

    fn worker(id: u64, site: &str, load: usize) -> Candidate {
        Candidate {
            id,
            site: site.into(),
            fit: true,
            load,
            ports: HashSet::new(),
        }
    }

    fn live(id: u64, worker_id: u64, generation: u32, state: InstanceState) -> Live {
        Live {
            id,
            app_id: 1,
            worker_id,
            generation,
            state,
            ready: state == Running,
        }
    }

    #[test]
    fn new_instances_spread_over_distinct_workers_least_loaded_first() {
        let workers = [worker(1, "a", 3), worker(2, "a", 0), worker(3, "a", 1)];
        let s = schedule(&app(2), &[], &workers);
        assert_eq!(s.place, vec![2, 3]);
        assert_eq!(s.unplaced, 0);
    }

    #[test]
    fn sites_come_before_load() {
        let workers = [worker(1, "a", 0), worker(2, "a", 0), worker(3, "b", 5)];
        let s = schedule(&app(2), &[], &workers);
        assert_eq!(
            s.place,
            vec![1, 3],
            "one per site before a second in site a"
        );
    }

    #[test]
    fn after_a_site_returns_the_app_spreads_again_one_instance_at_a_time() {
        let workers = [
            worker(1, "a", 0),
            worker(2, "a", 0),
            worker(3, "b", 1),
            worker(4, "b", 1),
        ];
        // Both instances on site b (site a was lost, and is back).
        let both_on_b = [live(1, 3, 1, Running), live(2, 4, 1, Running)];
        let s = schedule(&app(2), &both_on_b, &workers);
        assert_eq!(
            (s.place.as_slice(), s.stop.as_slice()),
            ([1].as_slice(), [].as_slice())
        );
        // The new one on a is not ready yet: nothing more happens.
        let mut moving = both_on_b.to_vec();
        moving.push(live(3, 1, 1, Pending));
        let s = schedule(&app(2), &moving, &workers);
        assert_eq!(s, Schedule::default());
        // Ready: the newest of site b goes.
        moving[2] = live(3, 1, 1, Running);
        let s = schedule(&app(2), &moving, &workers);
        assert_eq!(
            (s.place.as_slice(), s.stop.as_slice()),
            ([].as_slice(), [2].as_slice())
        );
        // Spread: nothing to do.
        let spread = [live(1, 3, 1, Running), live(3, 1, 1, Running)];
        assert_eq!(schedule(&app(2), &spread, &workers), Schedule::default());
    }

    #[test]
    fn a_site_without_room_takes_no_instance_back() {
        let mut workers = [worker(1, "a", 0), worker(3, "b", 1), worker(4, "b", 1)];
        workers[0].fit = false;
        let both_on_b = [live(1, 3, 1, Running), live(2, 4, 1, Running)];
        assert_eq!(schedule(&app(2), &both_on_b, &workers), Schedule::default());
    }

    #[test]
    fn no_worker_twice_no_port_clash_no_unfit_worker() {
        let mut busy = worker(2, "a", 0);
        busy.ports.insert(8080);
        let mut rented = worker(3, "a", 0);
        rented.fit = false;
        let workers = [worker(1, "a", 0), busy, rented];
        let s = schedule(&app(3), &[], &workers);
        assert_eq!(s.place, vec![1]);
        assert_eq!(s.unplaced, 2);
    }

    #[test]
    fn scaling_down_stops_idle_then_newest_instances() {
        let workers = [worker(1, "a", 1), worker(2, "a", 1), worker(3, "a", 1)];
        let l = [
            live(10, 1, 1, Running),
            live(11, 2, 1, Pending),
            live(12, 3, 1, Running),
        ];
        assert_eq!(schedule(&app(2), &l, &workers).stop, vec![11]);
        assert_eq!(schedule(&app(1), &l, &workers).stop, vec![11, 12]);
        assert_eq!(schedule(&app(0), &l, &workers).stop, vec![10, 11, 12]);
    }

    #[test]
    fn a_deleted_app_stops_everything_and_places_nothing() {
        let mut a = app(3);
        a.deleting = true;
        let l = [live(10, 1, 1, Running), live(11, 2, 1, Stopping)];
        let s = schedule(&a, &l, &[worker(1, "a", 0), worker(2, "a", 0)]);
        assert_eq!(s.stop, vec![10]);
        assert!(s.place.is_empty());
    }

    #[test]
    fn instances_on_an_unfit_worker_are_replaced_before_they_go() {
        let mut gone_bad = worker(1, "a", 1);
        gone_bad.fit = false;
        let workers = [gone_bad, worker(2, "a", 1), worker(3, "a", 0)];
        let l = [live(10, 1, 1, Running), live(11, 2, 1, Running)];
        let s = schedule(&app(2), &l, &workers);
        assert_eq!(s.place, vec![3]);
        assert!(
            s.stop.is_empty(),
            "the old one serves until its replacement runs"
        );
    }

    #[test]
    fn a_rolling_change_replaces_one_instance_at_a_time() {
        let workers = [worker(1, "a", 1), worker(2, "a", 1), worker(3, "a", 0)];
        let mut a = app(2);
        a.generation = 2;
        // Step 1: both old, running: one new one is placed, nothing stops.
        let step1 = [live(10, 1, 1, Running), live(11, 2, 1, Running)];
        let s = schedule(&a, &step1, &workers);
        assert_eq!((s.place.clone(), s.stop.clone()), (vec![3], vec![]));
        // Step 2: the new one is pending: wait.
        let step2 = [step1[0].clone(), step1[1].clone(), live(12, 3, 2, Pending)];
        assert_eq!(schedule(&a, &step2, &workers), Schedule::default());
        // Step 3: it runs: the oldest old one goes.
        let step3 = [step1[0].clone(), step1[1].clone(), live(12, 3, 2, Running)];
        let s = schedule(&a, &step3, &workers);
        assert_eq!((s.place.clone(), s.stop.clone()), (vec![], vec![10]));
        // Step 4: one old left, one new running: place the second new one (worker 1 is
        // free again once 10 is stopping).
        let step4 = [live(11, 2, 1, Running), live(12, 3, 2, Running)];
        let s = schedule(&a, &step4, &workers);
        assert_eq!((s.place.clone(), s.stop.clone()), (vec![1], vec![]));
        // Step 5: both new ones run: the last old one goes.
        let step5 = [
            live(11, 2, 1, Running),
            live(12, 3, 2, Running),
            live(13, 1, 2, Running),
        ];
        let s = schedule(&a, &step5, &workers);
        assert_eq!((s.place, s.stop), (vec![], vec![11]));
    }

    #[test]
    fn a_roll_waits_for_a_new_instance_to_be_ready_not_merely_running() {
        let workers = [worker(1, "a", 1), worker(2, "a", 1), worker(3, "a", 0)];
        let mut a = app(2);
        a.generation = 2;
        let mut fresh = live(12, 3, 2, Running);
        fresh.ready = false;
        let l = [live(10, 1, 1, Running), live(11, 2, 1, Running), fresh];
        assert_eq!(schedule(&a, &l, &workers), Schedule::default());
    }

    #[test]
    fn replacing_in_place_never_takes_an_app_below_its_replicas() {
        // No spare worker (each already holds the port): one old instance may be replaced
        // in place while the app is whole, not once it is short.
        let mut full: Vec<Candidate> = (1..=2).map(|i| worker(i, "a", 1)).collect();
        for w in &mut full {
            w.ports.insert(8080);
        }
        let mut a = app(2);
        a.generation = 2;
        let whole = [live(10, 1, 1, Running), live(11, 2, 1, Running)];
        assert_eq!(schedule(&a, &whole, &full).stop, vec![10]);
        let short = [live(11, 2, 1, Running)];
        let s = schedule(&a, &short, &full);
        assert!(s.stop.is_empty(), "{s:?}");
        assert_eq!(s.unplaced, 1);
    }

    #[test]
    fn backoff_is_immediate_then_doubles_from_ten_seconds_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![0, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    fn wanted(id: u64, state: InstanceState) -> Wanted {
        Wanted {
            id,
            container: format!("n.web.{id}"),
            state,
            crashes: 0,
            next_start_at: None,
        }
    }

    fn observed(id: Option<u64>, name: &str, state: &str, ran_secs: i64) -> Observed {
        let now = Utc::now();
        Observed {
            name: name.into(),
            labels: id
                .map(|i| BTreeMap::from([("orion.instance".to_owned(), i.to_string())]))
                .unwrap_or_default(),
            state: state.into(),
            exit_code: (state == "exited").then_some(3),
            started_at: Some(now - chrono::Duration::seconds(ran_secs + 1)),
            finished_at: (state == "exited").then(|| now - chrono::Duration::seconds(1)),
        }
    }

    #[test]
    fn a_node_pass_starts_the_missing_removes_the_unknown_and_records_the_running() {
        let now = Utc::now();
        let w = [
            wanted(1, Pending),
            wanted(2, Running),
            wanted(3, Pending),
            wanted(4, Stopping),
        ];
        let o = [
            observed(Some(1), "n.web.1", "running", 5),
            // 2 is missing: removed by hand.
            observed(None, "n.other.99", "running", 5),
            observed(Some(4), "n.web.4", "running", 5),
        ];
        let plan = reconcile_node(&w, &o, now);
        assert_eq!(
            plan.remove,
            vec![("n.other.99".into(), None), ("n.web.4".into(), Some(4))]
        );
        assert_eq!(plan.start, vec![2, 3]);
        assert!(matches!(
            plan.record.as_slice(),
            [Record::Running { id: 1, .. }]
        ));
        assert!(plan.gone.is_empty());
    }

    #[test]
    fn a_first_crash_restarts_at_once_a_second_waits() {
        let now = Utc::now();
        let o = [observed(Some(1), "n.web.1", "exited", 2)];
        let plan = reconcile_node(&[wanted(1, Running)], &o, now);
        assert_eq!(plan.start, vec![1]);
        assert!(matches!(plan.record[0], Record::Exited { crashes: 1, .. }));

        let mut again = wanted(1, Running);
        again.crashes = 1;
        let plan = reconcile_node(&[again], &o, now);
        assert!(plan.start.is_empty(), "10 s back-off");
        let Record::Exited {
            crashes,
            next_start_at,
            ..
        } = plan.record[0]
        else {
            panic!("exit recorded")
        };
        assert_eq!(crashes, 2);
        assert_eq!((next_start_at - now).num_seconds(), 10);

        // Still exited, back-off not over: nothing; over: start.
        let mut waiting = wanted(1, Exited);
        waiting.next_start_at = Some(now + chrono::Duration::seconds(5));
        assert!(reconcile_node(&[waiting.clone()], &o, now).start.is_empty());
        waiting.next_start_at = Some(now - chrono::Duration::seconds(1));
        assert_eq!(reconcile_node(&[waiting], &o, now).start, vec![1]);
    }

    #[test]
    fn a_long_healthy_run_resets_the_crash_count() {
        let mut w = wanted(1, Running);
        w.crashes = 6;
        let o = [observed(Some(1), "n.web.1", "exited", 3600)];
        let plan = reconcile_node(&[w], &o, Utc::now());
        assert!(matches!(plan.record[0], Record::Exited { crashes: 1, .. }));
        assert_eq!(plan.start, vec![1]);
    }

    #[test]
    fn a_stopping_instance_without_container_is_simply_over() {
        let plan = reconcile_node(&[wanted(4, Stopping)], &[], Utc::now());
        assert_eq!(plan.gone, vec![4]);
        assert!(plan.remove.is_empty() && plan.start.is_empty());
    }
}
