use serde_json::{Value, json};

use crate::helpers::{client_with_token, spawn_app};

#[tokio::test]
async fn api_calls_without_a_valid_token_get_401_and_health_stays_open() {
    let app = spawn_app(1).await;
    let anonymous = reqwest::Client::new();
    for (method, path) in [
        ("POST", "/api/rent"),
        ("GET", "/api/rentals"),
        ("GET", "/api/workers"),
        ("GET", "/api/tokens"),
    ] {
        let resp = anonymous
            .request(method.parse().unwrap(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{method} {path}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unauthorized");
    }
    let forged = client_with_token("orn_not-a-real-token-at-all-000000");
    assert_eq!(
        forged
            .get(app.url("/api/rentals"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        anonymous
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, 0);
}

#[tokio::test]
async fn tenants_see_and_release_only_their_own_rentals() {
    let app = spawn_app(2).await;
    let (_, acme_token) = app.tenant_token("acme").await;
    let (globex_id, globex_token) = app.tenant_token("globex").await;
    let acme = client_with_token(&acme_token);
    let globex = client_with_token(&globex_token);

    let rental: Value = acme
        .post(app.url("/api/rent"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = rental["id"].as_str().unwrap();
    assert_eq!(rental["tenant"], "acme");
    let path = app.url(&format!("/api/rentals/{id}"));

    assert_eq!(acme.get(&path).send().await.unwrap().status(), 200);
    assert_eq!(
        globex.get(&path).send().await.unwrap().status(),
        404,
        "another tenant's rental is invisible"
    );
    assert_eq!(globex.delete(&path).send().await.unwrap().status(), 404);
    let list: Value = globex
        .get(app.url("/api/rentals"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["rentals"].as_array().unwrap().len(), 0);
    let (_, all) = app.get_json("/api/rentals").await;
    assert_eq!(
        all["rentals"].as_array().unwrap().len(),
        1,
        "the admin sees every tenant's"
    );

    // Admin routes are refused to tenants.
    assert_eq!(
        acme.get(app.url("/api/workers"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let resp = acme
        .post(app.url("/api/tokens"))
        .json(&json!({ "tenant": "acme" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "forbidden");

    // Tokens are listed without their secret and stored only as hashes.
    let (_, tokens) = app.get_json("/api/tokens").await;
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 2);
    assert!(!tokens.to_string().contains(&acme_token));
    let stored = app
        .count(&format!(
            "SELECT COUNT(*) FROM tokens WHERE token_hash LIKE '%{}%'",
            &acme_token[4..]
        ))
        .await;
    assert_eq!(stored, 0);
    let in_events = app
        .count(&format!(
            "SELECT COUNT(*) FROM events WHERE message LIKE '%{}%'",
            &acme_token[4..]
        ))
        .await;
    assert_eq!(in_events, 0);

    // Revoked: the token stops working at once.
    let resp = app
        .http
        .delete(app.url(&format!("/api/tokens/{globex_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        globex
            .get(app.url("/api/rentals"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // The owner releases its rental.
    assert_eq!(acme.delete(&path).send().await.unwrap().status(), 204);
}

#[tokio::test]
async fn token_requests_are_validated() {
    let app = spawn_app(1).await;
    for (body, status) in [
        (json!({}), 422),
        (json!({ "tenant": "admin" }), 422),
        (json!({ "tenant": "a b" }), 422),
        (json!({ "tenant": "ok", "extra": 1 }), 400),
    ] {
        let resp = app
            .http
            .post(app.url("/api/tokens"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM tokens").await, 0);
}
