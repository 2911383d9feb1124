use std::collections::HashSet;

use orion::ssh::Auth;
use serde_json::{Value, json};

use crate::helpers::{spawn_app, tenant_key};

#[tokio::test]
async fn a_rent_with_a_key_gives_a_working_login_and_release_removes_it() {
    let app = spawn_app(1).await;
    let (key, public) = tenant_key();

    let resp = app
        .rent(json!({ "ssh_public_key": public, "username": "alice" }))
        .await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["username"], "alice");
    assert_eq!(body["worker"], "worker_1");
    assert_eq!(body["status"], "active");
    assert!(
        body.get("password").is_none(),
        "no password when a key is given: {body}"
    );
    let id = body["id"].as_str().unwrap().to_owned();
    let host = body["host"].as_str().unwrap().to_owned();
    let port = body["port"].as_u64().unwrap() as u16;

    let whoami = app
        .tenant_whoami(&host, port, "alice", Auth::Key(key.clone()))
        .await
        .expect("tenant login with the rented key");
    assert_eq!(whoami, "alice");

    let (_, workers) = app.get_json("/api/workers").await;
    assert_eq!(workers["workers"][0]["allocated"], true);

    assert_eq!(app.release(&id).await, 204);

    let login = app
        .tenant_whoami(&host, port, "alice", Auth::Key(key))
        .await;
    assert!(login.is_err(), "login must fail after release: {login:?}");
    assert!(!app.worker("worker_1").has_user("alice"));
    let (_, workers) = app.get_json("/api/workers").await;
    assert_eq!(workers["workers"][0]["allocated"], false);
    let (status, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(rental["status"], "released");

    // Releasing twice is harmless.
    assert_eq!(app.release(&id).await, 204);
}

#[tokio::test]
async fn a_rent_without_a_key_returns_a_password_that_logs_in() {
    let app = spawn_app(1).await;
    let resp = app.http.post(app.url("/api/rent")).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    let password = body["password"]
        .as_str()
        .expect("a generated password")
        .to_owned();
    let username = body["username"].as_str().unwrap().to_owned();
    let port = body["port"].as_u64().unwrap() as u16;

    let whoami = app
        .tenant_whoami(
            "127.0.0.1",
            port,
            &username,
            Auth::Password(password.clone()),
        )
        .await
        .expect("password login");
    assert_eq!(whoami, username);
    let wrong = app
        .tenant_whoami("127.0.0.1", port, &username, Auth::Password("wrong".into()))
        .await;
    assert!(wrong.is_err());

    // The password is shown once and stored only as a hash.
    let (_, again) = app
        .get_json(&format!("/api/rentals/{}", body["id"].as_str().unwrap()))
        .await;
    assert!(again.get("password").is_none());
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM rentals")
        .fetch_one(app.ctx.store.pool())
        .await
        .unwrap();
    assert!(stored.starts_with("$6$") && !stored.contains(&password));
    let leaked = app
        .count(&format!(
            "SELECT COUNT(*) FROM events WHERE message LIKE '%{password}%'"
        ))
        .await;
    assert_eq!(leaked, 0);
}

#[tokio::test]
async fn fifty_concurrent_rents_on_three_workers_get_exactly_three_distinct_workers() {
    let app = spawn_app(3).await;
    let requests = (0..50).map(|_| {
        let (_, public) = tenant_key();
        let http = app.http.clone();
        let url = app.url("/api/rent");
        async move {
            let resp = http
                .post(url)
                .json(&json!({ "ssh_public_key": public }))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    });
    let results = futures::future::join_all(requests).await;
    let created: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    let refused = results.iter().filter(|(s, _)| *s == 503).count();
    assert_eq!(created.len(), 3, "{results:?}");
    assert_eq!(refused, 47, "{results:?}");
    let workers: HashSet<&str> = created
        .iter()
        .map(|b| b["worker"].as_str().unwrap())
        .collect();
    assert_eq!(workers.len(), 3);
    for (status, body) in &results {
        if *status == 503 {
            assert_eq!(body["error"]["code"], "no_free_worker");
        }
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, 3);
}

#[tokio::test]
async fn a_rent_with_no_free_worker_returns_503_with_a_json_error() {
    let app = spawn_app(1).await;
    assert_eq!(app.rent(json!({})).await.status(), 201);
    let resp = app.rent(json!({})).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_free_worker");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("free worker")
    );
}

