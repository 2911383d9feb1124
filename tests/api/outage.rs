//! MariaDB goes away while Orion runs, and comes back: 503s meanwhile, tenants untouched,
//! everything resumes without restarting Orion. Uses a MariaDB of its own, so the other
//! tests keep theirs.

use std::time::{Duration, Instant};

use orion::ssh::Auth;
use serde_json::{Value, json};

use crate::helpers::{docker, spawn_app_with, tenant_key};

struct Database {
    container: String,
    url: String,
}

impl Database {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let container = format!("orion-test-outage-db-{port}");
        let image = std::env::var("ORION_TEST_MARIADB_IMAGE")
            .unwrap_or_else(|_| "orion/mariadb:latest".into());
        docker(&[
            "run",
            "-d",
            "--name",
            &container,
            "--label",
            "orion.test=1",
            "-p",
            &format!("127.0.0.1:{port}:3306"),
            "-e",
            "MARIADB_ROOT_PASSWORD=outage",
            "-e",
            "MARIADB_DATABASE=orion",
            &image,
        ]);
        let db = Self {
            container,
            url: format!("mysql://root:outage@127.0.0.1:{port}/orion"),
        };
        db.wait_ready().await;
        db
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = <sqlx::MySqlConnection as sqlx::Connection>::connect(&self.url).await
                && sqlx::query("SELECT 1").execute(&mut c).await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "MariaDB {} did not start",
                self.container
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", "-v", &self.container])
            .output();
    }
}

#[tokio::test]
async fn a_database_outage_answers_503_keeps_tenants_and_resumes_without_restart() {
    let db = Database::start().await;
    let url = db.url.clone();
    let app = spawn_app_with(2, Box::new(move |c| c.database.url = url)).await;
    let (key, public) = tenant_key();
    let rental: Value = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "pia" }))
        .await;
    let port = rental["port"].as_u64().unwrap() as u16;
    // And through its endpoint on the gateway, which keeps a copy of the ports' rentals.
    let endpoint = rental["endpoint"]["port"].as_u64().unwrap() as u16;
    let via_gateway = || app.tenant_whoami("127.0.0.1", endpoint, "pia", Auth::Key(key.clone()));
    assert_eq!(via_gateway().await.as_deref(), Ok("pia"));

    docker(&["stop", &db.container]);
    let asked = Instant::now();
    let resp = app.http.get(app.url("/api/rentals")).send().await.unwrap();
    let took = asked.elapsed();
    assert_eq!(resp.status(), 503);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unavailable");
    assert!(took < Duration::from_secs(10), "503 came after {took:?}");
    assert_eq!(app.rent(json!({})).await.status(), 503);
    let (status, health) = app.get_json("/health").await;
    assert_eq!(status, 503);
    assert_eq!(health["database"], "down");
    let (status, details) = app.get_json("/api/status").await;
    assert_eq!(status, 503);
    assert_eq!(details["database"], "down");
    assert!(details["loops"].is_object(), "{details}");
    // The loops fail, report it, and keep going.
    assert!(
        orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
            .await
            .is_err()
    );
    // The tenant is not touched.
    let who = app
        .tenant_whoami("127.0.0.1", port, "pia", Auth::Key(key.clone()))
        .await;
    assert_eq!(who.as_deref(), Ok("pia"));
    assert_eq!(
        via_gateway().await.as_deref(),
        Ok("pia"),
        "the gateway leads to the rental's worker from its last copy"
    );

    docker(&["start", &db.container]);
    db.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get_json("/health").await.0 != 200 {
        assert!(Instant::now() < deadline, "Orion did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .expect("the loops work again");
    let (_, rentals) = app.get_json("/api/rentals").await;
    assert_eq!(
        rentals["rentals"].as_array().unwrap().len(),
        1,
        "nothing lost"
    );
    assert_eq!(
        app.rent(json!({})).await.status(),
        201,
        "renting works again"
    );
    let who = app
        .tenant_whoami("127.0.0.1", port, "pia", Auth::Key(key))
        .await;
    assert_eq!(who.as_deref(), Ok("pia"));
}
