//! The drills of the `--ha` platform (`scripts/platform.sh up --ha`): three MariaDB Galera
//! nodes behind HAProxy, two orion replicas, Caddy over them. One platform serves every
//! drill, one after the other, each leaving it whole for the next:
//!
//! 1. 200 concurrent rents spread over the replicas: exactly one per free worker;
//! 2. `docker kill` of the leading replica: another leads within the lease, rents through
//!    Caddy go on, and a rent retried with its `Idempotency-Key` is never made twice;
//! 3. the leading replica and a rented worker killed together: the rental is active
//!    elsewhere;
//! 4. `docker pause` of the leader for longer than the lease: it has lost the lease, and
//!    the database refuses its old epoch; two nodes writing the lease row at once: one
//!    is refused at certification;
//! 5. `docker kill` of the Galera node taking the writes: rents resume, no committed
//!    rental is lost, and the node rejoins by itself once started again.
//!
//! Times are printed (`--nocapture` shows them) and bounded loosely here: the figures
//! to compare are the benchmark's (`scripts/bench.sh ha`, docs/benchmarks.md).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use orion::ssh::Auth;
use orion::testkit::platform::{Platform, galera_sql as sql, replica_health as health};
use orion::testkit::{docker, docker_at_once, tenant_key, tenant_ssh_client, whoami};
use serde_json::{Value, json};

use crate::wait_for;

const PROJECT: &str = "orion-ha-e2e";
const WORKERS: usize = 4;
/// The platform's lease (`leader.lease`, default 3 s).
const LEASE: Duration = Duration::from_secs(3);

/// How many nodes the Galera node `node` sees in its cluster.
fn cluster_size(node: &str) -> String {
    sql(
        node,
        "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
         WHERE VARIABLE_NAME = 'wsrep_cluster_size'",
    )
}

