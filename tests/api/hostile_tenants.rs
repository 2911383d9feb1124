//! Hostile tenants, round 3 (#24): what one tenant tries against another tenant's
//! things or against Orion's hold on the fleet, played against real workers.

use serde_json::{Value, json};

use crate::helpers::{client_with_token, spawn_app_with};

#[tokio::test]
async fn a_tenant_name_that_differs_from_another_only_in_case_is_refused() {
    let app = spawn_app_with(1, Box::new(|_| {})).await;
    let (_, owner) = app.tenant_token_with(json!({"tenant": "DrillCase"})).await;
    let owner = client_with_token(&owner);
    let resp = owner
        .post(app.url("/api/apps"))
        .json(&json!({"name": "casedrill", "image": "orion/demo-app", "replicas": 0, "port": 8080}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    // A token for the lookalike name (which could GET, PATCH and DELETE DrillCase's app:
    // SQL compares tenants without case) is refused, naming the existing tenant.
    let resp = app
        .http
        .post(app.url("/api/tokens"))
        .json(&json!({"tenant": "drillcase"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`DrillCase`"),
        "{body}"
    );
}

/// Names already ambiguous (tokens made before the check) stop the migration that
/// brings the check, naming them, rather than leave two tenants that SQL takes for one.
#[tokio::test]
async fn names_already_ambiguous_stop_the_migration_and_are_named() {
    let app = spawn_app_with(1, Box::new(|_| {})).await;
    for tenant in ["Mixed", "mixed"] {
        sqlx::query(
            "INSERT INTO tokens (id, tenant, token_hash, created_at) \
             VALUES (?, ?, ?, UTC_TIMESTAMP(6))",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(tenant)
        .bind(orion::auth::token_hash(&orion::auth::generate_token()))
        .execute(app.ctx.store.pool())
        .await
        .unwrap();
    }
    let migration = include_str!("../../migrations/0012_hostile_tenants.sql");
    let err = sqlx::raw_sql(migration)
        .execute(app.ctx.store.pool())
        .await
        .expect_err("the migration ran over ambiguous names");
    let message = err.to_string();
    assert!(
        message.contains("differ only in case") && message.contains("ixed"),
        "{message}"
    );
}

/// One rent naming a group of the worker image used to answer 502 and quarantine the
/// worker it was tried on: one such request per worker took the fleet out.
#[tokio::test]
async fn a_rent_naming_a_system_group_is_refused_and_quarantines_nothing() {
    let app = spawn_app_with(1, Box::new(|_| {})).await;
    for name in ["orion-tenants", "plugdev", "sshd"] {
        let resp = app.rent(json!({"username": name})).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 422, "{name}: {body}");
        assert_eq!(body["error"]["field"], "username", "{body}");
    }
    let w = app.worker_row("worker_1").await;
    assert_eq!(
        w.quarantine_reason, None,
        "a request quarantined the worker"
    );
    app.rent_ok(json!({})).await;
}

/// Every user and group of the worker image is a name no rent may ask for, so the list
/// Orion checks cannot fall behind the image.
#[tokio::test]
async fn every_user_and_group_of_the_worker_image_is_refused_as_a_username() {
    let image = std::env::var("ORION_TEST_WORKER_IMAGE")
        .expect("ORION_TEST_WORKER_IMAGE is not set: run the tests with scripts/test.sh");
    let names = crate::helpers::docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        &image,
        "-c",
        "cut -d: -f1 /etc/passwd /etc/group",
    ]);
    let names: Vec<&str> = names
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert!(names.contains(&"orion-tenants"), "{names:?}");
    for name in names {
        assert!(
            orion::model::Username::parse(name).is_err(),
            "`{name}` (a user or group of the worker image) is accepted as a username"
        );
    }
}

/// A name taken on the worker by an account that is not a rental's (made by hand, or by
/// the machine's owner) is the request's fault: 409, the worker stays in service and the
/// next rent is served there.
#[tokio::test]
async fn a_name_taken_on_the_worker_answers_409_and_the_worker_stays_in_service() {
    let app = spawn_app_with(1, Box::new(|_| {})).await;
    app.worker("worker_1")
        .exec("useradd --create-home localdev");
    let resp = app.rent(json!({"username": "localdev"})).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("localdev"),
        "{body}"
    );
    let w = app.worker_row("worker_1").await;
    assert_eq!(
        w.quarantine_reason, None,
        "the request quarantined the worker"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'account.name_taken'")
            .await,
        1
    );
    app.rent_ok(json!({})).await;
}

/// Probes until `worker` is quarantined (its host key changed): a probe over the kept
/// watch connection proves no new handshake, so the change is seen at the first probe
/// that makes one. Fails after 30 s.
pub(crate) async fn probe_until_quarantined(app: &crate::helpers::TestApp, worker: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.worker_row(worker).await.quarantine_reason.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "{worker} was never quarantined"
        );
        orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A quarantined worker shows why and since when, and one route returns it to service,
/// trusting its new host key when the operator says so.
#[tokio::test]
async fn a_quarantined_worker_shows_why_and_since_when_and_is_restored_by_the_operator() {
    let app = spawn_app_with(
        1,
        Box::new(|c| {
            // Every probe makes a new connection: a probe over the kept watch connection
            // would not see the host key change until `handshake_every` (5 min) is due.
            c.health.handshake_every = std::time::Duration::from_millis(1);
        }),
    )
    .await;
    app.worker("worker_1").rotate_host_keys();
    probe_until_quarantined(&app, "worker_1").await;
    let (_, workers) = app.get_json("/api/workers").await;
    let view = &workers["workers"][0];
    assert!(
        view["quarantine_reason"]
            .as_str()
            .unwrap()
            .contains("host key"),
        "{view}"
    );
    assert!(view["quarantined_at"].is_string(), "{view}");

    // Not a JSON body, an unknown field, an unknown worker: refused, nothing changed.
    let restore = app.url("/api/workers/worker_1/restore");
    let resp = app
        .http
        .post(&restore)
        .json(&json!({"forget": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = app
        .http
        .post(app.url("/api/workers/nope/restore"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(app.worker_row("worker_1").await.quarantine_reason.is_some());

    let resp = app
        .http
        .post(&restore)
        .json(&json!({"forget_host_key": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let view: Value = resp.json().await.unwrap();
    assert_eq!(view["quarantine_reason"], Value::Null, "{view}");
    assert_eq!(view["quarantined_at"], Value::Null, "{view}");
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM events WHERE kind = 'worker.restored' \
             AND message LIKE '%host key changed%' AND message LIKE '%trusted anew%'"
        )
        .await,
        1
    );
    // The next probes trust the key it presents now, and it is rented again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.worker_row("worker_1").await.status != orion::model::WorkerStatus::Alive {
        assert!(std::time::Instant::now() < deadline, "never alive again");
        orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
            .await
            .unwrap();
    }
    assert!(app.worker_row("worker_1").await.quarantine_reason.is_none());
    app.rent_ok(json!({})).await;
}

/// 80 log reads at once by one tenant used to hold every SSH session to the worker
/// (sshd's `MaxSessions` counts per connection, and Orion's own commands shared it):
/// meanwhile the app's instance, removed by hand, did not come back within 25 s. Now a
/// tenant's reads run on connections of their own, bounded per tenant and in all, and
/// what is over the bounds gets 429 with `Retry-After` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_s_log_reads_never_delay_orion_s_control_of_the_worker() {
    let app = spawn_app_with(1, Box::new(|_| {})).await;
    let (_, token) = app.tenant_token_with(json!({"tenant": "reader"})).await;
    let tenant = client_with_token(&token);
    let resp = tenant
        .post(app.url("/api/apps"))
        .json(&json!({"name": "chatty", "image": "orion/demo-app:latest", "replicas": 1, "port": 8080}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let view = crate::apps::wait_app(
        &app,
        "chatty?tenant=reader",
        std::time::Duration::from_secs(60),
        |v| v["ready"] == 1,
    )
    .await;
    let instance = crate::apps::running(&view)[0].clone();
    let container = instance["container"].as_str().unwrap().to_owned();
    let host = instance["host"].as_str().unwrap().to_owned();
    crate::apps::ask_until_up(&host, 8080).await;

    let url = app.url("/api/apps/chatty/logs?lines=1000");
    let reads: Vec<_> = (0..80)
        .map(|_| {
            let (tenant, url) = (tenant.clone(), url.clone());
            tokio::spawn(async move {
                let resp = tenant
                    .get(&url)
                    .timeout(std::time::Duration::from_secs(30))
                    .send()
                    .await
                    .expect("a log read was never answered");
                let retry_after = resp.headers().get("retry-after").cloned();
                (resp.status().as_u16(), retry_after)
            })
        })
        .collect();
    // Orion's own commands on the worker meanwhile: each gets its session at once.
    let target = app.worker_row("worker_1").await.target();
    let own: Vec<_> = (0..20)
        .map(|_| {
            let (ssh, target) = (app.ctx.ssh.clone(), target.clone());
            tokio::spawn(async move {
                let session = ssh.session(&target).await.map_err(|e| e.to_string())?;
                let out = session
                    .exec("true", None)
                    .await
                    .map_err(|e| e.to_string())?;
                session.close().await;
                out.success()
                    .then_some(())
                    .ok_or("`true` failed".to_owned())
            })
        })
        .collect();
    for command in own {
        if let Err(e) = command.await.unwrap() {
            panic!("one of Orion's own commands failed beside the tenant's reads: {e}");
        }
    }
    let removed = std::time::Instant::now();
    crate::helpers::docker(&["rm", "-f", &container]);
    let deadline = removed + std::time::Duration::from_secs(20);
    loop {
        if let Ok(answer) = crate::apps::ask(&host, 8080).await
            && answer["instance"].as_str() == Some(instance["id"].to_string().as_str())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removed instance never came back while the tenant read logs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    println!(
        "back {} ms after rm -f, under 80 log reads",
        removed.elapsed().as_millis()
    );
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for read in reads {
        let (status, retry_after) = read.await.unwrap();
        *statuses.entry(status).or_default() += 1;
        if status == 429 {
            assert!(retry_after.is_some(), "429 without Retry-After");
        }
    }
    println!("80 log reads at once: {statuses:?}");
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 70,
        "{statuses:?}"
    );
    assert!(
        statuses.keys().all(|s| [200, 429, 502].contains(s)),
        "{statuses:?}"
    );
}

/// Containers let any user bind a port below 1024 by default: a tenant could take port 22
/// in the moment sshd re-execs to load a new host certificate, and answer the next
/// logins itself. Workers keep the kernel's usual floor.
#[tokio::test]
async fn a_tenant_cannot_bind_a_privileged_port_on_its_worker() {
    let app = spawn_app_with(1, Box::new(|_| {})).await;
    let (key, public) = crate::helpers::tenant_key();
    let rental = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "squatter" }))
        .await;
    let port = rental["port"].as_u64().unwrap() as u16;
    let tried = crate::isolation::as_tenant(
        &app,
        port,
        "squatter",
        &key,
        "python3 -c 'import socket\nfor p in (23, 80, 1023):\n    s = socket.socket()\n    try:\n        s.bind((\"0.0.0.0\", p)); print(p, \"bound\")\n    except PermissionError:\n        print(p, \"refused\")' ; \
         python3 -c 'import socket; s = socket.socket(); s.bind((\"0.0.0.0\", 1024)); print(1024, \"bound\")'",
    )
    .await;
    assert_eq!(
        tried, "23 refused\n80 refused\n1023 refused\n1024 bound",
        "what the tenant could bind"
    );
}
