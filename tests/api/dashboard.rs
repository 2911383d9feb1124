//! The dashboard: its login and access rules over HTTP, and the failure drill watched in
//! a real headless Chromium, driven through chromedriver (WebDriver).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApp, client_with_token, spawn_app, spawn_app_with};

#[tokio::test]
async fn the_dashboard_asks_browsers_for_the_admin_token_and_escapes_what_it_shows() {
    let app = spawn_app(2).await;
    let rental: Value = app.rent_ok(json!({ "username": "rita" })).await;
    let rented = rental["worker"].as_str().unwrap().to_owned();
    let hostile = r#"<script>alert("pwned")</script>"#;
    app.ctx
        .store
        .append_event("test.hostile", None, None, hostile)
        .await
        .unwrap();
    let anonymous = reqwest::Client::new();
    let dashboard = app.url("/dashboard");

    // No credentials: 401 asking for Basic, so that a browser shows its login prompt.
    let resp = anonymous.get(&dashboard).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with(r#"Basic realm="Orion""#),
        "{challenge}"
    );
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unauthorized");

    // A wrong password is refused the same way, and never echoed.
    let resp = anonymous
        .get(&dashboard)
        .basic_auth("admin", Some("not-the-token-0123456789abcdef"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    assert!(!resp.text().await.unwrap().contains("not-the-token"));

    // A tenant's token, either way it is sent: 403, the page shows the whole fleet.
    let (_, tenant_token) = app.tenant_token("acme").await;
    let tenant_token = tenant_token.as_str();
    let resp = anonymous
        .get(&dashboard)
        .basic_auth("acme", Some(tenant_token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = client_with_token(tenant_token)
        .get(&dashboard)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // The admin token as a Basic password, with any user name: the page.
    let resp = anonymous
        .get(&dashboard)
        .basic_auth("anyone", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let html = resp.text().await.unwrap();
    for worker in ["worker_1", "worker_2"] {
        assert!(
            html.contains(&format!(r#"<tr id="worker-{worker}" data-status="alive""#)),
            "{worker} missing or not alive:\n{html}"
        );
    }
    let id = rental["id"].as_str().unwrap();
    assert!(
        html.contains(&format!(
            r#"<tr id="rental-{id}" data-status="active" data-worker="{rented}">"#
        )),
        "{html}"
    );
    assert!(
        html.contains("rita (admin)"),
        "the worker row names its tenant:\n{html}"
    );
    // The hostile event message is shown as text, never as markup.
    assert!(
        html.contains("&lt;script&gt;alert(&quot;pwned&quot;)&lt;&#x2f;script&gt;"),
        "{html}"
    );
    assert!(!html.contains(hostile), "{html}");

    // The script and style are served from the page's own origin, with their types.
    for (path, content_type) in [
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/app.css", "text/css; charset=utf-8"),
    ] {
        let resp = anonymous.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], content_type, "{path}");
    }

    // The API takes the same Basic credentials (the page's script relies on it)...
    let resp = anonymous
        .get(app.url("/api/workers"))
        .basic_auth("anyone", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let workers: Value = resp.json().await.unwrap();
    // ...and says which rental holds each worker.
    for w in workers["workers"].as_array().unwrap() {
        if w["name"] == rented.as_str() {
            assert_eq!(w["rental"]["id"], id, "{w}");
            assert_eq!(w["rental"]["username"], "rita", "{w}");
            assert_eq!(w["rental"]["tenant"], "admin", "{w}");
            assert_eq!(w["rental"]["serving"], true, "{w}");
        } else {
            assert_eq!(w["rental"], Value::Null, "{w}");
        }
    }
    // API routes keep asking for a Bearer token.
    let resp = anonymous
        .get(app.url("/api/workers"))
        .basic_auth("anyone", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_stopped_worker_die_and_its_rental_move_without_a_reload() {
    let started = Instant::now();
    // The watch notices a stop within milliseconds; short loop intervals are a backstop.
    let app = spawn_app_with(
        3,
        Box::new(|c| {
            c.health.interval = Duration::from_secs(2);
            c.migration.interval = Duration::from_secs(2);
        }),
    )
    .await;
    let rental: Value = app.rent_ok(json!({ "username": "wendy" })).await;
    let id = rental["id"].as_str().unwrap().to_owned();
    let first = rental["worker"].as_str().unwrap().to_owned();

    let browser = Browser::start().await;
    // The credentials ride in the URL, as a user would type them into the login prompt.
    // Chromium answers the page's 401 with them and then sends them by itself with the
    // page's same-origin requests (the script's fetch() calls and its event stream), which
    // is what a browser does after a login. The script builds its URLs from
    // `location.origin`, because fetch() refuses relative URLs resolved against a page
    // URL that carries credentials.
    let port = app.address.rsplit(':').next().unwrap();
    browser
        .client
        .goto(&format!(
            "http://x:{ADMIN_TOKEN}@127.0.0.1:{port}/dashboard"
        ))
        .await
        .expect("the dashboard loads");

    let page = Page {
        browser: &browser,
        app: &app,
    };
    page.wait_for(
        "the event stream to connect",
        Duration::from_secs(15),
        "return document.getElementById('connection').dataset.state === 'live'",
    )
    .await;
    assert_eq!(
        page.eval(&format!(
            "return document.getElementById('worker-{first}').dataset.status"
        ))
        .await,
        "alive"
    );
    assert_eq!(
        page.eval(&format!(
            "return document.getElementById('rental-{id}').dataset.worker"
        ))
        .await,
        first.as_str()
    );
    assert_eq!(
        page.eval(&format!(
            "return document.getElementById('worker-{first}').dataset.rental"
        ))
        .await,
        id.as_str()
    );
    // Survives only if the page is never reloaded.
    page.eval("window.__marker = 1; return null").await;

    // An event written now shows up on the page, as text even when it looks like markup.
    let hostile = r#"<img src=x onerror="window.__pwned = 1">"#;
    app.ctx
        .store
        .append_event("test.hostile", None, None, hostile)
        .await
        .unwrap();
    page.wait_for(
        "the hostile event to appear",
        Duration::from_secs(10),
        "return document.querySelector('#events tr[data-kind=\"test.hostile\"]') !== null",
    )
    .await;
    assert_eq!(
        page.eval(
            "return document.querySelector('#events tr[data-kind=\"test.hostile\"]')\
             .lastElementChild.textContent"
        )
        .await,
        hostile
    );
    assert_eq!(
        page.eval("return document.querySelectorAll('#events img').length + (window.__pwned || 0)")
            .await,
        0
    );

    let stopped = Instant::now();
    app.worker(&first).stop();
    page.wait_for(
        &format!("{first} to turn dead and rental {id} to move, on the page"),
        Duration::from_secs(60),
        &format!(
            "const w = document.getElementById('worker-{first}'); \
             const r = document.getElementById('rental-{id}'); \
             return w !== null && w.dataset.status === 'dead' && r !== null \
               && r.dataset.status === 'active' && r.dataset.worker !== '' \
               && r.dataset.worker !== '{first}'"
        ),
    )
    .await;
    println!(
        "stop → dead and moved on the page: {} ms",
        stopped.elapsed().as_millis()
    );
    assert_eq!(
        page.eval("return window.__marker === 1").await,
        true,
        "the page was reloaded"
    );
    // The page learned it from the stream: the death is in its events table.
    assert_eq!(
        page.eval(&format!(
            "return [...document.querySelectorAll('#events tr[data-kind=\"worker.dead\"]')]\
             .some(tr => tr.children[3].textContent === '{first}')"
        ))
        .await,
        true,
        "no worker.dead event for {first} on the page"
    );
    // And it agrees with the API.
    let (_, moved) = app.get_json(&format!("/api/rentals/{id}")).await;
    let new_worker = moved["worker"].as_str().unwrap();
    assert_eq!(
        page.eval(&format!(
            "return document.getElementById('rental-{id}').dataset.worker"
        ))
        .await,
        new_worker
    );

    // An app appears, then its instance running, without a reload.
    let resp = app
        .http
        .post(app.url("/api/apps"))
        .json(&json!({"name": "shown", "image": "orion/demo-app:latest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    page.wait_for(
        "the app's instance to run, on the page",
        Duration::from_secs(60),
        "const a = document.getElementById('app-admin-shown'); \
         return a !== null && a.dataset.ready === '1' && a.textContent.includes(': running')",
    )
    .await;
    let resp = app
        .http
        .delete(app.url("/api/apps/shown"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    page.wait_for(
        "the app to leave the page",
        Duration::from_secs(60),
        "return document.getElementById('app-admin-shown') === null",
    )
    .await;
    assert_eq!(page.eval("return window.__marker === 1").await, true);
    browser.close().await;
    println!("whole test: {} ms", started.elapsed().as_millis());
}

/// Where Debian's `chromium` package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";

/// A chromedriver child process and one WebDriver session on a headless Chromium.
struct Browser {
    client: Client,
    driver: Chromedriver,
}

impl Browser {
    async fn start() -> Self {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: the dashboard test needs Debian's `chromium` package \
             (apt-get install chromium chromium-driver; scripts/test.sh installs it)"
        );
        let driver = Chromedriver::start();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--window-size=1280,1000",
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start a Chromium session through chromedriver: {e}\n{}",
                    driver.log()
                )
            });
        Self { client, driver }
    }

    /// Ends the session, which closes Chromium; chromedriver goes when dropped.
    async fn close(self) {
        let Self { client, driver } = self;
        client.close().await.ok();
        drop(driver);
    }
}

/// `chromedriver --port=N`. When dropped, even by a panic, it is asked to shut down
/// through its `/shutdown` endpoint, which quits the Chromium it started (a signal would
/// leave Chromium running); if it is still there after that, it is killed.
struct Chromedriver {
    child: Child,
    port: u16,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Chromedriver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `chromedriver` ({e}): the dashboard test needs Debian's \
                     `chromium-driver` package (apt-get install chromium chromium-driver; \
                     scripts/test.sh installs it)"
                )
            });
        let driver = Self {
            child,
            port,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within 20 s:\n{}",
                driver.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        // A plain blocking request: Drop cannot await, and this may run while unwinding.
        if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let request = format!(
                "GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                self.port
            );
            if conn.write_all(request.as_bytes()).is_ok() {
                let _ = conn.read_to_end(&mut Vec::new());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Still there: kill this one child (a no-op if it has exited), and reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The dashboard as the browser shows it.
struct Page<'a> {
    browser: &'a Browser,
    app: &'a TestApp,
}

impl Page<'_> {
    /// Runs `script` (a function body) in the page and returns what it returns.
    async fn eval(&self, script: &str) -> Value {
        self.browser
            .client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed in the page: {e}\n{script}"))
    }

    /// Polls `script` until it returns true; on timeout fails with the page's text and
    /// the API's view, so the failure says what the page showed.
    async fn wait_for(&self, what: &str, timeout: Duration, script: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(script).await == Value::Bool(true) {
                return;
            }
            if Instant::now() >= deadline {
                let text = self.eval("return document.body.innerText").await;
                let (_, workers) = self.app.get_json("/api/workers").await;
                let (_, rentals) = self.app.get_json("/api/rentals").await;
                panic!(
                    "waited {timeout:?} for {what}.\n--- the page ---\n{}\n--- the API ---\n\
                     {workers}\n{rentals}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
