//! Apps behind a real Caddy: Orion keeps Caddy's routes in sync with each app's running
//! instances through Caddy's admin API on a unix socket.

use std::time::{Duration, Instant};

use orion::testkit::{client_with_token, docker, free_port};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_with};

const CADDYFILE: &str = r#"{
	admin unix//run/caddy-admin/admin.sock
}
*.apps.localhost {
	tls internal
	respond `{"error":{"code":"not_found","message":"no app has this name"}}` 404
}
localhost {
	tls internal
	respond `{"error":{"code":"not_found","message":"no such route"}}` 404
}
"#;

/// A Caddy container with its admin API on a unix socket in a directory of the test's,
/// HTTPS published on loopback. Removed when dropped.
struct Caddy {
    container: String,
    port: u16,
    dir: tempfile::TempDir,
}

impl Caddy {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Caddyfile"), CADDYFILE).unwrap();
        std::fs::create_dir(dir.path().join("admin")).unwrap();
        let port = free_port();
        let container = format!("orion-test-caddy-{port}");
        let config = format!(
            "{}:/etc/caddy/Caddyfile:ro",
            dir.path().join("Caddyfile").display()
        );
        let admin = format!("{}:/run/caddy-admin", dir.path().join("admin").display());
        let publish = format!("127.0.0.1:{port}:443");
        docker(&[
            "run",
            "-d",
            "--name",
            &container,
            "--label",
            "orion.test=1",
            "-p",
            &publish,
            "-v",
            &config,
            "-v",
            &admin,
            "orion/caddy:latest",
        ]);
        let caddy = Self {
            container,
            port,
            dir,
        };
        caddy.wait_for_admin();
        caddy
    }

    fn socket(&self) -> orion::config::CaddyAdmin {
        orion::config::CaddyAdmin::Unix(self.dir.path().join("admin/admin.sock"))
    }

    fn wait_for_admin(&self) {
        let socket = self.dir.path().join("admin/admin.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "Caddy's admin socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client that reaches `localhost` and `web.apps.localhost` on this Caddy.
    fn client(&self) -> reqwest::Client {
        self.client_for(&["web"])
    }

    /// A client that reaches `localhost` and each `<app>.apps.localhost` on this Caddy.
    fn client_for(&self, apps: &[&str]) -> reqwest::Client {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut builder = reqwest::Client::builder()
            // Caddy's internal CA: the TLS itself is the platform test's to check.
            .danger_accept_invalid_certs(true)
            .resolve("localhost", addr)
            .timeout(Duration::from_secs(5));
        for app in apps {
            builder = builder.resolve(&format!("{app}.apps.localhost"), addr);
        }
        builder.build().unwrap()
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
    }
}

/// A Caddy, and an Orion with `workers` workers keeping that Caddy's routes.
async fn routed(workers: usize) -> (Caddy, TestApp) {
    let caddy = Caddy::start();
    let socket = caddy.socket();
    let app = spawn_app_with(
        workers,
        Box::new(move |c| {
            c.caddy.admin = Some(socket);
            c.apps.interval = Duration::from_secs(2);
        }),
    )
    .await;
    (caddy, app)
}

async fn wait_app(app: &TestApp, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = app.get_json("/api/apps/web").await;
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "app never reached the state: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests `url` until `pred` holds on (status, body), or fails after 20 s.
async fn until(client: &reqwest::Client, url: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(resp) = client.get(url).send().await {
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if pred(status, &body) {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} never answered as expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_is_served_through_caddy_at_a_stable_address_that_follows_its_instances() {
    let (caddy, app) = routed(2).await;
    let resp = app
        .http
        .post(app.url("/api/apps"))
        .json(
            &json!({"name": "web", "image": "orion/demo-app:latest", "replicas": 2, "port": 8080}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let view = wait_app(&app, |v| v["ready"] == 2).await;
    assert_eq!(view["url"], "https://web.apps.localhost/");
    let http = caddy.client();

    // The app's own origin; requests are spread over both instances.
    let path_url = caddy.url("web.apps.localhost", "/hello");
    until(&http, &path_url, |s, b| s == 200 && b["path"] == "/hello").await;
    // Caddy is told within a pass of Orion seeing them run.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "requests only went to {seen:?}");
        let b: Value = http
            .get(&path_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        seen.insert(b["instance"].as_str().unwrap().to_owned());
    }
    let host_url = caddy.url("web.apps.localhost", "/");
    until(&http, &host_url, |s, b| s == 200 && b["app"] == "web").await;
    // No path to the app on the site's host, where the API and the dashboard are.
    let on_site = caddy.url("localhost", "/apps/web/hello");
    until(&http, &on_site, |s, b| s == 404 && b.get("app").is_none()).await;

    // An instance killed by hand under load: no request fails.
    let container = view["instances"][0]["container"]
        .as_str()
        .unwrap()
        .to_owned();
    let load = {
        let http = http.clone();
        let url = path_url.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..150 {
                let status = match http.get(&url).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                statuses.push(status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    docker(&["rm", "-f", &container]);
    let statuses = load.await.unwrap();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "{} requests during an instance kill: {failed} failed",
        statuses.len()
    );
    assert_eq!(failed, 0, "{statuses:?}");

    // Caddy restarted: its routes come back from Orion, with no hand work.
    docker(&["restart", &caddy.container]);
    caddy.wait_for_admin();
    until(&http, &path_url, |s, _| s == 200).await;

    // Scaled to zero: 503 in Orion's JSON shape; deleted: the route is gone.
    let resp = app
        .http
        .patch(app.url("/api/apps/web"))
        .json(&json!({"replicas": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = until(&http, &path_url, |s, _| s == 503).await;
    assert_eq!(body["error"]["code"], "no_instance");
    let resp = app
        .http
        .delete(app.url("/api/apps/web"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    until(&http, &host_url, |s, b| {
        s == 404 && b["error"]["code"] == "not_found"
    })
    .await;
}

#[tokio::test]
async fn an_app_name_is_an_address_no_other_tenant_can_claim() {
    let app = spawn_app_with(1, Box::new(|_| {})).await;
    let (_, alice) = app.tenant_token_with(json!({"tenant": "alice"})).await;
    let (_, bob) = app.tenant_token_with(json!({"tenant": "bob"})).await;
    let body = json!({"name": "shop", "image": "orion/demo-app", "replicas": 0, "port": 8080});
    let resp = client_with_token(&alice)
        .post(app.url("/api/apps"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client_with_token(&bob)
        .post(app.url("/api/apps"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "conflict", "{answer}");
    let resp = client_with_token(&bob)
        .post(app.url("/api/apps"))
        .json(&json!({"name": "shop", "image": "orion/demo-app", "health_path": "no-slash"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
}

/// A browser logged into the dashboard sends the admin's Basic credentials with every
/// request to the API's origin; an app's instance must never receive those, nor any
/// other credential a client attaches (#24: an app that printed its request headers read
/// the admin token back through its logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_never_receives_the_credentials_a_client_attaches() {
    let (caddy, app) = routed(1).await;
    let resp = app
        .http
        .post(app.url("/api/apps"))
        .json(
            &json!({"name": "web", "image": "orion/demo-app:latest", "replicas": 1, "port": 8080}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    wait_app(&app, |v| v["ready"] == 1).await;
    let http = caddy.client();
    let url = caddy.url("web.apps.localhost", "/whoami");
    until(&http, &url, |s, _| s == 200).await;
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("admin:{}", orion::testkit::ADMIN_TOKEN),
    );
    let body: Value = http
        .get(&url)
        .header("Authorization", format!("Basic {basic}"))
        .header(
            "Proxy-Authorization",
            format!("Bearer {}", orion::testkit::ADMIN_TOKEN),
        )
        .header("Cookie", "session=the-admins")
        .header("X-Kept", "yes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let headers = &body["headers"];
    assert_eq!(headers["x-kept"], "yes", "{body}");
    for name in ["authorization", "proxy-authorization", "cookie"] {
        assert!(
            headers.get(name).is_none(),
            "the instance got {name}: {body}"
        );
    }
    assert!(
        !body.to_string().contains(orion::testkit::ADMIN_TOKEN),
        "the admin token reached the instance: {body}"
    );
}

/// A route Caddy refuses (a `health_path` it cannot parse, from a row made before
/// `health_path` was checked as Caddy parses it) is reported on its app, and every
/// other app is still served, one created afterwards included (#24: one app's `/%`
/// stopped the whole sync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_caddy_refuses_is_reported_on_its_app_and_every_other_app_is_served() {
    let (caddy, app) = routed(2).await;
    let create = |name: &'static str, health: &'static str| {
        let (http, url) = (app.http.clone(), app.url("/api/apps"));
        async move {
            http.post(url)
                .json(
                    &json!({"name": name, "image": "orion/demo-app:latest", "replicas": 1,
                              "port": 8080, "health_path": health}),
                )
                .send()
                .await
                .unwrap()
        }
    };
    // What Caddy cannot parse is refused at the door now.
    let resp = create("bad", "/%").await;
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["field"], "health_path", "{body}");

    assert_eq!(create("bad", "/").await.status(), 201);
    sqlx::query("UPDATE apps SET health_path = '/%' WHERE name = 'bad'")
        .execute(app.ctx.store.pool())
        .await
        .unwrap();
    assert_eq!(create("after", "/").await.status(), 201);
    let http = caddy.client_for(&["after"]);
    let url = caddy.url("after.apps.localhost", "/");
    until(&http, &url, |s, b| s == 200 && b["app"] == "after").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let (_, v) = app.get_json("/api/apps/bad").await;
        if v["route_error"].is_string() {
            break v;
        }
        assert!(Instant::now() < deadline, "no route error shown: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("the refused route: {}", view["route_error"]);
    let (_, after) = app.get_json("/api/apps/after").await;
    assert_eq!(after["route_error"], Value::Null, "{after}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'app.route_refused' AND message LIKE '%app bad%'")
            .await,
        1,
        "one event, not one per pass"
    );
}
