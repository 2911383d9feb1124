//! A hostile tenant against real workers: each test plays the attacker and checks that
//! the attack leaves nothing behind, reaches nothing, and takes nothing it may not.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orion::playbook::{Playbook, PlaybookError, Vars};
use orion::ssh::{Auth, Target};
use russh::keys::PrivateKey;
use serde_json::{Value, json};

use crate::helpers::{TestApp, Worker, spawn_app, spawn_app_with, tenant_key};

/// Runs `command` on the worker published at `port` as the tenant `user`.
pub(crate) async fn as_tenant(
    app: &TestApp,
    port: u16,
    user: &str,
    key: &Arc<PrivateKey>,
    command: &str,
) -> String {
    let target = Target {
        name: format!("tenant@{port}"),
        host: "127.0.0.1".into(),
        port,
        host_key: None,
    };
    let session = app
        .tenant_ssh
        .connect_as(&target, user, Auth::Key(key.clone()))
        .await
        .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"));
    let out = session.exec(command, None).await.unwrap();
    session.close().await;
    out.stdout.trim().to_owned()
}

/// How many processes of `uid` run on the worker.
fn processes_of(worker: &Worker, uid: &str) -> usize {
    worker
        .exec(&format!(
            "find /proc -mindepth 1 -maxdepth 1 -name '[0-9]*' -uid {uid} | wc -l"
        ))
        .parse()
        .unwrap()
}

/// A process that forks and exits in a loop: a new pid every generation, so a killer that
/// looks at /proc and then kills what it saw is always one generation late.
const HOPPER: &str = "setsid nohup python3 -c 'import os\nwhile True:\n    if os.fork() > 0:\n        os._exit(0)' \
    >/dev/null 2>&1 </dev/null &";

#[tokio::test]
async fn a_hopper_process_does_not_survive_release_and_its_uid_is_never_handed_out_again() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    let (key, public) = tenant_key();
    let rental = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "hopper" }))
        .await;
    let port = rental["port"].as_u64().unwrap() as u16;
    let uid = worker.exec("id -u hopper");
    assert!(
        uid.parse::<u32>().unwrap() >= 200_000,
        "uid {uid} is Orion's"
    );

    as_tenant(&app, port, "hopper", &key, HOPPER).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_of(worker, &uid) == 0 {
        assert!(Instant::now() < deadline, "the hopper never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(app.release(rental["id"].as_str().unwrap()).await, 204);
    for _ in 0..10 {
        assert_eq!(
            processes_of(worker, &uid),
            0,
            "a process of the released tenant's uid {uid} survives"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!worker.has_user("hopper"));

    // The next tenant on this worker, even under the same name, gets another uid.
    let next = app
        .rent_ok(json!({ "ssh_public_key": tenant_key().1, "username": "hopper" }))
        .await;
    assert_eq!(next["worker"], "worker_1");
    let next_uid = worker.exec("id -u hopper");
    assert_ne!(next_uid, uid, "a uid was handed to a second tenant");
}

#[tokio::test]
async fn links_a_tenant_plants_in_its_home_are_not_followed_when_its_account_is_converged_again() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    let (key, public) = tenant_key();
    let rental = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "mallory" }))
        .await;
    let id = rental["id"].as_str().unwrap();
    let port = rental["port"].as_u64().unwrap() as u16;
    let uid = worker.exec("id -u mallory");
    let record = app.ctx.store.rental(id).await.unwrap().unwrap();
    let row = app.worker_row("worker_1").await;
    let claim = orion::store::Claim {
        uid: app.ctx.store.live_uid(id, row.id).await.unwrap().unwrap(),
        worker: row,
    };

    // ~/.ssh as a link to /etc: a root that follows it makes /etc the tenant's.
    as_tenant(
        &app,
        port,
        "mallory",
        &key,
        "rm -rf ~/.ssh && ln -s /etc ~/.ssh",
    )
    .await;
    orion::rentals::provision(&app.ctx, &record, &claim)
        .await
        .expect("converging the account again");
    // The key file a root writes to as `~/.ssh/authorized_keys.orion`, as a link to the
    // file every process loads.
    as_tenant(
        &app,
        port,
        "mallory",
        &key,
        "rm -f ~/.ssh && mkdir -m 700 ~/.ssh && ln -s /etc/ld.so.preload ~/.ssh/authorized_keys.orion \
         && ln -s /etc/shadow ~/.ssh/authorized_keys",
    )
    .await;
    orion::rentals::provision(&app.ctx, &record, &claim)
        .await
        .expect("converging the account again");

    assert_eq!(worker.exec("stat -c '%U %a' /etc"), "root 755");
    assert_eq!(worker.exec("stat -c '%U %a' /etc/shadow"), "root 640");
    assert_eq!(
        worker.exec("test -e /etc/ld.so.preload && echo there || echo absent"),
        "absent"
    );
    assert_eq!(
        worker.exec(&format!("find /etc -xdev -uid {uid} | head")),
        "",
        "root wrote through the tenant's links"
    );
    // The tenant still logs in with its key, which it cannot edit.
    let who = app
        .tenant_whoami("127.0.0.1", port, "mallory", Auth::Key(key))
        .await;
    assert_eq!(who.as_deref(), Ok("mallory"));
    assert_eq!(
        worker.exec("stat -c '%U %a' /etc/orion/keys/mallory"),
        "root 640"
    );
}

