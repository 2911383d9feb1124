//! Apps: make the workers hold exactly the instances the apps ask for.
//!
//! Each pass, in order:
//! 1. instances on a dead (or quarantined, or retired) worker are over: lost with it,
//!    unless too many workers fail at once (the guard the migration loop uses: then it
//!    looks like Orion is cut off, and nothing moves);
//! 2. each app is scheduled ([`crate::apps::plan::schedule`]): new instances placed as
//!    rows, unwanted ones marked stopping;
//! 3. each alive worker is observed with **one** SSH command (`orion-runtime ps`, every
//!    container labelled with its node) and made to match
//!    ([`crate::apps::plan::reconcile_node`]): what is unknown, over or stopping is
//!    removed first (so a worker that comes back is fenced before it runs anything new),
//!    then what is missing or exited is started, through the `app_run`/`app_remove`
//!    playbooks;
//! 4. deleted apps whose instances are all gone are forgotten;
//! 5. with `[caddy] admin` set, Caddy's routes are made to send each app's address to
//!    its running instances ([`crate::apps::caddy`]).
//!
//! The loop runs every `apps.interval`, and at once when woken: an app changed, a worker
//! changed status, or a worker's engine reported a container starting or dying. That
//! last signal comes from [`follow_runtimes`]: on every watched worker, `orion-runtime
//! events` runs on the open watch connection, so an instance killed by hand is seen at
//! once rather than at the next pass. Wake-ups that come in a burst are one pass, at
//! least [`WAKE_REST`] after the previous one ended.
//!
//! A container the worker cannot read (the wrapper says so for that one entry) holds
//! back its own instance only; the rest of that worker is reconciled.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{Next, Pass, Wake, run_loop_resting};
use crate::apps::caddy::{AppRoute, Synced};
use crate::apps::plan::{self, AppWish, Candidate, Live, Record, Wanted};
use crate::apps::runtime::{self, RemoveSpec, RunSpec};
use crate::apps::{InstanceState, container_name};
use crate::context::Context;
use crate::playbook::{AppVars, Playbook};
use crate::probe::guard::Mover;
use crate::store::{AppRecord, InstanceRecord, InstanceUpdate, Worker};

pub const LOOP: &str = "apps";

/// Workers reconciled at once; each is a few SSH round trips.
const CONCURRENT_NODES: usize = 16;

/// Lines of an instance's log kept when it exits.
const LOG_TAIL_LINES: u32 = 20;

/// What the apps loop remembers between passes.
#[derive(Debug, Default)]
pub struct State {
    /// Apps short of workers at the last pass, and by how many: an event when it changes.
    unplaced: std::sync::Mutex<HashMap<u64, u32>>,
    /// The leadership epoch of the last pass: under a new one, another process may have
    /// changed Caddy's routes meanwhile, so what this one last applied is forgotten.
    epoch: std::sync::atomic::AtomicU64,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    pub placed: usize,
    pub stopped: usize,
    pub started: usize,
    pub removed: usize,
    pub lost: usize,
    /// Instances wanted that no worker could take.
    pub unplaced: u32,
    /// Workers that could not be observed or changed (tried again next pass).
    pub failed_workers: usize,
    /// Containers a worker listed but could not read: left as they are, the rest of
    /// their worker reconciled.
    pub unreadable: usize,
    /// True when nothing was declared lost because too many workers fail at once.
    pub held: bool,
    /// The earliest end of a crash back-off, or of a new instance's wait to be ready
    /// for a rolling change, if one is waiting.
    pub next_restart: Option<Duration>,
    /// What the sync of Caddy's routes changed.
    pub routes: Synced,
    /// True when Caddy's routes could not be synced (tried again next pass).
    pub routing_failed: bool,
}

/// The next pass comes at the interval, or when a back-off ends if that is sooner.
impl Pass for PassSummary {
    fn next(&self) -> Next {
        // Caddy unreachable (restarting): its routes are tried again soon.
        let routing = self.routing_failed.then_some(ROUTING_RETRY);
        match (self.next_restart, routing) {
            (Some(a), Some(b)) => Next::After(a.min(b)),
            (Some(a), None) | (None, Some(a)) => Next::After(a),
            (None, None) => Next::Interval,
        }
    }
}

