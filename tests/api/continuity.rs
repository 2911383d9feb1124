//! Rental continuity against real workers and a plain OpenSSH client: one endpoint per
//! rental through the gateway, one host identity through Orion's CA, and the home kept
//! across a failover and a drain by snapshots.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{OpenSshTenant, Ran, TestApp, spawn_app};

/// A tenant's OpenSSH client, trusting only the CA's `known_hosts` line.
async fn client(app: &TestApp, name: &str) -> OpenSshTenant {
    let tenant = OpenSshTenant::new(app, name).await;
    let line = &tenant.known_hosts_lines;
    assert!(
        line.starts_with("@cert-authority localhost,[localhost]:* ssh-ed25519 "),
        "{line}"
    );
    tenant
}

/// Runs `command` as `user` through `endpoint` with strict host key checking and the
/// CA line only: any unknown or changed host key fails the login.
async fn ssh(client: &OpenSshTenant, endpoint: &Value, user: &str, command: &str) -> Ran {
    let port = endpoint["port"].as_u64().unwrap() as u16;
    client
        .ssh(endpoint["host"].as_str().unwrap(), port, user, command)
        .await
}

/// `ssh` that must succeed with no word from the client about host keys.
async fn ssh_ok(client: &OpenSshTenant, endpoint: &Value, user: &str, command: &str) -> String {
    let ran = ssh(client, endpoint, user, command).await;
    assert!(ran.ok, "ssh {user} `{command}` failed: {}", ran.stderr);
    assert!(
        !ran.stderr.to_lowercase().contains("host key") && !ran.stderr.contains("WARNING"),
        "ssh warned: {}",
        ran.stderr
    );
    ran.stdout
}

async fn snapshot_now(app: &TestApp) -> orion::loops::snapshots::SnapshotSummary {
    orion::loops::snapshots::snapshot_pass(&app.ctx, &app.loops.snapshots)
        .await
        .expect("a snapshot pass")
}