/// Runs a rendered playbook on the worker as root, as Orion would, bypassing Orion's own
/// checks: what the worker-side script refuses on its own. Returns (exit code, stderr).
fn run_script(worker: &Worker, script: &str) -> (i32, String) {
    let out = Command::new("docker")
        .args(["exec", &worker.container, "sh", "-c", script])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn delete_user_refuses_root_system_accounts_and_uids_below_the_floor() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    worker.exec(
        "useradd -m alice && useradd -m -u 1500 -G orion-tenants bob \
         && useradd -m -u 200777 carol",
    );
    let target = app.worker_row("worker_1").await.target();
    let vars = |username: &str, uid: Option<u32>| Vars {
        username: username.into(),
        uid,
        public_key: None,
        password_hash: None,
    };

    // Orion's own check, before anything runs.
    for (user, uid) in [
        ("root", None),
        ("root", Some(0)),
        ("daemon", None),
        ("alice", Some(1000)),
    ] {
        let err = app
            .ctx
            .executor
            .run(Playbook::DeleteUser, &vars(user, uid), &target)
            .await
            .unwrap_err();
        assert!(
            matches!(err, PlaybookError::Refused { .. }),
            "{user}: {err}"
        );
    }
    // The worker-side script, on its own.
    let playbooks = app.ctx.executor.playbooks();
    for (user, uid, why) in [
        ("root", None, "below"),
        ("alice", None, "below"),
        ("bob", None, "below"),
        ("carol", None, "not Orion's"),
        ("carol", Some(5), "below"),
    ] {
        let script = playbooks
            .render(Playbook::DeleteUser, &vars(user, uid), 200_000)
            .unwrap();
        let (code, stderr) = run_script(worker, &script);
        assert_eq!(code, 3, "{user}: {stderr}");
        assert!(
            stderr.contains("orion: refused:") && stderr.contains(why),
            "{user}: {stderr}"
        );
    }
    for user in ["root", "alice", "bob", "carol"] {
        assert!(worker.has_user(user), "{user} was removed");
    }
    assert_eq!(
        worker.exec("ls -d /root /home/alice /home/carol | wc -l"),
        "3"
    );
}

#[tokio::test]
async fn a_tampered_row_naming_root_quarantines_the_worker_instead_of_removing_root() {
    let app = spawn_app(1).await;
    let rental = app.rent_ok(json!({ "username": "victim" })).await;
    let id = rental["id"].as_str().unwrap();
    // The row now says the leftover account on worker_1 is root's.
    for sql in [
        format!("UPDATE placements SET state = 'stale', uid = NULL WHERE rental_id = '{id}'"),
        format!(
            "UPDATE rentals SET status = 'released', worker_id = NULL, username = 'root' \
             WHERE id = '{id}'"
        ),
    ] {
        sqlx::query(&sql)
            .execute(app.ctx.store.pool())
            .await
            .unwrap();
    }
    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();
    let worker = app.worker("worker_1");
    assert!(worker.has_user("root"));
    let row = app.worker_row("worker_1").await;
    assert!(
        row.quarantine_reason
            .as_deref()
            .is_some_and(|r| r.contains("refused")),
        "{:?}",
        row.quarantine_reason
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'account.refused'")
            .await,
        1
    );
    let resp = app.rent(json!({})).await;
    assert_eq!(resp.status(), 503, "a quarantined worker is not offered");
}