/// How soon a pass that could not sync Caddy's routes is followed by another.
const ROUTING_RETRY: Duration = Duration::from_secs(2);

/// Whether the apps on `worker` may stay there / be placed there.
fn fit(ctx: &Context, worker: &Worker) -> bool {
    worker.is_usable() && (ctx.config.apps.shared_workers || worker.rental_id.is_none())
}

/// One pass: see the module's documentation.
pub async fn apps_pass(ctx: &Context, state: &State) -> anyhow::Result<PassSummary> {
    let mut summary = PassSummary::default();
    let epoch = ctx.leader.epoch().unwrap_or(0);
    if state.epoch.swap(epoch, Ordering::Relaxed) != epoch
        && let Some(router) = &ctx.router
    {
        router.forget();
    }
    let workers = ctx
        .store
        .list_workers()
        .await
        .context("Failed to list workers")?;
    let by_id: HashMap<u64, &Worker> = workers.iter().map(|w| (w.id, w)).collect();
    let mut live = ctx
        .store
        .live_instances(None)
        .await
        .context("Failed to list instances")?;

    // 1. Instances lost with their worker.
    let mut doomed: Vec<&InstanceRecord> = live
        .iter()
        .filter(|i| by_id.get(&i.worker_id).is_none_or(|w| w.is_lost()))
        .collect();
    // The migration loop's guard: a whole site lost moves; every site at once holds.
    let guard = crate::probe::guard(ctx, !doomed.is_empty()).await?;
    let (hold, sites) = (guard.verdict.hold, &guard.sites);
    // A worker Orion was cut off from, answering again before the probes say so.
    doomed.retain(|i| !guard.revived.contains(&i.worker_id));
    if hold {
        summary.held = true;
        // Said once per hold, at the first pass that holds something back.
        if !doomed.is_empty() && !ctx.holds.swap_held(Mover::Instances, true) {
            let detail = crate::probe::policy::describe(sites);
            tracing::warn!(sites = %detail, "every site fails at once: no instance is moved");
            ctx.store
                .append_event(
                    "apps.held",
                    None,
                    None,
                    &format!(
                        "every site has most of its workers unreachable at once ({detail}): apps' instances are not moved (Orion is probably cut off from the fleet)"
                    ),
                )
                .await?;
        }
    } else if ctx.holds.swap_held(Mover::Instances, false) {
        tracing::info!("enough workers answer again: apps' instances move again");
    }
    if !hold && !doomed.is_empty() {
        summary.lost = doomed.len();
        ctx.store
            .end_instances(
                &doomed,
                "instance.lost",
                "its worker is gone; replaced elsewhere",
            )
            .await?;
        live = ctx.store.live_instances(None).await?;
    }

    // 2. Schedule each app.
    let apps = ctx.store.all_apps().await.context("Failed to list apps")?;
    let app_by_id: HashMap<u64, &AppRecord> = apps.iter().map(|a| (a.id, a)).collect();
    let mut candidates: Vec<Candidate> = workers
        .iter()
        .filter(|w| !w.retired)
        .map(|w| Candidate {
            id: w.id,
            site: w.site.clone(),
            // A worker answering again after a cut keeps its instances (see `revived`).
            fit: fit(ctx, w) || (guard.revived.contains(&w.id) && w.quarantine_reason.is_none()),
            load: 0,
            ports: HashSet::new(),
        })
        .collect();
    for i in &live {
        if let Some(c) = candidates.iter_mut().find(|c| c.id == i.worker_id) {
            c.load += 1;
            if let Some(port) = app_by_id.get(&i.app_id).and_then(|a| a.port) {
                c.ports.insert(port);
            }
        }
    }
    let mut unplaced_now = HashMap::new();
    let min_ready = chrono::Duration::from_std(plan::MIN_READY).expect("a few seconds");

    // Held: nothing is placed or stopped anywhere until enough workers answer again; the
    // workers that do answer keep (and heal) what they run.
    let scheduled: &[AppRecord] = if hold { &[] } else { &apps };
    for app in scheduled {
        let wish = AppWish {
            id: app.id,
            replicas: app.replicas,
            generation: app.generation,
            port: app.port,
            deleting: app.deleting,
        };
        let app_live: Vec<Live> = live
            .iter()
            .filter(|i| i.app_id == app.id)
            .map(|i| Live {
                id: i.id,
                app_id: i.app_id,
                worker_id: i.worker_id,
                generation: i.generation,
                state: i.state,
                ready: i.state == InstanceState::Running
                    && i.crashes == 0
                    && i.started_at.is_some_and(|t| Utc::now() - t >= min_ready),
            })
            .collect();
        let decided = plan::schedule(&wish, &app_live, &candidates);
        for worker_id in &decided.place {
            let w = by_id[worker_id];
            let node = node_of(w);
            ctx.store.place_instance(app, w.id, &w.name, &node).await?;
            if let Some(c) = candidates.iter_mut().find(|c| c.id == *worker_id) {
                c.load += 1;
                c.ports.extend(app.port);
            }
        }
        ctx.store.stop_instances(&decided.stop).await?;
        summary.placed += decided.place.len();
        summary.stopped += decided.stop.len();
        summary.unplaced += decided.unplaced;
        if decided.unplaced > 0 {
            unplaced_now.insert(app.id, decided.unplaced);
        }
    }
    if !hold {
        report_unplaced(ctx, state, &apps, unplaced_now).await?;
    }
    if summary.placed + summary.stopped > 0 {
        live = ctx.store.live_instances(None).await?;
    }

    // 3. Make each alive worker hold exactly its instances.
    let reachable: Vec<&Worker> = workers.iter().filter(|w| w.is_tended()).collect();
    let mut passes = Vec::with_capacity(reachable.len());
    for w in reachable {
        let wanted: Vec<InstanceRecord> = live
            .iter()
            .filter(|i| i.worker_id == w.id)
            .cloned()
            .collect();
        passes.push(node_pass(ctx, w, wanted, &app_by_id));
    }
    let outcomes: Vec<Result<NodeOutcome, (String, anyhow::Error)>> = futures::stream::iter(passes)
        .buffer_unordered(CONCURRENT_NODES)
        .collect()
        .await;
    for o in outcomes {
        match o {
            Ok(o) => {
                summary.started += o.started;
                summary.removed += o.removed;
                summary.unreadable += o.unreadable;
                summary.next_restart = match (summary.next_restart, o.next_restart) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Err((worker, e)) => {
                summary.failed_workers += 1;
                tracing::warn!(worker = %worker, error = format!("{e:#}"), "apps: cannot reconcile the worker");
            }
        }
    }

    // What the node passes left: when a new instance will be ready for a rolling change
    // (a pass is due then), and what Caddy routes to.
    let settled = ctx.store.live_instances(None).await?;
    let now = Utc::now();
    let next_ready = settled
        .iter()
        .filter(|i| i.state == InstanceState::Running && i.crashes == 0)
        .filter_map(|i| i.started_at)
        .map(|t| t + min_ready)
        .filter(|ready_at| *ready_at > now)
        .min()
        .map(|ready_at| (ready_at - now).to_std().unwrap_or_default());
    summary.next_restart = match (summary.next_restart, next_ready) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };

    // 4. Forget deleted apps with nothing left.
    ctx.store.purge_deleted_apps().await?;

    // 5. Caddy serves each app's running instances, and nothing else.
    if let Some(router) = &ctx.router {
        match router.sync(&routes(&apps, &settled)).await {
            Ok(synced) => {
                // Written (and said) only when an app's route changed from applied to
                // refused or back: a refusal that lasts costs nothing at each pass.
                let news: Vec<&AppRecord> = apps
                    .iter()
                    .filter(|a| !a.deleting)
                    .filter(|a| {
                        let now = synced.refused.get(&a.name);
                        a.route_error.as_ref() != now
                            && (now.is_some() || synced.applied.contains(&a.name))
                    })
                    .collect();
                if !news.is_empty() {
                    for app in &news {
                        if let Some(why) = synced.refused.get(&app.name) {
                            tracing::warn!(app = %app.name, reason = %why,
                                "apps: Caddy refused the app's route");
                        }
                    }
                    ctx.store
                        .record_routes(&synced.applied, &synced.refused)
                        .await
                        .context("Failed to record which routes Caddy refused")?;
                }
                summary.routes = synced;
            }
            Err(e) => {
                summary.routing_failed = true;
                tracing::warn!(error = format!("{e:#}"), "apps: cannot sync Caddy's routes");
            }
        }
    }
    Ok(summary)
}

