//! Hostile tenants against the snapshots of their homes, on real workers: one tenant's
//! snapshot never holds another's, a stalled one ends at its deadline, and a home over
//! the cap costs no transfer.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TestApp, Worker, spawn_app_with, tenant_key};
use crate::isolation::as_tenant;

/// Stops every `tar` of the tenant's uid as soon as it appears: the tar that reads its
/// home for a snapshot runs as the tenant, so the tenant may signal it. The home changes,
/// to have a snapshot taken, and holds 32 MiB, for a tar that lasts long enough to be seen.
const STALL_MY_SNAPSHOTS: &str = "setsid nohup sh -c \
    'while :; do pkill -STOP -x -u \"$(id -u)\" tar; sleep 0.01; done' \
    >/dev/null 2>&1 </dev/null & head -c 32M /dev/urandom > stalled.bin; echo started";

/// The pids and states of the tars of `uid` on the worker, one `pid state` per line.
fn tars_of(worker: &Worker, uid: &str) -> Vec<(String, String)> {
    worker
        .exec(&format!(
            "ps -C tar -o pid=,uid=,stat= | awk '$2 == {uid} {{ print $1, $3 }}'"
        ))
        .lines()
        .filter_map(|l| {
            let (pid, state) = l.trim().split_once(' ')?;
            Some((pid.to_owned(), state.to_owned()))
        })
        .collect()
}

async fn rental(app: &TestApp, id: &str) -> Value {
    app.get_json(&format!("/api/rentals/{id}")).await.1
}

/// Waits for `what` to be true, failing with `failure` after `timeout`.
async fn wait_for<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    failure: &str,
    mut what: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    while !what().await {
        assert!(started.elapsed() < timeout, "{failure} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn a_tenant_stalling_its_own_snapshot_holds_no_other_rentals_snapshot_and_is_ended_at_its_deadline()
 {
    let deadline = Duration::from_secs(15);
    let app = spawn_app_with(
        2,
        Box::new(move |c| {
            c.snapshots.interval = Duration::from_secs(1);
            c.snapshots.deadline = deadline;
            // A command's idle bound past the deadline: it stands for a crawl (a tar
            // resumed now and then keeps bytes moving), which no idle bound catches.
            c.ssh.command_timeout = Duration::from_secs(120);
        }),
    )
    .await;
    let (stall_key, stall_public) = tenant_key();
    let stalled = app
        .rent_ok(json!({ "ssh_public_key": stall_public, "username": "staller" }))
        .await;
    let (key, public) = tenant_key();
    let other = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "victim" }))
        .await;
    let (stalled_id, other_id) = (
        stalled["id"].as_str().unwrap().to_owned(),
        other["id"].as_str().unwrap().to_owned(),
    );
    let stalled_worker = app.worker(stalled["worker"].as_str().unwrap());
    let uid = stalled_worker.exec("id -u staller");
    wait_for(
        Duration::from_secs(20),
        "no first snapshot of the other",
        || {
            let (app, id) = (&app, &other_id);
            async move { rental(app, id).await["last_snapshot_at"].is_string() }
        },
    )
    .await;

    // The staller stops the tar of its next snapshot, and changes its home to have one.
    let port = stalled["port"].as_u64().unwrap() as u16;
    assert_eq!(
        as_tenant(&app, port, "staller", &stall_key, STALL_MY_SNAPSHOTS).await,
        "started"
    );
    let mut stopped = None;
    wait_for(Duration::from_secs(20), "no stalled tar", || {
        let found = tars_of(stalled_worker, &uid)
            .into_iter()
            .find(|(_, state)| state.starts_with('T'));
        let seen = found.is_some();
        if seen {
            stopped = found.map(|(pid, _)| pid);
        }
        async move { seen }
    })
    .await;
    let stopped = stopped.unwrap();

    // Meanwhile the other tenant's home changes: its snapshot is taken all the same, in a
    // pass or two, not after the stalled one's deadline.
    let before = rental(&app, &other_id).await["last_snapshot_at"].clone();
    let port = other["port"].as_u64().unwrap() as u16;
    as_tenant(&app, port, "victim", &key, "echo fresh > fresh.txt").await;
    let took = wait_for(
        Duration::from_secs(8),
        "the other rental's snapshot was held by the stalled one: not taken",
        || {
            let (app, id, before) = (&app, &other_id, &before);
            async move { rental(app, id).await["last_snapshot_at"] != *before }
        },
    )
    .await;
    assert!(
        stalled_worker
            .exec(&format!(
                "cat /proc/{stopped}/stat 2>/dev/null | cut -d' ' -f3"
            ))
            .starts_with('T'),
        "the stalled tar {stopped} was still stopped when the other snapshot was taken"
    );

    // The stalled job ends at its deadline, saying so; never two at once for one home.
    let event = format!(
        "SELECT COUNT(*) FROM events WHERE kind = 'snapshot.deadline' AND rental_id = '{stalled_id}'"
    );
    wait_for(
        deadline + Duration::from_secs(15),
        "no snapshot.deadline event",
        || {
            let tars = tars_of(stalled_worker, &uid).len();
            assert!(tars <= 1, "{tars} snapshots of one home at once");
            let (app, event) = (&app, &event);
            async move { app.count(event).await > 0 }
        },
    )
    .await;
    // And on the worker too: the tar the tenant stopped is killed (it runs under root's
    // `timeout`, which the tenant cannot stop), so nothing of the job lingers.
    wait_for(
        Duration::from_secs(20),
        "the stalled tar still lives",
        || {
            let gone = stalled_worker.exec(&format!(
                "test -e /proc/{stopped} && echo alive || echo gone"
            )) == "gone";
            async move { gone }
        },
    )
    .await;
    eprintln!("the other rental's snapshot came {took:?} after its change");
}

