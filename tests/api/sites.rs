//! Sites, placement and the live inventory (#17), against real sshd workers: a rent
//! placed by site and labels, a whole site lost while another answers (its rentals move,
//! its return is fenced), every site cut at once (nothing moves), and workers added,
//! changed and retired while Orion runs.

use std::sync::Arc;
use std::time::Duration;

use orion::ssh::Auth;
use serde_json::{Value, json};

use crate::helpers::{
    OrionKey, TestApp, Tweak, Worker, docker_at_once, inventory_entry, inventory_on_sites,
    spawn_app_on,
};

/// `per_site` workers on each of sites `a` and `b`, named `a1`, `a2`, `b1`…
async fn two_sites(per_site: usize, tweak: Tweak) -> TestApp {
    let key = OrionKey::generate();
    let mut workers = Vec::new();
    let mut sites = Vec::new();
    for site in ["a", "b"] {
        for i in 1..=per_site {
            workers.push(Worker::start_new(&format!("{site}{i}"), &key.public));
            sites.push(site);
        }
    }
    let inventory = inventory_on_sites(&workers, &sites);
    spawn_app_on(Arc::new(key), &inventory, workers, tweak).await
}

/// The error body's `field` and `message`.
async fn error_of(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["error"]["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

async fn events_of(app: &TestApp, kind: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT message FROM events WHERE kind = ? ORDER BY id")
        .bind(kind)
        .fetch_all(app.ctx.store.pool())
        .await
        .unwrap()
}

async fn probe_round(app: &TestApp) {
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
}

async fn migration_pass(app: &TestApp) -> orion::loops::migration::PassSummary {
    orion::loops::migration::migration_pass(&app.ctx, &app.loops.migration)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_rent_lands_where_its_site_and_labels_say_or_says_why_not() {
    let app = two_sites(2, Box::new(|_| {})).await;
    // Labels are changed live, through the API.
    let resp = app
        .http
        .patch(app.url("/api/workers/b1"))
        .json(&json!({ "labels": { "disk": "ssd" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let view: Value = resp.json().await.unwrap();
    assert_eq!(view["labels"], json!({ "disk": "ssd" }));

    let ssd = app.rent_ok(json!({ "labels": { "disk": "ssd" } })).await;
    assert_eq!(ssd["worker"], "b1");
    let on_b = app.rent_ok(json!({ "site": "b" })).await;
    assert_eq!(
        (on_b["worker"].as_str(), on_b["site"].as_str()),
        (Some("b2"), Some("b"))
    );

    // Site b is full: 503, naming the constraint; site a still has room.
    let (status, field, message) = error_of(app.rent(json!({ "site": "b" })).await).await;
    assert_eq!((status, field.as_str()), (503, "site"), "{message}");
    assert!(message.contains("on site `b`"), "{message}");
    let preferred = app.rent_ok(json!({ "prefer_site": "b" })).await;
    assert_eq!(
        preferred["site"], "a",
        "a preference falls back to any site"
    );

    // Mistakes are 422, name the field, and make nothing.
    let before = app.count("SELECT COUNT(*) FROM rentals").await;
    let (status, field, message) = error_of(app.rent(json!({ "site": "c" })).await).await;
    assert_eq!((status, field.as_str()), (422, "site"), "{message}");
    assert!(message.contains("unknown site `c`"), "{message}");
    assert!(
        message.contains("a, b"),
        "the known sites are listed: {message}"
    );
    let (status, field, message) =
        error_of(app.rent(json!({ "labels": { "disk": "nvme" } })).await).await;
    assert_eq!((status, field.as_str()), (422, "labels"), "{message}");
    let (status, field, _) = error_of(app.rent(json!({ "prefer_site": "x y" })).await).await;
    assert_eq!((status, field.as_str()), (422, "prefer_site"));
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, before);
}

#[tokio::test]
async fn a_whole_site_lost_moves_its_rentals_to_the_other_site_and_its_return_is_fenced() {
    // Deaths are declared by the probe rounds this test runs, not by watch sessions.
    let app = two_sites(2, Box::new(|c| c.health.watch = false)).await;
    let (key, public) = crate::helpers::tenant_key();
    let mut rentals = Vec::new();
    for user in ["ann", "bob"] {
        let r = app
            .rent_ok(json!({ "site": "a", "username": user, "ssh_public_key": public }))
            .await;
        assert_eq!(r["site"], "a");
        rentals.push(r["id"].as_str().unwrap().to_owned());
    }
    let stop: Vec<Vec<&str>> = ["a1", "a2"]
        .iter()
        .map(|w| vec!["stop", "-t", "1", app.worker(w).container.as_str()])
        .collect();
    docker_at_once(&stop.iter().map(Vec::as_slice).collect::<Vec<_>>());
    probe_round(&app).await;

    // The migration loop, woken by the deaths, moves them (a pass of this test's own
    // beside it would race it for the same moves).
    for (id, user) in rentals.iter().zip(["ann", "bob"]) {
        let r = app
            .wait_rental(id, Duration::from_secs(20), |r| {
                r["status"] == "active" && r["site"] == "b"
            })
            .await;
        let port = r["port"].as_u64().unwrap() as u16;
        let who = app
            .tenant_whoami("127.0.0.1", port, user, Auth::Key(key.clone()))
            .await
            .expect("the tenant logs in on site b with its own key");
        assert_eq!(who, user);
    }
    let lost = events_of(&app, "site.lost").await;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].starts_with("site a lost"), "{lost:?}");
    let moves = events_of(&app, "rental.migrating").await;
    assert!(
        moves.iter().all(|m| m.contains("leaves it for site b")),
        "each move says it left its site: {moves:?}"
    );

    // Site a comes back: its workers are fenced (the moved accounts removed) before any
    // of them is offered again.
    let start: Vec<Vec<&str>> = ["a1", "a2"]
        .iter()
        .map(|w| vec!["start", app.worker(w).container.as_str()])
        .collect();
    docker_at_once(&start.iter().map(Vec::as_slice).collect::<Vec<_>>());
    for w in ["a1", "a2"] {
        app.worker(w).wait_for_sshd();
    }
    probe_round(&app).await;
    probe_round(&app).await;
    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();
    for w in ["a1", "a2"] {
        for user in ["ann", "bob"] {
            assert!(!app.worker(w).has_user(user), "{user} left on {w}");
        }
        assert!(!app.worker_row(w).await.allocated(), "{w} is free again");
    }
    // The next pass says the site is back (nothing wakes the loop for a return).
    migration_pass(&app).await;
    let back = events_of(&app, "site.back").await;
    assert_eq!(back.len(), 1, "{back:?}");
    assert!(events_of(&app, "migration.held").await.is_empty());
}

#[tokio::test]
async fn every_site_unreachable_at_once_moves_nothing_and_says_why_even_as_it_heals() {
    let app = two_sites(
        2,
        Box::new(|c| {
            c.health.watch = false;
            c.health.alive_after = 2;
        }),
    )
    .await;
    let rented = app.rent_ok(json!({ "site": "b" })).await;
    let id = rented["id"].as_str().unwrap().to_owned();
    let containers = |site: &str| -> Vec<String> {
        app.workers
            .iter()
            .filter(|w| w.name.starts_with(site))
            .map(|w| w.container.clone())
            .collect()
    };
    let all_at_once = |verb: &str, containers: Vec<String>| {
        let commands: Vec<Vec<&str>> = containers.iter().map(|c| vec![verb, c.as_str()]).collect();
        docker_at_once(&commands.iter().map(Vec::as_slice).collect::<Vec<_>>());
    };
    let mut everyone = containers("a");
    everyone.extend(containers("b"));
    all_at_once("stop", everyone);
    probe_round(&app).await;

    let summary = migration_pass(&app).await;
    assert!(summary.held, "{summary:?}");
    let still = |r: &Value| r["status"] == "active" && r["worker"] == rented["worker"];
    let (_, r) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert!(still(&r), "{r}");
    let held = events_of(&app, "migration.held").await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].contains("every site"), "{held:?}");
    assert!(held[0].contains("a: 2 of 2, b: 2 of 2"), "{held:?}");
    assert!(events_of(&app, "site.lost").await.is_empty());

    // The cut heals site by site: a is declared alive again first, while b's workers,
    // answering already, are still dead to the database. Site b is not lost for that.
    all_at_once("start", containers("a"));
    for w in app.workers.iter().filter(|w| w.name.starts_with('a')) {
        w.wait_for_sshd();
    }
    probe_round(&app).await;
    probe_round(&app).await;
    all_at_once("start", containers("b"));
    for w in app.workers.iter().filter(|w| w.name.starts_with('b')) {
        w.wait_for_sshd();
    }
    let summary = migration_pass(&app).await;
    assert!(!summary.held, "{summary:?}");
    assert_eq!(summary.moved, 0, "{summary:?}");
    let (_, r) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert!(still(&r), "nothing moved as the cut healed: {r}");
    assert!(events_of(&app, "site.lost").await.is_empty());
}

#[tokio::test]
async fn workers_are_added_changed_and_retired_live_and_a_retired_tenant_moves_first() {
    let app = crate::helpers::spawn_app(2).await;
    let rented = app.rent_ok(json!({ "username": "tess" })).await;
    let id = rented["id"].as_str().unwrap().to_owned();
    let password = rented["password"].as_str().unwrap().to_owned();
    let first = rented["worker"].as_str().unwrap().to_owned();

    // A new machine joins, through the API: probed, then rented out, with no restart.
    let fresh = Worker::start_new("fresh", &app.key.public);
    let body = json!({
        "host": "127.0.0.1",
        "port": fresh.port,
        "site": "test",
        "labels": { "gpu": "none" },
        "instances_join": fresh.container,
    });
    let resp = app
        .http
        .post(app.url("/api/workers/fresh"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = app
        .http
        .post(app.url("/api/workers/fresh"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409, "a name is added once");
    let (status, field, _) = error_of(
        app.http
            .post(app.url("/api/workers/other"))
            .json(&json!({ "host": "127.0.0.1", "port": 0 }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, field.as_str()), (422, "port"));
    probe_round(&app).await;
    let on_fresh = app.rent_ok(json!({ "labels": { "gpu": "none" } })).await;
    assert_eq!(on_fresh["worker"], "fresh");
    assert_eq!(app.release(on_fresh["id"].as_str().unwrap()).await, 204);
    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();

    // The rented worker is retired: its tenant moves first, same password.
    let resp = app
        .http
        .delete(app.url(&format!("/api/workers/{first}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let view: Value = resp.json().await.unwrap();
    assert_eq!(
        (view["retired"].as_bool(), view["allocated"].as_bool()),
        (Some(true), Some(true))
    );
    // The migration loop, woken by the retirement, moves the tenant.
    let moved = app.wait_moved_off(&id, &first).await;
    let port = moved["port"].as_u64().unwrap() as u16;
    let who = app
        .tenant_whoami("127.0.0.1", port, "tess", Auth::Password(password))
        .await
        .expect("the same password works on the new worker");
    assert_eq!(who, "tess");
    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();
    assert!(
        !app.worker(&first).has_user("tess"),
        "its account is removed there"
    );

    // The inventory as a file: it has the new worker, not the retired one.
    let text = app
        .http
        .get(app.url("/api/inventory"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported =
        orion::inventory::Inventory::parse(&text, std::path::Path::new("exported")).unwrap();
    let names: Vec<&str> = exported.workers.iter().map(|w| w.name.as_str()).collect();
    assert!(
        names.contains(&"fresh") && !names.contains(&first.as_str()),
        "{names:?}"
    );

    // A dry run shows the difference and changes nothing; a bad file changes nothing.
    let without_fresh = exported.without("fresh").unwrap().to_toml();
    let resp = app
        .http
        .put(app.url("/api/inventory"))
        .json(&json!({ "inventory": without_fresh, "dry_run": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let diff: Value = resp.json().await.unwrap();
    assert_eq!(diff["applied"], false);
    assert_eq!(diff["changes"], json!(["- fresh: retired"]));
    assert!(!app.worker_row("fresh").await.retired);
    let (status, field, message) = error_of(
        app.http
            .put(app.url("/api/inventory"))
            .json(&json!({ "inventory": "[[workers]]\nname = \"x\"\nport = 22\n" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, field.as_str()), (422, "inventory"));
    assert!(message.contains("host"), "{message}");

    // The inventory file, unchanged since it was applied at start, is not applied again
    // at a start: what the API changed stands.
    let file = app.dir.path().join("inventory.toml");
    let skipped = orion::inventory::apply_file(&app.ctx.store, &file, true)
        .await
        .unwrap();
    assert!(skipped.is_none(), "{skipped:?}");
    assert!(!app.worker_row("fresh").await.retired);

    // SIGHUP: the file (now naming `fresh` too) is read again and applied, live.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&inventory_entry(&fresh, "test"));
    std::fs::write(&file, text).unwrap();
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.worker_row(&first).await.retired {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = events_of(&app, "worker.updated").await;
    assert!(
        back.iter().any(|m| m.contains("back in the inventory")),
        "{back:?}"
    );
}