/// What Caddy should route: each app with a port, not deleted, to its running instances.
fn routes(apps: &[AppRecord], live: &[InstanceRecord]) -> Vec<AppRoute> {
    apps.iter()
        .filter(|app| !app.deleting)
        .filter_map(|app| {
            let port = app.port?;
            let upstreams = live
                .iter()
                .filter(|i| i.app_id == app.id && i.state == InstanceState::Running)
                .map(|i| format!("{}:{port}", i.host))
                .collect();
            Some(AppRoute {
                name: app.name.clone(),
                upstreams,
                health_path: app.health_path.clone(),
            })
        })
        .collect()
}

/// The label value that scopes a worker's containers on its engine.
fn node_of(worker: &Worker) -> String {
    worker
        .instances_join
        .clone()
        .unwrap_or_else(|| worker.name.clone())
}

/// An event when an app becomes short of workers, or stops being.
async fn report_unplaced(
    ctx: &Context,
    state: &State,
    apps: &[AppRecord],
    now: HashMap<u64, u32>,
) -> anyhow::Result<()> {
    let before = std::mem::replace(
        &mut *state.unplaced.lock().expect("unplaced poisoned"),
        now.clone(),
    );
    for app in apps {
        let (was, is) = (before.get(&app.id), now.get(&app.id));
        if was == is {
            continue;
        }
        let message = match is {
            Some(n) => format!(
                "app {} of {}: {n} instance(s) wanted that no worker can take (each replica needs a worker of its own)",
                app.name, app.tenant
            ),
            None => format!("app {} of {}: every instance placed", app.name, app.tenant),
        };
        ctx.store
            .append_event("app.unplaced", None, None, &message)
            .await?;
    }
    Ok(())
}

