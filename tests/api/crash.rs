//! `orion` killed with SIGKILL in the middle of a migration, then started again: the
//! migration completes. Runs the real binary.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orion::ssh::Auth;
use serde_json::{Value, json};

use crate::helpers::{Worker, create_database, inventory_for, tenant_key, write_private_key};

struct Orion(Child);

impl Orion {
    fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_orion"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("cannot start the orion binary");
        Self(child)
    }

    fn kill9(&mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for Orion {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(http: &reqwest::Client, url: &str) -> Option<Value> {
    let resp = http.get(url).send().await.ok()?;
    resp.json().await.ok()
}

#[tokio::test]
async fn orion_killed_mid_migration_completes_it_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = orion::ssh::generate_ed25519();
    let key_path = dir.path().join("id_ed25519");
    write_private_key(&key, &key_path);
    let public = orion::ssh::host_key_line(key.public_key());
    let workers: Vec<Worker> = (1..=2)
        .map(|i| Worker::start_new(&format!("worker_{i}"), &public))
        .collect();
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(&inventory, inventory_for(&workers)).unwrap();
    let database = create_database().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("orion.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ninventory = \"{}\"\nplaybooks = \"{}/playbooks\"\n\
             [database]\nurl = \"{database}\"\n[ssh]\nkey = \"{}\"\n\
             [auth]\nadmin_token = \"{}\"\n\
             [health]\ndead_after = 2\nretry_delay = \"100ms\"\nalive_after = 1\n",
            inventory.display(),
            env!("CARGO_MANIFEST_DIR"),
            key_path.display(),
            crate::helpers::ADMIN_TOKEN,
        ),
    )
    .unwrap();
    let log = dir.path().join("orion.log");
    let base = format!("http://127.0.0.1:{port}");
    let http = crate::helpers::client_with_token(crate::helpers::ADMIN_TOKEN);

    let mut orion = Orion::start(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(h) = get(&http, &format!("{base}/api/status")).await
            && h["workers"]["alive"] == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orion never became healthy: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (tenant, tenant_public) = tenant_key();
    let body: Value = http
        .post(format!("{base}/api/rent"))
        .json(&json!({ "ssh_public_key": tenant_public, "username": "nina" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    let first = body["worker"].as_str().unwrap().to_owned();
    let target = workers.iter().find(|w| w.name != first).unwrap();
    // Make provisioning on the target slow, so the kill lands mid-migration.
    target.exec(
        "mv /usr/sbin/useradd /usr/sbin/useradd.real && \
         printf '#!/bin/sh\\nsleep 30\\nexec /usr/sbin/useradd.real \"$@\"\\n' > /usr/sbin/useradd && \
         chmod 755 /usr/sbin/useradd",
    );
    workers.iter().find(|w| w.name == first).unwrap().stop();

    let pool = sqlx::MySqlPool::connect(&database).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM rentals WHERE id = ?")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if status == "migrating" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never started (status {status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    orion.kill9();
    target.exec("mv -f /usr/sbin/useradd.real /usr/sbin/useradd");

    let _orion = Orion::start(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    let rental = loop {
        if let Some(r) = get(&http, &format!("{base}/api/rentals/{id}")).await
            && r["status"] == "active"
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never completed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rental["worker"], target.name.as_str());
    let who = crate::helpers::whoami(
        &crate::helpers::tenant_ssh_client(),
        "127.0.0.1",
        target.port,
        "nina",
        Auth::Key(tenant),
    )
    .await;
    assert_eq!(
        who.as_deref(),
        Ok("nina"),
        "the tenant logs in on the new worker"
    );
    let active: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM placements WHERE rental_id = ? AND state IN ('active', 'provisioning')",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(active, 1);
}
