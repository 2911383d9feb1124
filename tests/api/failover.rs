//! Failover drills against real worker containers: a rented worker dies, the rental
//! comes back elsewhere with the same credentials.

use std::time::{Duration, Instant};

use orion::ssh::Auth;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_app_with, tenant_key};

/// A tiny HTTP server that records the JSON bodies POSTed to it.
async fn notification_sink() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                tx.send(body).ok();
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

#[tokio::test]
async fn the_stop_the_worker_drill_moves_the_rental_with_the_same_key_and_fences_the_old_worker() {
    // Default detection settings: this is the drill users run.
    let app = spawn_app_with(
        2,
        Box::new(|c| {
            c.health.dead_after = 3;
            c.health.retry_delay = Duration::from_millis(300);
        }),
    )
    .await;
    let (key, public) = tenant_key();
    let (hook, mut notifications) = notification_sink().await;
    let body: Value = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "ivan", "notify_url": hook }))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let first = body["worker"].as_str().unwrap().to_owned();

    let stopped = Instant::now();
    app.worker(&first).stop();
    let moved = app
        .wait_rental(&id, Duration::from_secs(30), |r| {
            r["status"] == "active" && r["worker"] != first.as_str()
        })
        .await;
    let port = moved["port"].as_u64().unwrap() as u16;
    let whoami = loop {
        match app
            .tenant_whoami("127.0.0.1", port, "ivan", Auth::Key(key.clone()))
            .await
        {
            Ok(who) => break who,
            Err(e) => assert!(stopped.elapsed() < Duration::from_secs(30), "{e}"),
        }
    };
    println!(
        "stop-to-working-login: {} ms",
        stopped.elapsed().as_millis()
    );
    assert_eq!(whoami, "ivan");

    let placements = moved["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 2, "{moved}");
    assert_eq!(placements[0]["worker"], first.as_str());
    assert_eq!(placements[0]["state"], "stale");
    assert_eq!(placements[1]["state"], "active");

    let note = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap();
    assert_eq!(note["event"], "rental.migrated");
    assert_eq!(note["rental"]["worker"], moved["worker"]);
    assert_eq!(note["rental"]["port"], moved["port"]);

    // The old worker comes back: the tenant's account is removed before it is free.
    let old = app.worker(&first);
    old.start();
    assert!(
        old.has_user("ivan"),
        "the account is still there before fencing"
    );
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();
    assert!(!old.has_user("ivan"), "fencing removed the moved tenant");
    let w = app.worker_row(&first).await;
    assert!(!w.allocated(), "the old worker is free again");
    let (_, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert_eq!(rental["placements"][0]["state"], "released");
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM placements WHERE rental_id = '{id}' AND state = 'active'"
        ))
        .await,
        1,
        "never active on two workers"
    );
    let again: Value = app.rent_ok(json!({})).await;
    assert_eq!(again["worker"], first.as_str());
}