/// One rent through Caddy with an `Idempotency-Key`, retried with the same key until it
/// is made: (rental id, attempts that failed, when the attempt that made it began).
async fn rent_with_key(http: &reqwest::Client, base: &str, key: &str) -> (String, u32, Instant) {
    // A first try cut by its replica's death, before its rental was recorded, holds
    // the key until the rent's own deadline has passed (75 s by default).
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut failed = 0;
    loop {
        let tried = Instant::now();
        let resp = http
            .post(format!("{base}/api/rent"))
            .header("Idempotency-Key", key)
            .timeout(Duration::from_secs(20))
            .json(&json!({}))
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == 201 => {
                let body: Value = r.json().await.unwrap();
                return (body["id"].as_str().unwrap().to_owned(), failed, tried);
            }
            // 409: the first try is still being made (by a replica that may have died:
            // the key is taken over once it is stale); 503: no replica or database now.
            Ok(r) => assert!(
                matches!(r.status().as_u16(), 409 | 502 | 503),
                "rent with key {key}: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(_) => {}
        }
        failed += 1;
        assert!(Instant::now() < deadline, "rent with key {key} never made");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn release(http: &reqwest::Client, base: &str, id: &str) {
    wait_for(
        &format!("release of {id}"),
        Duration::from_secs(60),
        || async {
            http.delete(format!("{base}/api/rentals/{id}"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
}

/// What a rent-and-release loop saw: per rent, when it was asked and when it was made.
struct Traffic {
    rents: Vec<Rent>,
}

struct Rent {
    key: String,
    id: String,
    /// When the attempt that made it began (the last, if some failed).
    tried: Instant,
    made: Instant,
    failed: u32,
}

/// Rents and releases through Caddy, one after the other with a fresh key each, until
/// `stop` is set.
async fn traffic(http: reqwest::Client, base: String, stop: Arc<AtomicBool>) -> Traffic {
    let mut rents = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let key = format!("drill-{}", uuid::Uuid::new_v4());
        let (id, failed, tried) = rent_with_key(&http, &base, &key).await;
        rents.push(Rent {
            key,
            id: id.clone(),
            tried,
            made: Instant::now(),
            failed,
        });
        release(&http, &base, &id).await;
    }
    Traffic { rents }
}

impl Traffic {
    /// Every key made exactly one rental, and the database holds exactly those; a rent
    /// cut short by its replica's death left at most a failed rental, never active.
    fn assert_once_each(&self, node: &str, since: &str) {
        let ids: HashSet<&str> = self.rents.iter().map(|r| r.id.as_str()).collect();
        let keys: HashSet<&str> = self.rents.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(ids.len(), self.rents.len(), "a rental answered two keys");
        assert_eq!(keys.len(), self.rents.len());
        let made: HashSet<String> = sql(
            node,
            &format!("SELECT id FROM rentals WHERE created_at >= '{since}' AND status <> 'failed'"),
        )
        .lines()
        .map(str::to_owned)
        .collect();
        let answered: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            made, answered,
            "the database holds exactly the rentals the keys were answered with"
        );
        let cut_short_but_live = sql(
            node,
            &format!(
                "SELECT COUNT(*) FROM events e JOIN rentals r ON r.id = e.rental_id \
                 WHERE r.created_at >= '{since}' AND r.status = 'failed' \
                 AND e.kind = 'rental.provisioned'"
            ),
        );
        assert_eq!(
            cut_short_but_live, "0",
            "a rent cut short never became active"
        );
    }

    fn failed(&self) -> u32 {
        self.rents.iter().map(|r| r.failed).sum()
    }

    /// From `fault` to the first rent made by an attempt begun after it.
    fn resumed_after(&self, fault: Instant) -> Option<Duration> {
        self.rents
            .iter()
            .filter(|r| r.tried > fault)
            .map(|r| r.made.duration_since(fault))
            .min()
    }
}

fn db_now(node: &str) -> String {
    sql(node, "SELECT UTC_TIMESTAMP(6)")
}

#[tokio::test]
async fn ha_drills_on_galera_with_two_replicas() {
    let platform = Platform::new(
        PROJECT,
        WORKERS as u16,
        Path::new(env!("CARGO_BIN_EXE_orion")),
    );
    platform.script(&["down", "--volumes"]);
    assert!(
        platform.script_with(
            &["up", "--ha", &WORKERS.to_string()],
            &[("ORION_REPLICAS", "2")]
        ),
        "scripts/platform.sh up --ha failed"
    );
    let http = platform.client();
    let base = platform.base();
    assert_eq!(platform.containers("orion").len(), 2, "two orion replicas");
    let galera: Vec<String> = (1..=3)
        .map(|i| platform.container(&format!("galera-{i}")))
        .collect();
    for node in &galera {
        assert_eq!(cluster_size(node), "3");
    }
    platform.leader(Duration::from_secs(60)).await;
    platform
        .free_workers(&http, WORKERS, Duration::from_secs(120))
        .await;

    // 1. 200 concurrent rents over the replicas: exactly one per free worker.
    let started = Instant::now();
    let answers = futures::future::join_all((0..200).map(|_| {
        let http = http.clone();
        let url = format!("{base}/api/rent");
        async move {
            let t = Instant::now();
            let r = http.post(url).json(&json!({})).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap(), t.elapsed())
        }
    }))
    .await;
    let wall = started.elapsed();
    let made: Vec<&Value> = answers
        .iter()
        .filter(|(s, _, _)| *s == 201)
        .map(|(_, b, _)| b)
        .collect();
    let distinct: HashSet<&str> = made.iter().map(|b| b["worker"].as_str().unwrap()).collect();
    assert_eq!(made.len(), WORKERS, "exactly one rent per free worker");
    assert_eq!(distinct.len(), WORKERS, "on distinct workers");
    for (status, body, _) in &answers {
        if *status != 201 {
            assert_eq!(*status, 503, "{body}");
            assert_eq!(body["error"]["code"], "no_free_worker", "{body}");
        }
    }
    let mut latencies: Vec<Duration> = answers.iter().map(|(_, _, t)| *t).collect();
    latencies.sort();
    println!(
        "drill 1: 200 concurrent rents in {wall:?}: {} made, p50 {:?}, p99 {:?}",
        made.len(),
        latencies[99],
        latencies[197]
    );
    for body in &made {
        release(&http, &base, body["id"].as_str().unwrap()).await;
    }
    platform
        .free_workers(&http, WORKERS, Duration::from_secs(120))
        .await;

    // 2. Kill the leading replica while rents go on through Caddy.
    let (old_leader, old_epoch) = platform.leader(Duration::from_secs(10)).await;
    let since = db_now(&galera[1]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(traffic(http.clone(), base.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    docker(&["kill", &old_leader]);
    let (new_leader, new_epoch) = platform.leader(Duration::from_secs(30)).await;
    let takeover = killed.elapsed();
    assert_ne!(new_leader, old_leader);
    assert!(new_epoch > old_epoch);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = load.await.unwrap();
    seen.assert_once_each(&galera[1], &since);
    println!(
        "drill 2: leader killed, another leads after {takeover:?} (epoch {old_epoch} -> {new_epoch}); \
         {} rents made during it, {} attempts failed and were retried with their key",
        seen.rents.len(),
        seen.failed()
    );
    let resumed = seen
        .resumed_after(killed)
        .expect("rents succeed after the kill");
    println!("drill 2: the first rent asked after the kill was made {resumed:?} after it");
    docker(&["start", &old_leader]);
    platform
        .replica_answers(&old_leader, Duration::from_secs(60))
        .await;

    // 3. The leader and a rented worker die at the same moment.
    let (key, public) = tenant_key();
    let resp = http
        .post(format!("{base}/api/rent"))
        .json(&json!({"username": "carol", "ssh_public_key": public}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let carol: Value = resp.json().await.unwrap();
    let carol_id = carol["id"].as_str().unwrap().to_owned();
    let carol_worker = carol["worker"].as_str().unwrap().to_owned();
    let (leading, _) = platform.leader(Duration::from_secs(10)).await;
    let worker_container = platform.worker(&carol_worker);
    let killed = Instant::now();
    docker_at_once(&[&["kill", &leading], &["kill", &worker_container]]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let moved = loop {
        if let Ok(r) = http
            .get(format!("{base}/api/rentals/{carol_id}"))
            .send()
            .await
            && let Ok(v) = r.json::<Value>().await
            && v["status"] == "active"
            && v["worker"] != carol_worker.as_str()
        {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the rental did not move within 60 s of its worker and the leader dying"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("drill 3: leader and worker killed together, rental active elsewhere after {moved:?}");
    // The tenant's endpoint, through HAProxy to a replica's gateway, leads to the new
    // worker.
    let endpoint = carol["endpoint"]["port"].as_u64().unwrap() as u16;
    assert!(platform.gateway.contains(&endpoint), "{carol}");
    let login = whoami(
        &tenant_ssh_client(),
        "localhost",
        endpoint,
        "carol",
        Auth::Key(key),
    )
    .await;
    assert_eq!(login.as_deref(), Ok("carol"));
    docker(&["start", &leading]);
    docker(&["start", &worker_container]);
    platform
        .replica_answers(&leading, Duration::from_secs(60))
        .await;

    // 4. The leader paused for longer than the lease.
    let (paused, paused_epoch) = platform.leader(Duration::from_secs(10)).await;
    let paused_holder = sql(&galera[1], "SELECT holder FROM leases WHERE name = 'loops'");
    docker(&["pause", &paused]);
    let frozen = Instant::now();
    let (other, other_epoch) = platform.leader(Duration::from_secs(30)).await;
    let taken_over = frozen.elapsed();
    assert_ne!(other, paused);
    assert_eq!(other_epoch, paused_epoch + 1);
    tokio::time::sleep((LEASE * 2).saturating_sub(frozen.elapsed())).await;
    docker(&["unpause", &paused]);
    wait_for(
        "the unpaused ex-leader to say it does not lead",
        Duration::from_secs(10),
        || async { health(&paused).is_some_and(|h| h["leader"] == false && h["epoch"].is_null()) },
    )
    .await;
    tokio::time::sleep(LEASE).await;
    // The database: the lease is the other's, with the next epoch; the ex-leader's
    // fence (its holder and old epoch, the predicate every write of its loops
    // carries) matches nothing.
    let lease = sql(
        &galera[1],
        "SELECT holder, epoch FROM leases WHERE name = 'loops'",
    );
    let (holder, epoch) = lease.split_once('\t').unwrap();
    assert_ne!(holder, paused_holder);
    assert_eq!(epoch, (paused_epoch + 1).to_string());
    let fenced = sql(
        &galera[1],
        &format!(
            "UPDATE leases SET fenced_writes = fenced_writes + 1 \
             WHERE name = 'loops' AND holder = '{paused_holder}' AND epoch = {paused_epoch} \
             AND expires_at > UTC_TIMESTAMP(6); SELECT ROW_COUNT()"
        ),
    );
    assert_eq!(fenced, "0", "a write with the old epoch is refused");
    // Two nodes writing the lease row at once (a takeover through one node, a stale
    // write through another, as around a writer switch): Galera lets one commit and
    // refuses the other at certification, as a deadlock (1213), which Orion's store
    // runs again, and the fence it then re-reads no longer matches.
    let stale = Command::new("docker")
        .args([
            "exec",
            &galera[1],
            "mariadb",
            "-uroot",
            "orion",
            "-e",
            "BEGIN; UPDATE leases SET fenced_writes = fenced_writes + 1 WHERE name = 'loops'; \
             DO SLEEP(2); COMMIT;",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    sql(
        &galera[2],
        "UPDATE leases SET fenced_writes = fenced_writes + 1 WHERE name = 'loops'",
    );
    let refused = stale.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("1213"),
        "the stale node's commit is refused at certification: {said}"
    );
    // The events: the other took the lease with the next epoch while the leader was
    // frozen; the ex-leader then said it no longer leads, and never took it back.
    let events = sql(
        &galera[1],
        "SELECT kind, message FROM events WHERE kind LIKE 'leader.%' ORDER BY id",
    );
    let after: Vec<&str> = events
        .lines()
        .skip_while(|l| !l.contains(&format!("(epoch {other_epoch})")))
        .collect();
    assert!(
        after
            .first()
            .is_some_and(|l| l.starts_with("leader.acquired")),
        "{events}"
    );
    assert!(
        after.iter().any(|l| l.starts_with("leader.lost")
            && l.contains(&paused_holder)
            && l.contains(&format!("(epoch {paused_epoch})"))),
        "the ex-leader says it lost the lease: {events}"
    );
    assert!(
        !after
            .iter()
            .any(|l| l.starts_with("leader.acquired") && l.contains(&paused_holder)),
        "{events}"
    );
    println!(
        "drill 4: leader paused; another leads after {taken_over:?}; its old epoch is refused"
    );

    // 5. Kill the Galera node that takes the writes, under rents.
    let survivor_probe = galera[0].clone();
    let written = platform.galera_writer(&survivor_probe);
    let survivor = galera.iter().find(|n| **n != written).unwrap().clone();
    let rentals_before: Vec<String> = sql(&survivor, "SELECT id FROM rentals")
        .lines()
        .map(str::to_owned)
        .collect();
    let since = db_now(&survivor);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(traffic(http.clone(), base.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    docker(&["kill", &written]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = load.await.unwrap();
    seen.assert_once_each(&survivor, &since);
    // No committed rental is lost: every one made before, and every one answered 201.
    let after: HashSet<String> = sql(&survivor, "SELECT id FROM rentals")
        .lines()
        .map(str::to_owned)
        .collect();
    for id in rentals_before
        .iter()
        .chain(seen.rents.iter().map(|r| &r.id))
    {
        assert!(after.contains(id), "rental {id} was committed and is gone");
    }
    let resumed = seen
        .resumed_after(killed)
        .expect("rents succeed after the writer's death");
    println!(
        "drill 5: Galera writer killed; the first rent asked after it was made {resumed:?} after it; \
         {} rents, {} failed attempts retried with their key",
        seen.rents.len(),
        seen.failed()
    );
    // Back: it rejoins by itself (IST, or SST if it missed too much) and has everything.
    docker(&["start", &written]);
    platform.healthy(&written, Duration::from_secs(180)).await;
    assert_eq!(cluster_size(&written), "3");
    let counts: HashMap<&String, String> = galera
        .iter()
        .map(|n| (n, sql(n, "SELECT COUNT(*) FROM rentals")))
        .collect();
    assert_eq!(
        counts.values().collect::<HashSet<_>>().len(),
        1,
        "every node holds the same rentals: {counts:?}"
    );
}