#[tokio::test]
async fn a_rental_ended_while_its_account_is_made_answers_an_error_not_201() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    // A slow worker: the account takes 3 s to make.
    worker.exec(
        "printf '#!/bin/sh\\nsleep 3\\nexec /usr/sbin/groupadd \"$@\"\\n' >/usr/local/sbin/groupadd \
         && chmod 755 /usr/local/sbin/groupadd",
    );
    let rent = {
        let http = app.http.clone();
        let url = app.url("/api/rent");
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({ "username": "late" }))
                .send()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let id: String = loop {
        if let Ok(id) = sqlx::query_scalar("SELECT id FROM rentals WHERE status = 'provisioning'")
            .fetch_one(app.ctx.store.pool())
            .await
        {
            break id;
        }
        assert!(Instant::now() < deadline, "the rent never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Meanwhile the rental is ended (as the loops end one they believe stuck).
    let row = app.worker_row("worker_1").await;
    app.ctx
        .store
        .fail_rent(&id, &row, false, "ended by the test")
        .await
        .unwrap();

    let resp = rent.await.unwrap().unwrap();
    assert_eq!(resp.status(), 502, "{}", resp.text().await.unwrap());
    assert!(
        !worker.has_user("late"),
        "the account of an ended rental is removed"
    );
}

#[tokio::test]
async fn a_rental_stuck_in_provisioning_is_failed_by_the_loops_and_its_account_removed() {
    let app = spawn_app(1).await;
    let rental = app.rent_ok(json!({ "username": "stuck" })).await;
    let id = rental["id"].as_str().unwrap();
    // As a process leaves it when it loses its database before recording the activation.
    for sql in [
        format!(
            "UPDATE rentals SET status = 'provisioning', \
             updated_at = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR WHERE id = '{id}'"
        ),
        format!("UPDATE placements SET state = 'provisioning' WHERE rental_id = '{id}'"),
    ] {
        sqlx::query(&sql)
            .execute(app.ctx.store.pool())
            .await
            .unwrap();
    }
    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();
    let (_, view) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert_eq!(view["status"], "failed", "{view}");
    assert!(!app.worker("worker_1").has_user("stuck"));
    assert!(!app.worker_row("worker_1").await.allocated());
}

/// Answers every request with a redirect to `to`.
async fn redirector(bind: &str, to: String) -> String {
    let app = axum::Router::new().fallback(move || {
        let to = to.clone();
        async move { axum::response::Redirect::temporary(&to) }
    });
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn a_notify_url_on_a_private_address_is_refused_at_rent_time() {
    let app = spawn_app_with(1, Box::new(|c| c.migration.notify_allow.clear())).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:9/hook",
        "http://[::ffff:10.0.0.1]/",
    ] {
        let resp = app.rent(json!({ "notify_url": url })).await;
        assert_eq!(resp.status(), 422, "{url}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_input", "{url}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("notify_url"),
            "{body}"
        );
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, 0);
}

#[tokio::test]
async fn a_notify_url_that_redirects_to_loopback_is_not_followed() {
    let app = spawn_app_with(
        1,
        Box::new(|c| c.migration.notify_allow = vec!["127.0.0.2/32".parse().unwrap()]),
    )
    .await;
    // The target a tenant wants Orion to reach: anything on loopback.
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let target = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "secret" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inner = format!("http://{}/admin", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, target).await.unwrap() });
    let hook = redirector("127.0.0.2:0", inner).await;

    let rental = app.rent_ok(json!({ "notify_url": hook })).await;
    let id = rental["id"].as_str().unwrap().to_owned();
    let url: String = sqlx::query_scalar("SELECT notify_url FROM rentals WHERE id = ?")
        .bind(&id)
        .fetch_one(app.ctx.store.pool())
        .await
        .unwrap();
    app.ctx
        .notifier
        .clone()
        .deliver(app.ctx.store.clone(), id.clone(), url, "localhost".into())
        .await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    let message: String = sqlx::query_scalar(
        "SELECT message FROM events WHERE kind = 'rental.notify_failed' AND rental_id = ?",
    )
    .bind(&id)
    .fetch_one(app.ctx.store.pool())
    .await
    .unwrap();
    assert!(message.contains("307"), "{message}");
}

/// A tenant token with its own limit, and a client that sends it.
async fn token_with_limit(app: &TestApp, tenant: &str, limit: u32) -> (String, reqwest::Client) {
    let (id, token) = app
        .tenant_token_with(json!({ "tenant": tenant, "max_rentals": limit }))
        .await;
    (id, crate::helpers::client_with_token(&token))
}