#[tokio::test]
async fn a_briefly_paused_worker_moves_nothing() {
    let app = spawn_app(2).await;
    let body: Value = app.rent_ok(json!({ "username": "judy" })).await;
    let id = body["id"].as_str().unwrap().to_owned();
    let worker = body["worker"].as_str().unwrap().to_owned();
    let container = app.worker(&worker).container.clone();

    crate::helpers::docker(&["pause", &container]);
    let round = {
        let (ctx, probes) = (app.ctx.clone(), app.loops.probes.clone());
        tokio::spawn(async move { orion::loops::health::probe_round(&ctx, &probes).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    crate::helpers::docker(&["unpause", &container]);
    round.await.unwrap().unwrap();
    orion::loops::migration::migration_pass(&app.ctx, &app.loops.migration)
        .await
        .unwrap();

    let (_, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert_eq!(rental["status"], "active");
    assert_eq!(rental["worker"], worker.as_str());
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind LIKE 'rental.migrat%'")
            .await,
        0
    );
    let w = app.worker_row(&worker).await;
    assert_eq!(w.status, orion::model::WorkerStatus::Alive);
}

#[tokio::test]
async fn with_no_free_worker_the_rental_waits_then_moves_when_one_frees() {
    let app = spawn_app(2).await;
    let a: Value = app.rent_ok(json!({ "username": "kate" })).await;
    let b: Value = app.rent_ok(json!({ "username": "leo" })).await;
    let a_id = a["id"].as_str().unwrap().to_owned();
    let password = a["password"].as_str().unwrap().to_owned();
    app.worker(a["worker"].as_str().unwrap()).stop();

    app.wait_rental(&a_id, Duration::from_secs(30), |r| r["status"] == "waiting")
        .await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'rental.waiting'")
            .await,
        1
    );

    let resp = app
        .http
        .delete(app.url(&format!("/api/rentals/{}", b["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    orion::loops::migration::migration_pass(&app.ctx, &app.loops.migration)
        .await
        .unwrap();
    let moved = app
        .wait_rental(&a_id, Duration::from_secs(10), |r| r["status"] == "active")
        .await;
    assert_eq!(moved["worker"], b["worker"]);
    let port = moved["port"].as_u64().unwrap() as u16;
    let who = app
        .tenant_whoami("127.0.0.1", port, "kate", Auth::Password(password))
        .await
        .expect("the same password works on the new worker");
    assert_eq!(who, "kate");
}

/// Rents for `username`; returns the rental id, its worker, and another worker.
async fn rent_with_a_bystander(app: &TestApp, username: &str) -> (String, String, String) {
    let body: Value = app.rent_ok(json!({ "username": username })).await;
    let id = body["id"].as_str().unwrap().to_owned();
    let rented = body["worker"].as_str().unwrap().to_owned();
    let other = app.workers.iter().find(|w| w.name != rented).unwrap();
    (id, rented, other.name.clone())
}

/// A migration pass holds, and the rental stays active where it was.
async fn assert_pass_holds_in_place(app: &TestApp, id: &str, rented: &str) {
    let summary = orion::loops::migration::migration_pass(&app.ctx, &app.loops.migration)
        .await
        .unwrap();
    assert!(summary.held, "{summary:?}");
    let (_, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert_eq!(rental["status"], "active");
    assert_eq!(rental["worker"], rented);
}

#[tokio::test]
async fn most_workers_dead_at_once_holds_migrations_until_it_clears() {
    let app = spawn_app_with(3, Box::new(|c| c.health.watch = false)).await;
    let (id, rented, other) = rent_with_a_bystander(&app, "mona").await;
    app.worker(&rented).stop();
    app.worker(&other).stop();
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    assert_pass_holds_in_place(&app, &id, &rented).await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'migration.held'")
            .await,
        1
    );

    app.worker(&other).start();
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    // This pass, or the loop woken by the deaths above, moves the rental now.
    let summary = orion::loops::migration::migration_pass(&app.ctx, &app.loops.migration)
        .await
        .unwrap();
    assert!(!summary.held, "{summary:?}");
    let moved = app
        .wait_rental(&id, Duration::from_secs(10), |r| {
            r["status"] == "active" && r["worker"] != rented.as_str()
        })
        .await;
    assert_eq!(moved["placements"].as_array().unwrap().len(), 2, "{moved}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'migration.resumed'")
            .await,
        1
    );
}

/// A cut between Orion and most of the fleet is declared worker by worker (each watch
/// session times out on its own keepalive). When the first worker is declared dead the
/// others still look alive in the database; the pass probes them before moving
/// anything, finds them silent too, and holds.
#[tokio::test]
async fn a_fault_declared_one_worker_at_a_time_still_holds_migrations() {
    let app = spawn_app(3).await;
    let (id, rented, other) = rent_with_a_bystander(&app, "nina").await;
    let other = app.worker(&other).container.clone();
    let pause = |container: &str, how: &str| {
        crate::helpers::docker(&[how, container]);
    };
    pause(&app.worker(&rented).container, "pause");
    pause(&other, "pause");
    // Only the rented worker's death is declared; the other paused one is still alive
    // with no failure on record.
    let worker = app.worker_row(&rented).await;
    let status = orion::probe::probe_worker(&app.ctx, &app.loops.probes, worker)
        .await
        .unwrap();
    assert_eq!(status, orion::model::WorkerStatus::Dead);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM workers WHERE status = 'dead'")
            .await,
        1
    );
    assert_pass_holds_in_place(&app, &id, &rented).await;

    // The other worker answers again: a following pass moves the rental (the first one
    // may still find the connection that was frozen mid-request unusable).
    pause(&other, "unpause");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let summary = orion::loops::migration::migration_pass(&app.ctx, &app.loops.migration)
            .await
            .unwrap();
        if !summary.held {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "migrations still held 20 s after the fleet answers again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.wait_rental(&id, Duration::from_secs(20), |r| {
        r["status"] == "active" && r["worker"] != rented.as_str()
    })
    .await;
    pause(&app.worker(&rented).container, "unpause");
}

#[tokio::test]
async fn a_drained_worker_hands_its_tenant_over_and_gets_no_new_rentals() {
    let app = spawn_app(2).await;
    let (key, public) = tenant_key();
    let body: Value = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "uma" }))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let first = body["worker"].as_str().unwrap().to_owned();

    let resp = app.drain(&first).await;
    assert_eq!(resp.status(), 200);
    let worker: Value = resp.json().await.unwrap();
    assert_eq!(worker["drained"], true);
    let moved = app.wait_moved_off(&id, &first).await;
    let port = moved["port"].as_u64().unwrap() as u16;
    let who = app
        .tenant_whoami("127.0.0.1", port, "uma", Auth::Key(key))
        .await;
    assert_eq!(who.as_deref(), Ok("uma"));

    // Cleaned, but drained: no new rental lands there.
    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();
    assert!(!app.worker(&first).has_user("uma"));
    assert_eq!(app.rent(json!({})).await.status(), 503);
    let resp = app
        .http
        .post(app.url(&format!("/api/workers/{first}/undrain")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let again: Value = app.rent_ok(json!({})).await;
    assert_eq!(again["worker"], first.as_str());

    let resp = app.drain("no-such-worker").await;
    assert_eq!(resp.status(), 404);
}