/// What a worker's pass did.
#[derive(Debug, Default)]
struct NodeOutcome {
    started: usize,
    removed: usize,
    unreadable: usize,
    next_restart: Option<Duration>,
}

async fn node_pass(
    ctx: &Context,
    worker: &Worker,
    instances: Vec<InstanceRecord>,
    apps: &HashMap<u64, &AppRecord>,
) -> Result<NodeOutcome, (String, anyhow::Error)> {
    node_pass_inner(ctx, worker, instances, apps)
        .await
        .map_err(|e| (worker.name.clone(), e))
}

async fn node_pass_inner(
    ctx: &Context,
    worker: &Worker,
    instances: Vec<InstanceRecord>,
    apps: &HashMap<u64, &AppRecord>,
) -> anyhow::Result<NodeOutcome> {
    let mut outcome = NodeOutcome::default();
    let target = worker.target();
    let node = node_of(worker);
    let listed = runtime::run(&ctx.ssh, &target, &runtime::ps_command(&node)).await?;
    let listed = runtime::parse_ps(&listed).context("orion-runtime ps answered no JSON list")?;
    // A container that cannot be read holds back its own instance only (neither started
    // again nor said gone): the rest of the worker is reconciled.
    for u in &listed.unreadable {
        tracing::warn!(worker = %worker.name, container = ?u.name, reason = %u.reason, "apps: a container cannot be read; left as it is");
    }
    outcome.unreadable = listed.unreadable.len();
    let unread: HashSet<&str> = listed
        .unreadable
        .iter()
        .filter_map(|u| u.name.as_deref())
        .collect();
    let observed = listed.containers;
    let now = Utc::now();
    let wanted: Vec<Wanted> = instances
        .iter()
        .filter(|i| !unread.contains(i.container.as_str()))
        .map(|i| Wanted {
            id: i.id,
            container: i.container.clone(),
            state: i.state,
            crashes: i.crashes,
            next_start_at: i.next_start_at,
        })
        .collect();
    let decided = plan::reconcile_node(&wanted, &observed, now);
    let by_id: HashMap<u64, &InstanceRecord> = instances.iter().map(|i| (i.id, i)).collect();

    // Remove first: a worker back from the dead is fenced before it runs anything new.
    let mut unremoved: HashSet<String> = HashSet::new();
    if !decided.remove.is_empty() {
        let names: Vec<String> = decided.remove.iter().map(|(n, _)| n.clone()).collect();
        unremoved = remove_containers(ctx, &target, &node, names).await;
        outcome.removed = decided.remove.len() - unremoved.len();
        metrics::counter!(crate::metrics::names::INSTANCE_ACTIONS, "outcome" => "removed")
            .increment(outcome.removed as u64);
        let ended: Vec<&InstanceRecord> = decided
            .remove
            .iter()
            .filter(|(name, _)| !unremoved.contains(name))
            .filter_map(|(_, id)| id.and_then(|id| by_id.get(&id).copied()))
            .filter(|i| i.state == InstanceState::Stopping)
            .collect();
        ctx.store
            .end_instances(&ended, "instance.removed", "removed from its worker")
            .await?;
        let unknown = decided
            .remove
            .iter()
            .filter(|(n, _)| !unremoved.contains(n))
            .filter(|(n, _)| !instances.iter().any(|i| &i.container == n));
        for (name, _) in unknown {
            ctx.store
                .append_event(
                    "instance.unknown",
                    Some(&worker.name),
                    None,
                    &format!(
                        "container {name} carried Orion's labels but no live instance: removed"
                    ),
                )
                .await?;
        }
    }
    let gone: Vec<&InstanceRecord> = decided
        .gone
        .iter()
        .filter_map(|id| by_id.get(id).copied())
        .collect();
    ctx.store
        .end_instances(&gone, "instance.removed", "its container is gone")
        .await?;

    for record in &decided.record {
        match record {
            Record::Running { id, started_at } => {
                let update = InstanceUpdate::Running {
                    started_at: *started_at,
                };
                ctx.store.update_instance(by_id[id], &update).await?;
            }
            Record::Exited {
                id,
                exit_code,
                crashes,
                next_start_at,
            } => {
                let instance = by_id[id];
                let log_tail = log_tail(ctx, worker, &node, &instance.container).await;
                let update = InstanceUpdate::Exited {
                    exit_code: *exit_code,
                    crashes: *crashes,
                    next_start_at: *next_start_at,
                    log_tail,
                };
                ctx.store.update_instance(instance, &update).await?;
            }
        }
    }

    // A container that is not Orion's to keep (unknown, or of an instance that is over)
    // and could not be removed: nothing new starts beside it (the worker is not fenced).
    let fenced = decided.remove.iter().all(|(name, id)| {
        !unremoved.contains(name)
            || id
                .and_then(|id| by_id.get(&id))
                .is_some_and(|i| i.state == InstanceState::Stopping)
    });
    let starts: &[u64] = if fenced { &decided.start } else { &[] };
    for id in starts {
        let instance = by_id[id];
        let Some(app) = apps.get(&instance.app_id) else {
            continue;
        };
        let spec = run_spec(ctx, worker, &node, app, instance)?;
        let result = ctx
            .executor
            .run_app(Playbook::AppRun, &AppVars::new(&spec), &target)
            .await;
        // Started before: this is a restart (its container exited or vanished).
        let restart = instance.started_at.is_some();
        let counted = match (&result, restart) {
            (Err(_), _) => "failed",
            (Ok(()), true) => "restarted",
            (Ok(()), false) => "created",
        };
        metrics::counter!(crate::metrics::names::INSTANCE_ACTIONS, "outcome" => counted)
            .increment(1);
        let update = match result {
            Ok(()) => {
                outcome.started += 1;
                InstanceUpdate::Started { restart }
            }
            Err(e) => {
                let crashes = instance.crashes + 1;
                let next_start_at = Utc::now()
                    + chrono::Duration::from_std(plan::backoff(crashes.max(2))).unwrap_or_default();
                InstanceUpdate::StartFailed {
                    error: e.to_string(),
                    crashes,
                    next_start_at,
                }
            }
        };
        ctx.store.update_instance(instance, &update).await?;
    }

    // When the next back-off ends, among this worker's exited instances.
    let waiting = decided
        .record
        .iter()
        .filter_map(|r| match r {
            Record::Exited { next_start_at, .. } if *next_start_at > now => Some(*next_start_at),
            _ => None,
        })
        .chain(
            instances
                .iter()
                .filter(|i| i.state == InstanceState::Exited && !decided.start.contains(&i.id))
                .filter_map(|i| i.next_start_at),
        )
        .filter(|t| *t > now)
        .min();
    outcome.next_restart = waiting.map(|t| (t - now).to_std().unwrap_or_default());
    Ok(outcome)
}

