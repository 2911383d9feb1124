use orion::model::WorkerStatus;
use serde_json::Value;

use crate::helpers::spawn_app;

async fn status_of(app: &crate::helpers::TestApp, name: &str) -> WorkerStatus {
    app.worker_row(name).await.status
}

#[tokio::test]
async fn workers_are_alive_after_the_first_probe_with_their_host_key_recorded() {
    let app = spawn_app(2).await;
    for name in ["worker_1", "worker_2"] {
        let w = app.worker_row(name).await;
        assert_eq!(w.status, WorkerStatus::Alive);
        assert!(w.last_checked.is_some() && w.last_seen_alive.is_some());
        assert!(w.probe_latency_ms.is_some());
        let key = w.known_host_key.expect("host key trusted on first use");
        assert!(key.starts_with("ssh-"), "{key}");
    }
    let (status, health) = app.get_json("/api/status").await;
    assert_eq!(status, 200);
    assert_eq!(health["database"], "up");
    assert_eq!(health["workers"]["alive"], 2);
    assert_eq!(health["workers"]["dead"], 0);
    assert!(
        health["loops"]["health"]["last_success"].is_string(),
        "{health}"
    );
}

#[tokio::test]
async fn a_stopped_worker_is_dead_at_the_next_probe_and_alive_once_started() {
    let app = spawn_app(2).await;
    let worker = app.worker("worker_1");
    worker.stop();
    let summary = orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    assert_eq!(summary.dead, 1);
    assert_eq!(status_of(&app, "worker_1").await, WorkerStatus::Dead);
    assert_eq!(status_of(&app, "worker_2").await, WorkerStatus::Alive);
    let (_, workers) = app.get_json("/api/workers").await;
    let w1 = &workers["workers"][0];
    assert_eq!(w1["name"], "worker_1");
    assert_eq!(w1["status"], "dead");
    assert!(w1["last_checked"].is_string());
    let (_, health) = app.get_json("/api/status").await;
    assert_eq!(health["workers"]["dead"], 1);

    worker.start();
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    assert_eq!(status_of(&app, "worker_1").await, WorkerStatus::Alive);
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM events WHERE worker = 'worker_1' AND kind IN ('worker.dead', 'worker.alive') ORDER BY id",
    )
    .fetch_all(app.ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(kinds, ["worker.alive", "worker.dead", "worker.alive"]);
}

#[tokio::test]
async fn a_worker_whose_host_key_changed_is_refused_quarantined_and_never_rented() {
    let app = crate::helpers::spawn_app_with(
        1,
        Box::new(|c| {
            // Every probe makes a new connection: a probe over the kept watch connection
            // would not see the host key change until `handshake_every` (5 min) is due.
            c.health.handshake_every = std::time::Duration::from_millis(1);
        }),
    )
    .await;
    let worker = app.worker("worker_1");
    worker.rotate_host_keys();
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    let w = app.worker_row("worker_1").await;
    let reason = w.quarantine_reason.expect("the worker is quarantined");
    assert!(reason.contains("host key"), "{reason}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'worker.quarantined'")
            .await,
        1
    );
    let resp = app.rent(serde_json::json!({})).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_free_worker");
    let (_, health) = app.get_json("/api/status").await;
    assert_eq!(health["workers"]["quarantined"], 1);
}

#[tokio::test]
async fn a_hung_worker_does_not_delay_the_probes_of_the_others() {
    let app = crate::helpers::spawn_app_with(2, Box::new(|c| c.health.watch = false)).await;
    let hung = app.worker("worker_1").container.clone();
    crate::helpers::docker(&["pause", &hung]);
    let started = chrono::Utc::now();
    let round = {
        let (ctx, probes) = (app.ctx.clone(), app.loops.probes.clone());
        tokio::spawn(async move { orion::loops::health::probe_round(&ctx, &probes).await })
    };
    // worker_2 is recorded long before worker_1's probe times out (3 s, twice).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let w2 = app.worker_row("worker_2").await;
    assert!(
        w2.last_checked.is_some_and(|t| t > started),
        "worker_2 waited for worker_1"
    );
    assert!(
        !round.is_finished(),
        "the hung worker's probe is still running"
    );
    crate::helpers::docker(&["unpause", &hung]);
    round.await.unwrap().unwrap();
}