/// Bytes the worker has sent on its network since it started.
fn sent_by(worker: &Worker) -> u64 {
    worker
        .exec("cat /sys/class/net/eth0/statistics/tx_bytes")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_home_over_the_cap_is_refused_before_any_byte_of_it_is_streamed_pass_after_pass() {
    let app = spawn_app_with(
        1,
        Box::new(|c| c.snapshots.max_bytes = orion::config::ByteSize::mib(1)),
    )
    .await;
    let worker = app.worker("worker_1");
    let (key, public) = tenant_key();
    let body = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "hoarder" }))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let port = body["port"].as_u64().unwrap() as u16;
    // 4 MiB that gzip cannot shrink: four times the cap.
    let fill = "head -c 4M /dev/urandom > big && echo filled";
    assert_eq!(as_tenant(&app, port, "hoarder", &key, fill).await, "filled");

    // The home changes at every pass and stays over the cap: refused each time, measured
    // on the worker, with no more than the command and its answer on the wire.
    for change in ["true", "echo more >> big", "head -c 1M /dev/urandom > big2"] {
        as_tenant(&app, port, "hoarder", &key, change).await;
        let sent = sent_by(worker);
        let summary = orion::loops::snapshots::snapshot_pass(&app.ctx, &app.loops.snapshots)
            .await
            .unwrap();
        let streamed = sent_by(worker) - sent;
        assert_eq!(summary.too_big, 1, "`{change}`: {summary:?}");
        assert_eq!(summary.too_big_streamed, 0, "`{change}`: {summary:?}");
        assert!(
            streamed < 256 << 10,
            "`{change}`: the worker sent {streamed} bytes for a home it refused"
        );
    }
    // Unchanged since: not even measured again.
    let summary = orion::loops::snapshots::snapshot_pass(&app.ctx, &app.loops.snapshots)
        .await
        .unwrap();
    assert_eq!((summary.unchanged, summary.too_big), (1, 0), "{summary:?}");
    // One event, when it went over, saying nothing was sent.
    let messages: Vec<String> = sqlx::query_scalar(
        "SELECT message FROM events WHERE kind = 'snapshot.too_big' AND rental_id = ?",
    )
    .bind(&id)
    .fetch_all(app.ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(
        messages[0].contains("measured before streaming, nothing was sent"),
        "{messages:?}"
    );
}
