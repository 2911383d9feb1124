//! What every request goes through before a handler: cross-site requests (a page on
//! another site driving a logged-in browser), the rate limit on requests without a
//! valid token, and what the open `/health` tells.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, client_with_token, spawn_app};

#[tokio::test]
async fn a_cross_site_form_post_with_the_admins_browser_login_rents_nothing() {
    let app = spawn_app(1).await;
    // What a page on another site can make a browser send without asking Orion first:
    // a form (three encodings) or a body-less fetch, with the Basic credentials the
    // browser cached for the dashboard.
    let browser = reqwest::Client::new();
    let rent = app.url("/api/rent");
    let body = r#"{"username": "mallory"}"#;
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let resp = browser
            .post(&rent)
            .basic_auth("operator", Some(ADMIN_TOKEN))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 415, "{content_type}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unsupported_media_type", "{err}");
    }
    for (method, path) in [
        ("POST", "/api/rent"),
        ("POST", "/api/workers/worker_1/drain"),
        ("DELETE", "/api/tokens/x"),
    ] {
        let resp = browser
            .request(method.parse().unwrap(), app.url(path))
            .basic_auth("operator", Some(ADMIN_TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "body-less {method} {path}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unauthorized", "{err}");
        assert!(
            !err.to_string().contains(ADMIN_TOKEN),
            "the token is never echoed"
        );
    }
    // Even JSON: Basic credentials never change anything.
    let resp = browser
        .post(&rent)
        .basic_auth("operator", Some(ADMIN_TOKEN))
        .json(&json!({ "username": "mallory" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, 0);
    assert!(!app.worker_row("worker_1").await.drained);
    assert!(!app.worker("worker_1").has_user("mallory"));

    // A Bearer token does not excuse a body of another type.
    let resp = app
        .http
        .post(&rent)
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    assert_eq!(app.count("SELECT COUNT(*) FROM rentals").await, 0);

    // What the dashboard does keeps working: reading with Basic credentials.
    for path in ["/api/workers", "/api/rentals", "/dashboard"] {
        let resp = browser
            .get(app.url(path))
            .basic_auth("operator", Some(ADMIN_TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    // And what clients do: JSON with a Bearer token, or no body at all.
    let rental = app.rent_ok(json!({ "username": "alice" })).await;
    let resp = app
        .http
        .post(app.url("/api/workers/worker_1/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = rental["id"].as_str().unwrap();
    assert_eq!(app.release(id).await, 204);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_junk_tokens_is_refused_before_the_database_and_tenants_still_rent() {
    const FLOOD: usize = 400;
    let app = spawn_app(2).await;
    let (_, tenant_token) = app.tenant_token("acme").await;
    let burst = u64::from(app.ctx.config.http.anonymous_burst);
    let per_second = app.ctx.config.http.anonymous_per_second;
    let admitted_before = app.ctx.limiter.admitted();
    // The limits' clock stands still but when the test moves it: what is allowed does not
    // depend on how fast the machine answers the flood.
    let clock = &app.ctx.clock;
    let started = clock.stop();

    // A tenant behind the same proxy as the flood (loopback is a trusted proxy; the
    // tenant's own address comes in X-Forwarded-For, as Caddy sends it).
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "authorization",
        format!("Bearer {tenant_token}").parse().unwrap(),
    );
    headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let tenant = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();

    let junk = client_with_token("orn_junkjunkjunkjunkjunkjunkjunkjunk");
    let flood = futures::future::join_all((0..FLOOD).map(|i| {
        let junk = junk.clone();
        let url = app.url(if i % 2 == 0 {
            "/api/rentals"
        } else {
            "/api/rent"
        });
        async move {
            let resp = if url.ends_with("/rent") {
                junk.post(url).json(&json!({})).send().await
            } else {
                junk.get(url).send().await
            }
            .expect("the server answers");
            let status = resp.status();
            let retry_after = resp.headers().get("retry-after").cloned();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (status, retry_after, body)
        }
    }));
    let rent = async {
        let resp = tenant
            .post(app.url("/api/rent"))
            .json(&json!({ "username": "tina" }))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json::<Value>().await.unwrap())
    };
    let admin_rent = async { app.rent(json!({ "username": "adam" })).await.status() };
    let (answers, (rent_status, rental), admin_status) = tokio::join!(flood, rent, admin_rent);
    let elapsed = (clock.now() - started).as_secs_f64();

    assert_eq!(
        rent_status, 201,
        "the tenant's rent during the flood: {rental}"
    );
    assert_eq!(rental["tenant"], "acme");
    assert_eq!(admin_status, 201, "the admin is never limited");
    let limited: Vec<_> = answers
        .iter()
        .filter(|(status, _, _)| *status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    let refused_401 = answers
        .iter()
        .filter(|(status, _, _)| *status == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(limited.len() + refused_401, FLOOD, "only 401 and 429");
    // Each address gets `burst` turns, then `per_second`; the clock stood still, so
    // exactly the burst of junk tokens was looked up in the database, and the tenant's
    // one turn (given back).
    let allowance = burst + (elapsed * per_second).ceil() as u64;
    let looked_up = app.ctx.limiter.admitted() - admitted_before;
    assert_eq!(
        looked_up,
        allowance + 1,
        "turns taken (tenant's included) over {elapsed:.2} s of the limits' clock"
    );
    assert_eq!(
        refused_401 as u64, allowance,
        "junk tokens that reached the lookup"
    );
    for (_, retry_after, body) in &limited {
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        let wait: u64 = retry_after
            .as_ref()
            .expect("Retry-After")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    }
    assert_eq!(
        app.count("SELECT COUNT(*) FROM rentals").await,
        2,
        "the tenant's and the admin's"
    );

    // The flooding address is still refused, without a lookup…
    let admitted = app.ctx.limiter.admitted();
    let mut still_limited = 0;
    for _ in 0..3 {
        let resp = junk.get(app.url("/api/rentals")).send().await.unwrap();
        still_limited += usize::from(resp.status() == 429);
    }
    assert_eq!(still_limited, 3, "{still_limited} of 3 limited");
    assert_eq!(
        app.ctx.limiter.admitted(),
        admitted,
        "no lookup while refused"
    );
    // …until a turn comes back, one per `1 / per_second`: exactly one.
    clock.advance(Duration::from_secs_f64(1.0 / per_second));
    let resp = junk.get(app.url("/api/rentals")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "the turn that came back");
    let resp = junk.get(app.url("/api/rentals")).send().await.unwrap();
    assert_eq!(resp.status(), 429, "and only one");
    // …while a tenant's good token costs its address nothing: far more than the burst
    // passes from the tenant's address.
    for _ in 0..(burst * 2) {
        let resp = tenant.get(app.url("/api/rentals")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (_, status) = app.get_json("/api/status").await;
    assert!(
        status["rate_limited"].as_u64().unwrap() >= limited.len() as u64,
        "{status}"
    );
}

#[tokio::test]
async fn health_is_open_and_tells_nothing_but_up_and_the_database() {
    let app = spawn_app(1).await;
    let anonymous = reqwest::Client::new();
    let resp = anonymous.get(app.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let health: Value = resp.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"], "up");
    assert!(
        health.get("workers").is_none() && health.get("loops").is_none(),
        "{health}"
    );

    // The details are the admin's.
    let (_, tenant_token) = app.tenant_token("acme").await;
    let resp = client_with_token(&tenant_token)
        .get(app.url("/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = anonymous.get(app.url("/api/status")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let (status, details) = app.get_json("/api/status").await;
    assert_eq!(status, 200);
    assert_eq!(details["workers"]["alive"], 1);
    assert!(
        details["loops"]["health"]["last_success"].is_string(),
        "{details}"
    );
}