/// Removes containers of the worker's node: all at once, and if that fails, one by one,
/// so that one the engine cannot remove holds nothing else back. Returns the names that
/// could not be removed (tried again next pass).
async fn remove_containers(
    ctx: &Context,
    target: &crate::ssh::Target,
    node: &str,
    names: Vec<String>,
) -> HashSet<String> {
    let remove = |names: Vec<String>| {
        let spec = RemoveSpec {
            node: node.to_owned(),
            names,
        };
        async move {
            ctx.executor
                .run_app(Playbook::AppRemove, &AppVars::new(&spec), target)
                .await
        }
    };
    if remove(names.clone()).await.is_ok() {
        return HashSet::new();
    }
    let mut failed = HashSet::new();
    for name in names {
        if let Err(e) = remove(vec![name.clone()]).await {
            tracing::warn!(worker = %target.name, container = %name, error = %e, "apps: cannot remove a container");
            failed.insert(name);
        }
    }
    failed
}

/// The container an instance runs: the app's image, command and environment, Orion's
/// labels and variables, the configured limits and user, and (in the lab) the worker's
/// namespaces.
fn run_spec(
    ctx: &Context,
    worker: &Worker,
    node: &str,
    app: &AppRecord,
    instance: &InstanceRecord,
) -> anyhow::Result<RunSpec> {
    let cfg = &ctx.config.apps;
    let mut env = app.env();
    env.insert("ORION_APP".into(), app.name.clone());
    env.insert("ORION_INSTANCE".into(), instance.id.to_string());
    env.insert("ORION_WORKER".into(), worker.name.clone());
    let labels = [
        (runtime::LABEL_APP, app.name.clone()),
        (runtime::LABEL_TENANT, app.tenant.clone()),
        (runtime::LABEL_INSTANCE, instance.id.to_string()),
        ("orion.generation", instance.generation.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    debug_assert_eq!(
        instance.container,
        container_name(node, &app.name, instance.id)
    );
    Ok(RunSpec {
        node: node.to_owned(),
        name: instance.container.clone(),
        image: app.image.clone(),
        command: app.command(),
        env,
        labels,
        port: app.port,
        join: worker.instances_join.clone(),
        user: {
            // One uid per app, never another app's (`apps.uid_base`).
            let uid = u64::from(cfg.uid_base) + app.id;
            format!("{uid}:{uid}")
        },
        memory: cfg.instance_memory.bytes(),
        pids: cfg.instance_pids,
        cpus_milli: Some(cfg.instance_cpus.milli()),
        log_max_bytes: Some(cfg.instance_log_max.bytes()),
    })
}

/// The last lines an exited instance wrote, for its view; `None` if they cannot be read.
async fn log_tail(ctx: &Context, worker: &Worker, node: &str, container: &str) -> Option<String> {
    let out = runtime::instance_logs(&ctx.ssh, worker, node, container, LOG_TAIL_LINES)
        .await
        .ok()?;
    let tail = out.trim_end();
    (!tail.is_empty()).then(|| tail.to_owned())
}

/// Least time from the end of one pass to a pass that a wake-up asks for (an app
/// changed, a worker's engine reported a start or a death). Every worker's events wake
/// this one loop, whose pass lists every worker: without a rest, one app whose container
/// dies and is restarted over and over, or a burst of deaths across the fleet, would run
/// passes back to back, one SSH command per worker each. One second bounds that to one
/// pass per second plus a pass's own length (about 100 ms for a steady pass, see
/// docs/benchmarks.md), while a container removed by hand still runs again within about
/// a second (the target is 2 s); a wake-up long after the last pass is not held back.
pub const WAKE_REST: Duration = Duration::from_secs(1);

/// Runs the apps loop until `shutdown`.
pub async fn run(ctx: Context, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    let wake = Wake {
        notify: &ctx.wake.apps,
        rest: WAKE_REST,
    };
    run_loop_resting(
        LOOP,
        &ctx.loops,
        &ctx.leader,
        ctx.config.apps.interval,
        wake,
        shutdown,
        || apps_pass(&ctx, &state),
    )
    .await;
}

/// How often the followers look for workers to follow (newly alive ones).
const FOLLOW_RECHECK: Duration = Duration::from_secs(1);

/// Follows every watched worker's container events (`orion-runtime events`) on its
/// watch connection, and wakes the apps loop at each start or death, until `shutdown`.
/// A worker without a watch connection is not followed (the loop's interval is the
/// bound there): a follower must not hold a session of its own per worker.
pub async fn follow_runtimes(ctx: Context, shutdown: CancellationToken) {
    let mut followers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    while !shutdown.is_cancelled() {
        followers.retain(|_, task| !task.is_finished());
        if let Ok(workers) = ctx.store.probe_targets().await {
            for w in workers {
                if !w.answers() || followers.contains_key(&w.name) {
                    continue;
                }
                let task = tokio::spawn(follow_worker(ctx.clone(), w.clone(), shutdown.clone()));
                followers.insert(w.name.clone(), task);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_RECHECK) => {}
            () = shutdown.cancelled() => {}
        }
    }
    for (_, task) in followers {
        task.abort();
    }
}

/// Follows one worker's container events until its connection drops or `shutdown`.
async fn follow_worker(ctx: Context, worker: Worker, shutdown: CancellationToken) {
    let Some(session) = ctx.ssh.existing_session(&worker.target()) else {
        return;
    };
    let node = node_of(&worker);
    let wake = ctx.wake.apps.clone();
    let command = runtime::events_command(&node);
    let follow = session.follow(&command, |line| {
        let Ok(event) = serde_json::from_str::<runtime::RuntimeEvent>(line) else {
            return;
        };
        // `hello`: the stream is up; what happened before it is read by a pass now (a
        // list, then a watch, as Kubernetes' informers do). Not `oom`: a process killed
        // for memory changes nothing a pass sees unless the container dies of it, and
        // then `die` follows; an app whose processes are killed in a loop would
        // otherwise wake the loop at each kill.
        if matches!(event.action.as_str(), "hello" | "die" | "destroy" | "start") {
            tracing::debug!(worker = %worker.name, action = %event.action, container = ?event.name, "runtime event");
            wake.notify_one();
        }
    });
    tokio::select! {
        result = follow => {
            if let Err(e) = result {
                tracing::debug!(worker = %worker.name, error = %e, "runtime events ended");
            }
        }
        () = shutdown.cancelled() => {}
    }
    // A follower that ended at once (no runtime there) is not restarted in a tight loop.
    tokio::time::sleep(FOLLOW_RECHECK).await;
}