#[tokio::test]
async fn invalid_input_is_refused_precisely_and_changes_nothing() {
    let app = spawn_app(1).await;
    let users_before = app.worker("worker_1").exec("getent passwd | wc -l");
    let (_, public) = tenant_key();
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "bad_request"),
        (json!({ "username": 42 }).to_string(), 400, "bad_request"),
        (json!({ "colour": "blue" }).to_string(), 400, "bad_request"),
        (
            json!({ "username": "root" }).to_string(),
            422,
            "invalid_input",
        ),
        (
            json!({ "username": "a; rm -rf /" }).to_string(),
            422,
            "invalid_input",
        ),
        (
            json!({ "username": "bob\nroot" }).to_string(),
            422,
            "invalid_input",
        ),
        (
            json!({ "username": "$(reboot)" }).to_string(),
            422,
            "invalid_input",
        ),
        (
            json!({ "ssh_public_key": format!("{public}\n{public}") }).to_string(),
            422,
            "invalid_input",
        ),
        (
            json!({ "ssh_public_key": format!("command=\"sh\" {public}") }).to_string(),
            422,
            "invalid_input",
        ),
        (
            json!({ "ssh_public_key": "ssh-ed25519 AAAA'; touch /pwned #" }).to_string(),
            422,
            "invalid_input",
        ),
    ];
    for (body, status, code) in cases {
        let resp = app
            .http
            .post(app.url("/api/rent"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], code, "{body}: {err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM placements").await, 0);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM workers WHERE rental_id IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        app.worker("worker_1").exec("getent passwd | wc -l"),
        users_before
    );
    assert_eq!(
        app.worker("worker_1").exec("ls /pwned 2>/dev/null | wc -l"),
        "0"
    );
}

#[tokio::test]
async fn a_username_in_use_is_a_conflict_and_the_worker_stays_free() {
    let app = spawn_app(2).await;
    assert_eq!(app.rent(json!({ "username": "carol" })).await.status(), 201);
    let resp = app.rent(json!({ "username": "carol" })).await;
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM workers WHERE rental_id IS NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn a_rental_shows_its_placement_and_unknown_ones_are_404() {
    let app = spawn_app(1).await;
    let body: Value = app.rent_ok(json!({})).await;
    let id = body["id"].as_str().unwrap();
    let (status, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(rental["worker"], "worker_1");
    assert_eq!(rental["port"], app.worker("worker_1").port);
    assert_eq!(rental["placements"][0]["worker"], "worker_1");
    assert_eq!(rental["placements"][0]["state"], "active");
    let (_, list) = app.get_json("/api/rentals").await;
    assert_eq!(list["rentals"].as_array().unwrap().len(), 1);

    let (status, err) = app.get_json("/api/rentals/no-such-rental").await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "not_found");
    let resp = app
        .http
        .delete(app.url("/api/rentals/no-such-rental"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let (status, err) = app.get_json("/api/nowhere").await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "not_found");
    let resp = app.http.put(app.url("/api/rent")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn a_failed_provisioning_leaves_no_worker_allocated_and_says_why() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    // Without its execute bit even root cannot run useradd: create_user fails.
    worker.exec("chmod 000 /usr/sbin/useradd");
    let resp = app.rent(json!({ "username": "dave" })).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provisioning_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("worker_1")
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM workers WHERE rental_id IS NOT NULL")
            .await,
        0,
        "the worker must be free again"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM rentals WHERE status = 'failed'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'rental.failed'")
            .await,
        1
    );
    // Once the worker is mended, the same username can be rented.
    worker.exec("chmod 755 /usr/sbin/useradd");
    assert_eq!(app.rent(json!({ "username": "dave" })).await.status(), 201);
    assert!(worker.has_user("dave"));
}

#[tokio::test]
async fn releasing_a_rental_on_a_dead_worker_frees_it_only_after_cleanup() {
    let app = spawn_app(1).await;
    let body: Value = app.rent_ok(json!({ "username": "erin" })).await;
    let id = body["id"].as_str().unwrap();
    let worker = app.worker("worker_1");
    worker.stop();
    assert_eq!(app.release(id).await, 204);
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    // The account may still be on the worker: it is not offered to anyone.
    assert_eq!(app.rent(json!({})).await.status(), 503);

    worker.start();
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    assert_eq!(
        orion::loops::cleanup::cleanup_pass(&app.ctx)
            .await
            .unwrap()
            .removed,
        1
    );
    assert!(!worker.has_user("erin"));
    assert_eq!(app.rent(json!({})).await.status(), 201);
}

#[tokio::test]
async fn a_shutdown_during_a_rent_lets_it_finish() {
    let mut app = spawn_app(1).await;
    let http = app.http.clone();
    let url = app.url("/api/rent");
    let rent = tokio::spawn(async move {
        http.post(url)
            .json(&json!({ "username": "heidi" }))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // Wait until the rent is in flight (the worker is claimed), then ask Orion to stop.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.count("SELECT COUNT(*) FROM rentals").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rent never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    app.stop().await;
    let status = rent
        .await
        .unwrap()
        .expect("the in-flight rent got an answer");
    assert_eq!(status, 201, "graceful shutdown lets the rent complete");
    let state: String = sqlx::query_scalar("SELECT status FROM rentals")
        .fetch_one(app.ctx.store.pool())
        .await
        .unwrap();
    assert_eq!(state, "active");
    assert!(app.worker("worker_1").has_user("heidi"));
}

#[tokio::test]
async fn an_oversized_body_gets_413_in_the_json_error_shape() {
    let app = spawn_app(1).await;
    let huge = format!("{{\"username\": \"{}\"}}", "a".repeat(200 * 1024));
    let resp = app
        .http
        .post(app.url("/api/rent"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "too_large");
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, 0);
}