#[tokio::test]
async fn a_tenant_keeps_its_endpoint_its_host_trust_and_its_files_across_a_failover() {
    let app = spawn_app(3).await;
    let tenant = client(&app, "tina").await;
    let body = app
        .rent_ok(json!({ "ssh_public_key": tenant.public, "username": "tina" }))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let first = body["worker"].as_str().unwrap().to_owned();
    let endpoint = body["endpoint"].clone();
    assert_eq!(endpoint["host"], "localhost", "{body}");
    assert!(body["last_snapshot_at"].is_null());

    // A second tenant, whose logins must not notice the first one's move.
    let other = client(&app, "otto").await;
    let other_body = app
        .rent_ok(json!({ "ssh_public_key": other.public, "username": "otto" }))
        .await;
    let other_endpoint = other_body["endpoint"].clone();
    assert_ne!(other_endpoint["port"], endpoint["port"]);

    let host = ssh_ok(
        &tenant,
        &endpoint,
        "tina",
        "echo precious > data.txt && hostname",
    )
    .await;
    assert_eq!(
        ssh_ok(&other, &other_endpoint, "otto", "whoami").await,
        "otto"
    );

    let summary = snapshot_now(&app).await;
    assert_eq!(summary.stored, 2, "{summary:?}");
    let (_, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert!(rental["last_snapshot_at"].is_string(), "{rental}");
    assert!(rental["snapshot_bytes"].as_u64().unwrap() > 0, "{rental}");
    // Nothing changed: nothing is sent again.
    let again = snapshot_now(&app).await;
    assert_eq!((again.stored, again.unchanged), (0, 2), "{again:?}");

    app.worker(&first).stop();
    // While the rental moves, the other tenant's endpoint keeps working.
    assert_eq!(
        ssh_ok(&other, &other_endpoint, "otto", "whoami").await,
        "otto"
    );
    let moved = app
        .wait_rental(&id, Duration::from_secs(30), |r| {
            r["status"] == "active" && r["worker"] != first.as_str()
        })
        .await;
    assert_eq!(moved["endpoint"], endpoint, "the endpoint never changes");

    // The same endpoint, the same client settings: another machine, no warning, the file.
    let after = ssh_ok(&tenant, &endpoint, "tina", "cat data.txt; hostname").await;
    let mut lines = after.lines();
    assert_eq!(lines.next(), Some("precious"));
    assert_ne!(lines.next(), Some(host.as_str()), "a new worker serves it");
    let restored = app
        .count(&format!(
            "SELECT COUNT(*) FROM events WHERE kind = 'snapshot.restored' AND rental_id = '{id}'"
        ))
        .await;
    assert_eq!(restored, 1);

    // Released: its snapshots go (at once from view, from the disk at the next pass),
    // and its port leads nowhere.
    assert_eq!(app.release(&id).await, 204);
    let live = format!("SELECT COUNT(*) FROM snapshots WHERE rental_id = '{id}' AND NOT obsolete");
    assert_eq!(app.count(&live).await, 0);
    snapshot_now(&app).await;
    let kept = format!(
        "SELECT COUNT(*) FROM snapshot_chunks c JOIN snapshots s ON s.id = c.snapshot_id \
         WHERE s.rental_id = '{id}'"
    );
    assert_eq!(app.count(&kept).await, 0);
    assert!(!ssh(&tenant, &endpoint, "tina", "true").await.ok);
}

#[tokio::test]
async fn a_drain_moves_the_file_written_just_before_it() {
    let app = spawn_app(2).await;
    let tenant = client(&app, "dora").await;
    let body = app
        .rent_ok(json!({ "ssh_public_key": tenant.public, "username": "dora" }))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let first = body["worker"].as_str().unwrap().to_owned();
    let endpoint = body["endpoint"].clone();
    // An old snapshot, then a file the loop never saw.
    ssh_ok(&tenant, &endpoint, "dora", "echo old > old.txt").await;
    let first_pass = snapshot_now(&app).await;
    assert_eq!(first_pass.stored, 1, "{first_pass:?}");
    // A session still running on the old worker when the drain comes.
    ssh_ok(
        &tenant,
        &endpoint,
        "dora",
        "echo fresh > fresh.txt; (sleep 600 >/dev/null 2>&1 &)",
    )
    .await;

    let resp = app.drain(&first).await;
    assert_eq!(resp.status(), 200);
    app.wait_rental(&id, Duration::from_secs(30), |r| {
        r["status"] == "active" && r["worker"] != first.as_str()
    })
    .await;
    assert_eq!(
        ssh_ok(&tenant, &endpoint, "dora", "cat old.txt fresh.txt").await,
        "old\nfresh"
    );
    // The tenant's processes on the old worker ended before the snapshot.
    let left = app.worker(&first).exec("ps -u dora -o pid=,args= || true");
    assert_eq!(left.trim(), "", "processes left on the drained worker");
}

/// A gzip'd tar a hostile tenant could have made its snapshot say.
fn crafted_archive(dir: &Path) -> Vec<u8> {
    let path = dir.join("crafted.tar.gz");
    let script = r##"
import io, sys, tarfile
out = tarfile.open(sys.argv[1], "w:gz")
def add(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
    info.uid = info.gid = 0
    out.addfile(info, io.BytesIO(data) if data else None)
add("./ok.txt", data=b"fine\n")
add("./etc", kind=tarfile.SYMTYPE, link="/etc")
add("./etc/orion-pwned", data=b"pwned\n")
add("../../../orion-escaped", data=b"escaped\n")
add("/orion-absolute", data=b"absolute\n")
add("./suid-shell", data=b"#!/bin/sh\n", mode=0o4755)
add("./disk", kind=tarfile.BLKTYPE)
info = tarfile.TarInfo("./disk2"); info.type = tarfile.CHRTYPE; info.devmajor = 1; info.devminor = 3
out.addfile(info)
out.close()
"##;
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .status()
        .expect("python3 runs");
    assert!(status.success());
    std::fs::read(&path).unwrap()
}

#[tokio::test]
async fn a_crafted_snapshot_is_restored_harmlessly() {
    let app = spawn_app(3).await;
    let tenant = client(&app, "mal").await;
    let body = app
        .rent_ok(json!({ "ssh_public_key": tenant.public, "username": "mal" }))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let first = body["worker"].as_str().unwrap().to_owned();
    let worker_id = app.worker_row(&first).await.id;

    // The stored snapshot is the attacker's archive.
    let store = &app.ctx.store;
    let archive = crafted_archive(app.dir.path());
    let snapshot = store.begin_snapshot(&id, worker_id).await.unwrap();
    store
        .put_snapshot_chunk(snapshot, 0, &archive)
        .await
        .unwrap();
    let bytes = archive.len() as u64;
    assert!(
        store
            .finish_snapshot(snapshot, &id, worker_id, "crafted", bytes, false)
            .await
            .unwrap()
    );

    app.worker(&first).stop();
    let moved = app
        .wait_rental(&id, Duration::from_secs(30), |r| {
            r["status"] == "active" && r["worker"] != first.as_str()
        })
        .await;
    let new = app.worker(moved["worker"].as_str().unwrap());
    let look = new.exec(
        "cd /home/mal; cat ok.txt; \
         for f in /etc/orion-pwned /orion-escaped /home/orion-escaped /orion-absolute \
                  /home/mal/disk /home/mal/disk2; do [ -e \"$f\" ] && echo \"EXISTS $f\"; done; \
         stat -c '%a %U' suid-shell; find / -xdev -name 'orion-pwned' 2>/dev/null; \
         find /home/mal ! -user mal -printf 'FOREIGN %p\\n'",
    );
    assert!(look.starts_with("fine\n"), "{look}");
    assert!(!look.contains("EXISTS"), "{look}");
    assert!(!look.contains("FOREIGN"), "{look}");
    assert!(!look.contains("/orion-pwned"), "{look}");
    assert!(
        look.lines().any(|l| l == "755 mal" || l == "700 mal"),
        "setuid bit kept: {look}"
    );
    // The tenant still logs in, and the event says what was left out.
    assert_eq!(
        ssh_ok(&tenant, &moved["endpoint"], "mal", "cat ok.txt").await,
        "fine"
    );
    let incomplete = app
        .count(&format!(
            "SELECT COUNT(*) FROM events WHERE kind = 'snapshot.restore_incomplete' \
             AND rental_id = '{id}'"
        ))
        .await;
    assert_eq!(incomplete, 1);
}

#[tokio::test]
async fn concurrent_rents_get_distinct_ports_and_a_freed_port_is_given_last() {
    let app = spawn_app(4).await;
    let rents = futures::future::join_all(
        (0..4).map(|i| app.rent_ok(json!({ "username": format!("port{i}") }))),
    )
    .await;
    let mut ports: Vec<u64> = rents
        .iter()
        .map(|r| r["endpoint"]["port"].as_u64().expect("an endpoint"))
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 4, "{rents:?}");
    // A released rental's port is given again only after the ports never given.
    let freed = rents[0]["endpoint"]["port"].as_u64().unwrap();
    assert_eq!(app.release(rents[0]["id"].as_str().unwrap()).await, 204);
    let next = app.rent_ok(json!({ "username": "port4" })).await;
    let port = next["endpoint"]["port"].as_u64().unwrap();
    assert_ne!(port, freed);
    assert!(!ports.contains(&port), "{port} is still held");
}

#[tokio::test]
async fn a_home_over_the_cap_keeps_its_last_snapshot_and_is_not_sent_again_unchanged() {
    let app = crate::helpers::spawn_app_with(
        1,
        Box::new(|c| c.snapshots.max_bytes = orion::config::ByteSize::mib(1)),
    )
    .await;
    let tenant = client(&app, "bea").await;
    let body = app
        .rent_ok(json!({ "ssh_public_key": tenant.public, "username": "bea" }))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let endpoint = body["endpoint"].clone();
    ssh_ok(&tenant, &endpoint, "bea", "echo small > small.txt").await;
    assert_eq!(snapshot_now(&app).await.stored, 1);
    // 2 MiB that gzip cannot shrink: over the 1 MiB cap.
    ssh_ok(&tenant, &endpoint, "bea", "head -c 2M /dev/urandom > big").await;
    let over = snapshot_now(&app).await;
    assert_eq!(over.too_big, 1, "{over:?}");
    let again = snapshot_now(&app).await;
    assert_eq!(
        (again.too_big, again.unchanged),
        (0, 1),
        "not sent again: {again:?}"
    );
    let events = format!(
        "SELECT COUNT(*) FROM events WHERE kind = 'snapshot.too_big' AND rental_id = '{id}'"
    );
    assert_eq!(app.count(&events).await, 1, "one event, when it went over");
    // The last whole snapshot is still the rental's.
    let (_, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    assert!(
        rental["snapshot_bytes"].as_u64().unwrap() < 1 << 20,
        "{rental}"
    );
    // Back under the cap: snapshotted again.
    ssh_ok(&tenant, &endpoint, "bea", "rm big").await;
    assert_eq!(snapshot_now(&app).await.stored, 1);
}

#[tokio::test]
async fn a_quarantined_worker_s_certified_key_is_revoked_in_known_hosts() {
    let app = crate::helpers::spawn_app_with(
        1,
        Box::new(|c| {
            // Every probe makes a new connection: a probe over the kept watch connection
            // would not see the host key change until `handshake_every` (5 min) is due.
            c.health.handshake_every = std::time::Duration::from_millis(1);
        }),
    )
    .await;
    let tenant = client(&app, "rex").await;
    app.rent_ok(json!({ "ssh_public_key": tenant.public, "username": "rex" }))
        .await;
    let certified = app
        .worker_row("worker_1")
        .await
        .host_cert_key
        .expect("certified before the rent");
    app.worker("worker_1").rotate_host_keys();
    crate::hostile_tenants::probe_until_quarantined(&app, "worker_1").await;
    let lines = app
        .http
        .get(app.url("/api/ssh/known_hosts"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        lines.contains(&format!("@revoked * {certified}")),
        "{lines}"
    );
}
