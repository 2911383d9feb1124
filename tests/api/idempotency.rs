//! `Idempotency-Key` on POST /api/rent and POST /api/apps: a retried request gets what
//! the first one made, never a second rental or app.

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

async fn rent_with_key(app: &TestApp, key: &str, body: Value) -> (u16, bool, Value) {
    let resp = app
        .http
        .post(app.url("/api/rent"))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    (status, replayed, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_retried_rent_with_its_key_gets_the_same_rental_and_never_a_second() {
    let app = spawn_app(3).await;
    let (status, replayed, first) = rent_with_key(&app, "k-1", json!({ "username": "ida" })).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    assert!(
        first["password"].is_string(),
        "the first answer shows the password"
    );

    // The same request again, its fields written otherwise: the same rental, no password.
    let (status, replayed, again) = rent_with_key(&app, "k-1", json!({ "username": "ida" })).await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again["id"], first["id"]);
    assert!(
        again.get("password").is_none(),
        "a password is never stored: {again}"
    );
    let live = "SELECT COUNT(*) FROM rentals WHERE status NOT IN ('released', 'failed')";
    assert_eq!(app.count(live).await, 1);

    // The same key with another request: refused, nothing made.
    let (status, _, err) = rent_with_key(&app, "k-1", json!({ "username": "other" })).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["field"], "Idempotency-Key");
    assert_eq!(app.count(live).await, 1);

    // Another tenant's key of the same text is its own.
    let (_, token) = app.tenant_token("acme").await;
    let tenant = crate::helpers::client_with_token(&token);
    let resp = tenant
        .post(app.url("/api/rent"))
        .header("Idempotency-Key", "k-1")
        .json(&json!({ "username": "ida2" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(app.count(live).await, 2);

    // A bad key is refused before anything is made.
    let (status, _, _) = rent_with_key(&app, "has space", json!({})).await;
    assert_eq!(status, 422);
    assert_eq!(app.count(live).await, 2);
}

#[tokio::test]
async fn concurrent_retries_of_one_key_make_one_rental() {
    let app = spawn_app(3).await;
    let answers = futures::future::join_all(
        (0..8).map(|_| rent_with_key(&app, "burst", json!({ "username": "bo" }))),
    )
    .await;
    let made: Vec<&Value> = answers
        .iter()
        .filter(|(status, _, _)| *status == 201)
        .map(|(_, _, body)| body)
        .collect();
    assert!(!made.is_empty(), "{answers:?}");
    assert!(made.iter().all(|b| b["id"] == made[0]["id"]), "{answers:?}");
    // The others were told the first is still running.
    assert!(
        answers.iter().all(|(s, _, _)| *s == 201 || *s == 409),
        "{answers:?}"
    );
    let live = "SELECT COUNT(*) FROM rentals WHERE status NOT IN ('released', 'failed')";
    assert_eq!(app.count(live).await, 1);
    // Once it is done, a retry gets it.
    let (status, replayed, body) = rent_with_key(&app, "burst", json!({ "username": "bo" })).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(body["id"], made[0]["id"]);
}

#[tokio::test]
async fn a_key_whose_request_died_without_a_rental_runs_again_after_the_deadline() {
    let app = spawn_app(2).await;
    // What a replica that died mid-rent leaves: the key running, its rental never made.
    sqlx::query(
        "INSERT INTO idempotency_keys (tenant, route, idem_key, request_hash, resource_id, created_at) \
         VALUES ('admin', 'rent', 'lost', ?, 'never-made', UTC_TIMESTAMP(6))",
    )
    .bind(orion_request_hash(br#"{"username": "lu"}"#))
    .execute(app.ctx.store.pool())
    .await
    .unwrap();
    let (status, _, body) = rent_with_key(&app, "lost", json!({ "username": "lu" })).await;
    assert_eq!(status, 409, "still within its deadline: {body}");
    sqlx::query("UPDATE idempotency_keys SET created_at = created_at - INTERVAL 1 HOUR")
        .execute(app.ctx.store.pool())
        .await
        .unwrap();
    let (status, replayed, body) = rent_with_key(&app, "lost", json!({ "username": "lu" })).await;
    assert_eq!((status, replayed), (201, false), "{body}");
    let (status, replayed, again) = rent_with_key(&app, "lost", json!({ "username": "lu" })).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again["id"], body["id"]);
}

/// A replica died in the middle of a rent: it had claimed a worker and made the account,
/// not yet recorded the activation. The client's retry does not wait out the rent's
/// deadline: the process has stopped saying it is alive, so the retry ends what it left
/// (which can then never become active) and rents again at once. A process that is
/// alive keeps its key (409).
#[tokio::test]
async fn a_key_whose_process_stopped_runs_again_at_once_and_its_leftover_never_comes_alive() {
    let app = spawn_app(2).await;
    let body = json!({ "username": "vic" });
    let (status, _, first) = rent_with_key(&app, "cut", body.clone()).await;
    assert_eq!(status, 201, "{first}");
    let first_id = first["id"].as_str().unwrap().to_owned();
    // Back to what the dead process left: provisioning, the key running, its process
    // known and alive a moment ago.
    for statement in [
        "UPDATE rentals SET status = 'provisioning' WHERE id = ?",
        "UPDATE placements SET state = 'provisioning' WHERE rental_id = ?",
        "UPDATE idempotency_keys SET done_at = NULL, holder = 'replica-b#0001' \
         WHERE resource_id = ?",
    ] {
        sqlx::query(statement)
            .bind(&first_id)
            .execute(app.ctx.store.pool())
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO replicas (holder, instance, started_at, seen_at) \
         VALUES ('replica-b#0001', 'replica-b', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
    )
    .execute(app.ctx.store.pool())
    .await
    .unwrap();
    let (status, _, answer) = rent_with_key(&app, "cut", body.clone()).await;
    assert_eq!(status, 409, "its process is alive: {answer}");

    // It stops saying so.
    sqlx::query("UPDATE replicas SET seen_at = seen_at - INTERVAL 1 MINUTE")
        .execute(app.ctx.store.pool())
        .await
        .unwrap();
    let (status, replayed, second) = rent_with_key(&app, "cut", body.clone()).await;
    assert_eq!((status, replayed), (201, false), "{second}");
    assert_ne!(second["id"], first["id"]);
    let (status, replayed, again) = rent_with_key(&app, "cut", body).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again["id"], second["id"]);
    // What it left is failed, and can never be activated by a process that was only
    // paused and resumes.
    let left = app.ctx.store.rental(&first_id).await.unwrap().unwrap();
    assert_eq!(left.status, orion::model::RentalStatus::Failed);
    let worker = app
        .ctx
        .store
        .worker_by_name(first["worker"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !app.ctx
            .store
            .activate(
                &first_id,
                &worker,
                orion::model::RentalStatus::Provisioning,
                None
            )
            .await
            .unwrap()
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM rentals WHERE status = 'active'")
            .await,
        1,
        "one live rental for the key"
    );
    // Whatever rental the cut-short request was making (it may have moved on to another
    // worker under another id), its activation needs the key, which the retry now holds.
    let second_id = second["id"].as_str().unwrap();
    sqlx::query("UPDATE rentals SET status = 'provisioning' WHERE id = ?")
        .bind(second_id)
        .execute(app.ctx.store.pool())
        .await
        .unwrap();
    let second_worker = app
        .ctx
        .store
        .worker_by_name(second["worker"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    let hold = |holder: &str| orion::store::KeyHold {
        tenant: "admin".into(),
        route: "rent",
        key: "cut".into(),
        holder: holder.into(),
    };
    let provisioning = orion::model::RentalStatus::Provisioning;
    let store = &app.ctx.store;
    assert!(
        !store
            .activate(
                second_id,
                &second_worker,
                provisioning,
                Some(&hold("replica-b#0001"))
            )
            .await
            .unwrap(),
        "the process that lost the key cannot activate"
    );
    assert!(
        store
            .activate(
                second_id,
                &second_worker,
                provisioning,
                Some(&hold(app.ctx.leader.holder()))
            )
            .await
            .unwrap(),
        "the process that holds it can"
    );
}

/// The hash the API keeps for a body (keys sorted, SHA-256).
fn orion_request_hash(body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let value: Value = serde_json::from_slice(body).unwrap();
    format!(
        "{:x}",
        Sha256::digest(serde_json::to_string(&value).unwrap())
    )
}

#[tokio::test]
async fn a_retried_app_creation_with_its_key_gets_the_same_app() {
    let app = spawn_app(1).await;
    let create = || {
        app.http
            .post(app.url("/api/apps"))
            .header("Idempotency-Key", "app-1")
            .json(&json!({ "name": "web", "image": "orion/demo-app", "replicas": 0 }))
            .send()
    };
    let first = create().await.unwrap();
    assert_eq!(first.status(), 201);
    let again = create().await.unwrap();
    assert_eq!(again.status(), 201, "a replay, not 409 name taken");
    assert!(again.headers().get("idempotent-replayed").is_some());
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["name"], "web");
    assert_eq!(app.count("SELECT COUNT(*) FROM apps").await, 1);
}