/// One worker with watch sessions on and `tweak` applied, once its watch session is open.
async fn one_watched_worker(tweak: orion::testkit::Tweak) -> crate::helpers::TestApp {
    use std::time::{Duration, Instant};
    let app = crate::helpers::spawn_app_with(
        1,
        Box::new(move |c| {
            c.health.watch = true;
            tweak(c);
        }),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.ctx.ssh.watched() < 1 {
        assert!(Instant::now() < deadline, "the watch session never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app
}

/// Probes ride the watch connection, but not for longer than `health.handshake_every`:
/// with the worker's sshd frozen (it accepts no new connection, while the watch
/// connection, served by its own process, still works), a probe right after the watch
/// opened succeeds over it, and one after `handshake_every` opens a new connection and
/// fails.
#[tokio::test]
async fn probes_open_a_new_connection_at_least_every_handshake_every() {
    use std::time::{Duration, Instant};
    let every = Duration::from_secs(4);
    let app = one_watched_worker(Box::new(move |c| c.health.handshake_every = every)).await;
    let opened = Instant::now();
    let worker = app.worker_row("worker_1").await;
    let target = worker.target();
    let container = &app.worker("worker_1").container;
    let pid = crate::helpers::docker(&["inspect", "-f", "{{.State.Pid}}", container]);
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} (the worker's sshd) failed");
    };
    signal("-STOP");
    let over_watch = app.ctx.prober.probe(&target, Duration::from_secs(2)).await;
    let fast = opened.elapsed() < every;
    tokio::time::sleep(every.saturating_sub(opened.elapsed()) + Duration::from_millis(200)).await;
    let fresh = app.ctx.prober.probe(&target, Duration::from_secs(2)).await;
    signal("-CONT");
    assert!(fast, "the first probe came too late to test the watch path");
    assert!(over_watch.is_ok(), "probe over the watch: {over_watch:?}");
    assert!(
        fresh.is_err(),
        "a frozen sshd cannot accept a new connection"
    );
}

/// Between commands, probes over the watch connection are keepalive round trips, which
/// cost the worker no process; at least every `health.exec_every` they run `true`. A
/// worker that can no longer start its shell (mode 000 on root's `/bin/bash`) still
/// answers keepalives, and the first probe after `exec_every` finds it out.
#[tokio::test]
async fn probes_run_a_command_at_least_every_exec_every() {
    use orion::probe::ProbeDepth;
    use orion::ssh::SshError;
    use std::time::{Duration, Instant};
    let every = Duration::from_secs(4);
    let app = one_watched_worker(Box::new(move |c| c.health.exec_every = every)).await;
    let target = app.worker_row("worker_1").await.target();
    let probe = || app.ctx.prober.probe(&target, Duration::from_secs(2));
    // Probes are keepalives until `every` after the startup round's command.
    let deadline = Instant::now() + every + Duration::from_secs(2);
    loop {
        let p = probe().await.expect("probe of a healthy worker");
        assert_ne!(p.depth, ProbeDepth::Handshake, "the watch is open");
        if p.depth == ProbeDepth::Exec {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no probe ran `true` within exec_every"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let exec_at = Instant::now();

    let container = &app.worker("worker_1").container;
    crate::helpers::docker(&["exec", container, "chmod", "000", "/bin/bash"]);
    let light = probe().await;
    let in_time = exec_at.elapsed() < every;
    tokio::time::sleep(every.saturating_sub(exec_at.elapsed()) + Duration::from_millis(200)).await;
    let deep = probe().await;
    crate::helpers::docker(&["exec", container, "chmod", "755", "/bin/bash"]);
    let healed = probe().await;

    assert!(
        in_time,
        "the second probe came too late to test the keepalive path"
    );
    let light = light.expect("a keepalive needs no shell");
    assert_eq!(light.depth, ProbeDepth::Keepalive);
    assert!(
        matches!(deep, Err(SshError::ProbeCommand { .. })),
        "after exec_every the probe runs `true`, which cannot start: {deep:?}"
    );
    let healed = healed.expect("the shell is back");
    assert_eq!(
        healed.depth,
        ProbeDepth::Exec,
        "no command has passed since"
    );
}

/// Orion itself reloads a worker's sshd when it installs the worker's host certificate
/// (at a rent, or when the cleanup loop renews it): for a moment the worker's sshd
/// closes new connections. A probe meeting that moment must not take the worker for
/// dead (its rentals would be moved, and none of its homes snapshotted meanwhile).
/// Here every probe opens a new connection (no watch to ride) and confirms a failure
/// at once, while the certificate is installed again and again.
#[tokio::test]
async fn a_worker_whose_sshd_orion_reloads_for_its_certificate_is_never_declared_dead() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    const INSTALLS: usize = 10;
    let app = crate::helpers::spawn_app_with(
        1,
        Box::new(|c| {
            c.health.watch = false;
            c.health.retry_delay = Duration::from_millis(1);
        }),
    )
    .await;
    let ca = app
        .ctx
        .host_ca
        .clone()
        .expect("the tests' Orion has a host CA");
    let done = AtomicBool::new(false);
    let probing = async {
        let mut seen = Vec::new();
        while !done.load(Ordering::Relaxed) {
            let worker = app.worker_row("worker_1").await;
            let status = orion::probe::probe_worker(&app.ctx, &app.loops.probes, worker)
                .await
                .unwrap();
            if status != WorkerStatus::Alive {
                seen.push(status);
            }
        }
        seen
    };
    let installing = async {
        for _ in 0..INSTALLS {
            sqlx::query("UPDATE workers SET host_cert_expires = NULL WHERE name = 'worker_1'")
                .execute(app.ctx.store.pool())
                .await
                .unwrap();
            let worker = app.worker_row("worker_1").await;
            let installed = ca
                .ensure_certificate(&app.ctx.executor, &app.ctx.store, &app.ctx.config, &worker)
                .await
                .unwrap();
            assert!(installed, "a certificate installed, sshd reloaded");
        }
        done.store(true, Ordering::Relaxed);
    };
    let (seen, ()) = tokio::join!(probing, installing);
    assert!(
        seen.is_empty(),
        "probes during the reloads found it {seen:?}"
    );
    assert_eq!(status_of(&app, "worker_1").await, WorkerStatus::Alive);
}
