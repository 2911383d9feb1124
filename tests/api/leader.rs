//! Several Orion processes on one database: all serve the API, exactly one leads the
//! loops under a lease with a fencing epoch, and an ex-leader cannot write.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

/// `GET path` of the process at `address`, as the admin.
async fn get(app: &TestApp, address: &str, path: &str) -> Value {
    app.http
        .get(format!("{address}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn one_replica_leads_and_a_killed_leader_is_replaced_within_the_lease() {
    let mut app = spawn_app(2).await;
    let mut replica = app.start_replica().await;
    let first = get(&app, &app.address, "/health").await;
    let second = get(&app, &replica.address, "/health").await;
    assert_eq!(first["leader"], true, "{first}");
    assert_eq!(second["leader"], false, "{second}");
    assert_ne!(first["instance"], second["instance"]);
    // The follower's status says whose loops it shows: its own, which wait.
    let status = get(&app, &replica.address, "/api/status").await;
    assert_eq!(status["leader"], false, "{status}");
    assert_eq!(status["instance"], second["instance"]);

    // Both serve the API from the shared database: a rent through the follower.
    let resp = app
        .http
        .post(format!("{}/api/rent", replica.address))
        .json(&json!({ "username": "fay" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    // The leader dies without handing over; the follower takes over once the lease
    // expires, with the next epoch.
    let old = app.ctx.leader.fence();
    let old_epoch = app.ctx.leader.epoch().expect("it led");
    let killed = Instant::now();
    app.kill().await;
    let lease = app.ctx.config.leader.lease + app.ctx.config.leader.renew_every;
    while !replica.ctx.leader.is_leading() {
        assert!(
            killed.elapsed() < lease + Duration::from_secs(2),
            "no takeover within the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert!(took <= lease + Duration::from_millis(500), "took {took:?}");
    let new_epoch = replica.ctx.leader.epoch().unwrap();
    assert_eq!(new_epoch, old_epoch + 1);
    assert_eq!(get(&app, &replica.address, "/health").await["leader"], true);

    // The ex-leader, were it only paused, writes nothing with its old epoch: its loops'
    // store refuses in the database itself.
    let stale = app.ctx.store.fenced(old);
    let before = app.count("SELECT COUNT(*) FROM events").await;
    let refused = stale
        .append_event(
            "worker.dead",
            Some("worker_1"),
            None,
            "from a paused ex-leader",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, orion::store::StoreError::Fenced { .. }),
        "{refused}"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM events").await, before);
    // While the new leader's loops write.
    let current = replica.ctx.store.fenced(replica.ctx.leader.fence());
    current
        .append_event("test.note", None, None, "the new leader writes")
        .await
        .unwrap();
    let acquired = app
        .count("SELECT COUNT(*) FROM events WHERE kind = 'leader.acquired'")
        .await;
    assert_eq!(acquired, 2, "one per takeover");
    replica.kill().await;
}

#[tokio::test]
async fn a_stopped_leader_hands_over_at_once() {
    let mut app = spawn_app(1).await;
    let replica = app.start_replica().await;
    assert!(app.ctx.leader.is_leading() && !replica.ctx.leader.is_leading());
    let stopped = Instant::now();
    app.stop().await;
    while !replica.ctx.leader.is_leading() {
        assert!(stopped.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Within one renewal, not a whole lease.
    assert!(
        stopped.elapsed() <= app.ctx.config.leader.renew_every + Duration::from_millis(500),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'leader.lost'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_follower_runs_no_loop_until_it_leads() {
    let app = spawn_app(1).await;
    let replica = app.start_replica().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let passes: u64 = replica
        .ctx
        .loops
        .snapshot()
        .values()
        .map(|s| s.passes)
        .sum();
    assert_eq!(passes, 0, "a follower's loops wait");
    assert!(app.ctx.loops.snapshot()["health"].passes > 0);
}