#[tokio::test]
async fn a_tenant_at_its_quota_gets_429_and_the_fleet_stays_free() {
    let app = spawn_app_with(3, Box::new(|c| c.tenants.max_rentals = 2)).await;
    let (_, greedy) = token_with_limit(&app, "greedy", 1).await;
    let rent = |client: &reqwest::Client| client.post(app.url("/api/rent")).json(&json!({})).send();
    assert_eq!(rent(&greedy).await.unwrap().status(), 201);
    let refused = rent(&greedy).await.unwrap();
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");

    // The configured default for a token without its own limit; concurrent rents too.
    let (_, token) = app.tenant_token("eager").await;
    let eager = crate::helpers::client_with_token(&token);
    let answers = futures::future::join_all((0..3).map(|_| rent(&eager))).await;
    let mut statuses: Vec<u16> = answers
        .iter()
        .map(|r| r.as_ref().unwrap().status().as_u16())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [201, 201, 429]);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM rentals WHERE status = 'active'")
            .await,
        3
    );
}

#[tokio::test]
async fn an_expired_rental_is_released_and_its_account_removed_unless_renewed() {
    let app = spawn_app(2).await;
    let (_, token) = app.tenant_token("brief").await;
    let tenant = crate::helpers::client_with_token(&token);
    let rent = |ttl: Value| {
        tenant
            .post(app.url("/api/rent"))
            .json(&json!({ "ttl": ttl }))
            .send()
    };
    for bad in [json!(5), json!("10s"), json!("forever"), json!("400d")] {
        let resp = rent(bad.clone()).await.unwrap();
        assert_eq!(resp.status(), 422, "{bad}");
    }
    let first: Value = rent(json!("1h")).await.unwrap().json().await.unwrap();
    let second: Value = rent(json!(3600)).await.unwrap().json().await.unwrap();
    assert!(first["expires_at"].is_string(), "{first}");
    let (first_id, second_id) = (
        first["id"].as_str().unwrap(),
        second["id"].as_str().unwrap(),
    );

    // Both are due now; one is renewed first.
    sqlx::query("UPDATE rentals SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
        .execute(app.ctx.store.pool())
        .await
        .unwrap();
    let renewed = tenant
        .post(app.url(&format!("/api/rentals/{second_id}/renew")))
        .json(&json!({ "ttl": "2h" }))
        .send()
        .await
        .unwrap();
    assert_eq!(renewed.status(), 200);

    orion::loops::cleanup::cleanup_pass(&app.ctx).await.unwrap();
    let (_, view) = app.get_json(&format!("/api/rentals/{first_id}")).await;
    assert_eq!(view["status"], "released", "{view}");
    let worker = app.worker(first["worker"].as_str().unwrap());
    assert!(!worker.has_user(first["username"].as_str().unwrap()));
    let (_, view) = app.get_json(&format!("/api/rentals/{second_id}")).await;
    assert_eq!(view["status"], "active", "renewed: {view}");
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM events WHERE kind = 'rental.expired' AND rental_id = '{first_id}'"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn revoking_a_token_can_release_every_rental_it_made() {
    let app = spawn_app(2).await;
    let (token_id, tenant) = token_with_limit(&app, "leaver", 5).await;
    let mut users = Vec::new();
    for _ in 0..2 {
        let r: Value = tenant
            .post(app.url("/api/rent"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        users.push((
            r["worker"].as_str().unwrap().to_owned(),
            r["username"].as_str().unwrap().to_owned(),
        ));
    }
    let resp = app
        .http
        .delete(app.url(&format!("/api/tokens/{token_id}?release_rentals=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM rentals WHERE status = 'released'")
            .await,
        2
    );
    for (worker, user) in users {
        assert!(!app.worker(&worker).has_user(&user), "{user} on {worker}");
    }
}

#[tokio::test]
async fn a_rent_racing_a_workers_connection_drop_gets_201_on_some_worker() {
    let app = spawn_app(2).await;
    // worker_1, first in line, stops answering: Orion's watch connection to it is dead
    // but not yet noticed (its keepalives have not run out), and a new one hangs too.
    let first = app.worker("worker_1").container.clone();
    crate::helpers::docker(&["pause", &first]);
    let resp = app.rent(json!({ "username": "racer" })).await;
    crate::helpers::docker(&["unpause", &first]);
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["worker"], "worker_2", "{body}");
}
