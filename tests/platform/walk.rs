//! End to end, exactly the README's walk: the docker-compose platform started by
//! `scripts/platform.sh up`, a rent through Caddy over HTTPS, an SSH login, `docker stop`
//! of the rented worker, the same login on the new worker, a MariaDB outage answered
//! with 503 JSON through Caddy, and a `down`/`up` that keeps the rentals.
//!
//! It runs its own platform (project `orion-e2e`, its own ports and worker names), so
//! it never touches a platform a developer has running.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use orion::testkit::platform::Platform;
use orion::testkit::{docker, tenant_key};
use serde_json::{Value, json};

use crate::{tenant_login, wait_for};

const PROJECT: &str = "orion-e2e";

#[tokio::test]
async fn the_readme_walk_through_caddy_over_https() {
    let platform = Platform::new(PROJECT, 3, Path::new(env!("CARGO_BIN_EXE_orion")));
    let gateway = *platform.gateway.start();
    // A previous run killed mid-way may have left its platform: start clean.
    platform.script(&["down", "--volumes"]);
    assert!(
        platform.script(&["up", "3"]),
        "scripts/platform.sh up failed"
    );

    let http = platform.client();
    let base = format!("https://localhost:{}", platform.https_port);

    // Bad input is refused with the JSON error shape and its true status, through Caddy.
    let resp = http
        .post(format!("{base}/api/rent"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "bad_request");
    // A body over the limit, sent with a Content-Length (as curl does): 413, not a 503
    // that a client would retry.
    let huge = format!("{{\"username\": \"{}\"}}", "a".repeat(1024 * 1024));
    let resp = http
        .post(format!("{base}/api/rent"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "too_large");
    // A page on another site posting a form with the dashboard's Basic login: refused,
    // with Orion's own status and error through Caddy.
    let browser = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&platform.caddy_root()).unwrap())
        .build()
        .unwrap();
    let resp = browser
        .post(format!("{base}/api/rent"))
        .basic_auth("operator", Some(platform.admin_token()))
        .header("content-type", "text/plain")
        .body(r#"{"username": "mallory"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unsupported_media_type");
    let resp = browser
        .post(format!("{base}/api/rent"))
        .basic_auth("operator", Some(platform.admin_token()))
        .json(&json!({ "username": "mallory" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unauthorized");
    apps_through_caddy(&platform, &http, &base).await;
    // Open: up and the database, nothing about the fleet.
    let health: Value = browser
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["database"], "up");
    assert!(health.get("workers").is_none(), "{health}");
    // Junk tokens are rate limited per client (Caddy forwards the client's address):
    // 429 with Orion's error and Retry-After, through Caddy.
    let junk = orion::testkit::client_with_token_and_ca(
        "orn_junkjunkjunkjunkjunkjunkjunkjunk",
        &platform.caddy_root(),
    );
    let answers =
        futures::future::join_all((0..60).map(|_| junk.get(format!("{base}/api/rentals")).send()))
            .await;
    let limited: Vec<_> = answers
        .into_iter()
        .map(|r| r.unwrap())
        .filter(|r| r.status() == 429)
        .collect();
    assert!(limited.len() >= 20, "{} of 60 limited", limited.len());
    let first = limited.into_iter().next().unwrap();
    assert!(first.headers().contains_key("retry-after"));
    let err: Value = first.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limited");

    // Rent with a key, log in.
    let (key, public) = tenant_key();
    let resp = http
        .post(format!("{base}/api/rent"))
        .json(&json!({ "ssh_public_key": public, "username": "olga" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let rental: Value = resp.json().await.unwrap();
    let id = rental["id"].as_str().unwrap().to_owned();
    let first = rental["worker"].as_str().unwrap().to_owned();
    assert_eq!(rental["host"], "localhost");
    let port = rental["port"].as_u64().unwrap() as u16;
    assert_eq!(
        tenant_login(port, "olga", key.clone()).await.unwrap(),
        "olga"
    );
    // Its endpoint on the gateway, published by the orion container.
    assert_eq!(rental["endpoint"]["host"], "localhost", "{rental}");
    let endpoint = rental["endpoint"]["port"].as_u64().unwrap() as u16;
    assert!((gateway..gateway + 4).contains(&endpoint), "{rental}");
    assert_eq!(
        tenant_login(endpoint, "olga", key.clone()).await.unwrap(),
        "olga"
    );

    // The dashboard, through Caddy: a browser's Basic login with the admin token.
    let token = platform.admin_token();
    let page = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&platform.caddy_root()).unwrap())
        .build()
        .unwrap()
        .get(format!("{base}/dashboard"))
        .basic_auth("operator", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(&first) && html.contains("olga"),
        "the dashboard shows the worker and its tenant: {html}"
    );

    // The drill: docker stop the rented worker; the rental moves; the same key works.
    docker(&["stop", &platform.worker(&first)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let moved = loop {
        if let Ok(resp) = http.get(format!("{base}/api/rentals/{id}")).send().await
            && let Ok(r) = resp.json::<Value>().await
            && r["status"] == "active"
            && r["worker"] != first.as_str()
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the rental did not move within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let new_port = moved["port"].as_u64().unwrap() as u16;
    assert_ne!(new_port, port);
    assert_eq!(
        moved["endpoint"], rental["endpoint"],
        "the endpoint never changes"
    );
    assert_eq!(
        tenant_login(endpoint, "olga", key.clone()).await.unwrap(),
        "olga"
    );
    assert_eq!(
        tenant_login(new_port, "olga", key.clone()).await.unwrap(),
        "olga"
    );

    // MariaDB goes away: 503 JSON through Caddy, the tenant keeps working; it comes back.
    let mariadb = platform.container("mariadb");
    docker(&["stop", &mariadb]);
    let resp = http
        .get(format!("{base}/api/workers"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unavailable");
    assert_eq!(
        tenant_login(new_port, "olga", key.clone()).await.unwrap(),
        "olga"
    );
    docker(&["start", &mariadb]);
    wait_for("the API to answer again", Duration::from_secs(90), || {
        let http = http.clone();
        let url = format!("{base}/api/rentals/{id}");
        async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;

    // down, then up: the rental and the workers' state survive in the volume.
    assert!(platform.script(&["down"]), "platform.sh down failed");
    assert!(
        platform.script(&["up", "3"]),
        "platform.sh up (again) failed"
    );
    // New connections: the old ones went with the old Caddy.
    let http = platform.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after: Value = loop {
        match http.get(format!("{base}/api/rentals/{id}")).send().await {
            Ok(resp) if resp.status() == 200 => break resp.json().await.unwrap(),
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no rental after the restart: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(after["worker"], moved["worker"]);
    assert_eq!(after["placements"].as_array().unwrap().len(), 2);
    // Probing resumed: every worker has been checked since the restart.
    let restarted = chrono::Utc::now() - chrono::Duration::seconds(120);
    wait_for("probes after the restart", Duration::from_secs(60), || {
        let http = http.clone();
        let url = format!("{base}/api/workers");
        async move {
            let Ok(resp) = http.get(url).send().await else {
                return false;
            };
            let Ok(w) = resp.json::<Value>().await else {
                return false;
            };
            w["workers"].as_array().is_some_and(|ws| {
                ws.iter().all(|w| {
                    w["last_checked"]
                        .as_str()
                        .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                        .is_some_and(|t| t > restarted)
                })
            })
        }
    })
    .await;
    assert_eq!(tenant_login(new_port, "olga", key).await.unwrap(), "olga");
}

/// An app of 2 replicas answers through Caddy on its own origin,
/// `<name>.apps.localhost`, spread over both instances; deleted, its address answers
/// a JSON 404. It never shares the API's origin (#24): there is no path to it on the
/// site's host, and no credential a browser or client attaches (the admin's Basic login
/// to the dashboard, a cookie) reaches an instance.
async fn apps_through_caddy(platform: &Platform, http: &reqwest::Client, base: &str) {
    let resp = http
        .post(format!("{base}/api/apps"))
        .json(
            &json!({"name": "walk", "image": "orion/demo-app:latest", "replicas": 2, "port": 8080}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let view: Value = resp.json().await.unwrap();
    assert_eq!(view["url"], "https://walk.apps.localhost/");
    let host_url = format!("{}hello", platform.app_url("walk"));
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "both instances never answered through Caddy: {seen:?}"
        );
        if let Ok(resp) = http.get(&host_url).send().await
            && let Ok(body) = resp.json::<Value>().await
            && body["path"] == "/hello"
        {
            seen.insert(body["instance"].as_str().unwrap_or("").to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The admin logged into the dashboard with Basic credentials, a cookie, a proxy
    // login: the instance sees none of them (the client also sends its Bearer token).
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("admin:{}", platform.admin_token()));
    let body: Value = http
        .get(&host_url)
        .header("Authorization", format!("Basic {basic}"))
        .header("Proxy-Authorization", format!("Basic {basic}"))
        .header("Cookie", "session=admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["app"], "walk", "{body}");
    for header in ["authorization", "proxy-authorization", "cookie"] {
        assert!(
            body["headers"].get(header).is_none(),
            "the instance received {header}: {body}"
        );
    }
    let seen = body["headers"].to_string();
    assert!(
        !seen.contains(&platform.admin_token()) && !seen.contains(&basic),
        "the admin token reached the instance: {body}"
    );
    // On the API's host there is no path to the app: Orion answers, not the instance.
    let resp = http
        .get(format!("{base}/apps/walk/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body.get("app").is_none(),
        "the app answered on the API's host: {body}"
    );
    let resp = http
        .delete(format!("{base}/api/apps/walk"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    wait_for("the app's route to go", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), host_url.clone());
        async move {
            let Ok(resp) = http.get(url).send().await else {
                return false;
            };
            resp.status() == 404
                && resp
                    .json::<Value>()
                    .await
                    .is_ok_and(|b| b["error"]["code"] == "not_found")
        }
    })
    .await;
}
