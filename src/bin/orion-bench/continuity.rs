//! Rental continuity: stop → working login through the rental's endpoint with a home of
//! N MB to restore, with a plain OpenSSH client and only the CA's `known_hosts` line;
//! what a snapshot pass costs Orion; and the gateway's throughput against a direct
//! connection (`scp` both ways).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::config::{HealthConfig, MigrationConfig};
use orion::testkit::{OpenSshTenant, spawn_app_with};
use serde_json::{Value, json};

use crate::report;

/// `ssh -p port user@host command` with the tenant's client; its stdout if it worked.
async fn ssh(
    client: &OpenSshTenant,
    host: &str,
    port: u16,
    user: &str,
    command: &str,
) -> Option<String> {
    let ran = client.ssh(host, port, user, command).await;
    ran.ok.then_some(ran.stdout)
}

/// `scp` of `file` to the rental and back; the two durations.
async fn scp_both_ways(
    client: &OpenSshTenant,
    host: &str,
    port: u16,
    user: &str,
    file: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    let remote = format!("{user}@{host}:transfer.bin");
    let back = file.with_extension("back");
    let mut times = Vec::new();
    for (from, to) in [
        (file.display().to_string(), remote.clone()),
        (remote.clone(), back.display().to_string()),
    ] {
        let started = Instant::now();
        let status = tokio::process::Command::new("scp")
            .args(client.args("-P", port))
            .args(["-q", &from, &to])
            .status()
            .await?;
        if !status.success() {
            bail!("scp {from} {to} failed");
        }
        times.push(started.elapsed());
    }
    if std::fs::metadata(&back)?.len() != std::fs::metadata(file)?.len() {
        bail!("the file came back with another size");
    }
    Ok((times[0], times[1]))
}

pub async fn run(
    runs: usize,
    workers: usize,
    home_mb: usize,
    transfer_mb: usize,
    interval: Duration,
) -> anyhow::Result<()> {
    if workers < 3 {
        bail!("the drill needs at least 3 workers (one dies, one more keeps the guard quiet)");
    }
    let app = spawn_app_with(
        workers,
        Box::new(move |c| {
            c.health = HealthConfig::default();
            c.migration = MigrationConfig::default();
            // The snapshots loop runs on its own, as in production, at this interval.
            c.snapshots.interval = interval;
        }),
    )
    .await;
    let client = OpenSshTenant::new(&app, "bench").await;
    println!(
        "continuity: {runs} runs, {workers} workers, default detection, a home of {home_mb} MB \
         of random bytes (incompressible: the worst case) plus a file the tenant appends the \
         time to every 100 ms; snapshots every {interval:?}; the worker is stopped at a \
         random moment of the interval"
    );
    let (mut login, mut pass_changed, mut pass_cpu, mut pass_same, mut same_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut lost = Vec::new();
    let mut stored_bytes = 0;
    let progress = orion::progress::bar(runs as u64, "continuity runs");
    for run in 1..=runs {
        let user = format!("cont{run}");
        let resp = app
            .rent(json!({ "ssh_public_key": client.public, "username": user }))
            .await;
        if resp.status() != 201 {
            bail!("rent failed: {}", resp.text().await.unwrap_or_default());
        }
        let body: Value = resp.json().await?;
        let id = body["id"].as_str().context("id")?.to_owned();
        let first = body["worker"].as_str().context("worker")?.to_owned();
        let host = body["endpoint"]["host"]
            .as_str()
            .context("endpoint")?
            .to_owned();
        let port = body["endpoint"]["port"].as_u64().context("endpoint")? as u16;
        let sum = ssh(
            &client,
            &host,
            port,
            &user,
            &format!("head -c {}M /dev/urandom > blob && md5sum < blob", home_mb),
        )
        .await
        .context("writing the home through the endpoint")?;

        // One pass with this home changed, then one with nothing changed (kept only when
        // the running loop did not take that snapshot first).
        for (changed, walls, cpus) in [
            (true, &mut pass_changed, &mut pass_cpu),
            (false, &mut pass_same, &mut same_cpu),
        ] {
            let (cpu0, _) = report::cpu_times();
            let started = Instant::now();
            let summary =
                orion::loops::snapshots::snapshot_pass(&app.ctx, &app.loops.snapshots).await?;
            if (summary.stored == 1) == changed {
                walls.push(started.elapsed());
                cpus.push(report::cpu_times().0.saturating_sub(cpu0));
            }
            if summary.stored == 1 {
                stored_bytes = summary.bytes;
            }
        }
        // The tenant at work: a line with the time every 100 ms, until the worker dies.
        ssh(
            &client,
            &host,
            port,
            &user,
            "nohup sh -c 'while :; do date +%s.%N >> ticks; sleep 0.1; done' >/dev/null 2>&1 &",
        )
        .await
        .context("starting the tenant's writer")?;
        let phase = interval.mul_f64(rand::random::<f64>());
        tokio::time::sleep(interval + phase).await;

        let stopped_wall = chrono::Utc::now();
        let stopped = Instant::now();
        app.worker(&first).stop();
        let t_login = loop {
            if ssh(&client, &host, port, &user, "md5sum < blob")
                .await
                .is_some_and(|s| s == sum)
            {
                break stopped.elapsed();
            }
            if stopped.elapsed() > Duration::from_secs(60) {
                bail!("run {run}: no working login with the home within 60 s");
            }
        };
        let last_tick = ssh(&client, &host, port, &user, "tail -n 1 ticks")
            .await
            .and_then(|t| t.parse::<f64>().ok())
            .context("reading the restored ticks")?;
        let stopped_at = stopped_wall.timestamp_micros() as f64 / 1e6;
        let loss = Duration::from_secs_f64((stopped_at - last_tick).max(0.0));
        progress.suspend(|| {
            println!(
                "run {run:>2}: {first} stopped → login through the endpoint, home intact: {:>5} ms; \
                 work lost: {:>6} ms",
                t_login.as_millis(),
                loss.as_millis()
            )
        });
        login.push(t_login);
        lost.push(loss);

        app.worker(&first).start();
        for _ in 0..app.ctx.config.health.alive_after {
            orion::loops::health::probe_round(&app.ctx, &app.loops.probes).await?;
        }
        orion::loops::cleanup::cleanup_pass(&app.ctx).await?;
        if app.release(&id).await != 204 {
            bail!("release failed");
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    println!();
    report::line("stop → working login, home restored", &mut login);
    report::line("work lost (stop − last restored tick)", &mut lost);
    report::line("snapshot pass, home changed (wall)", &mut pass_changed);
    report::line("  Orion CPU for it", &mut pass_cpu);
    report::line("snapshot pass, unchanged (wall)", &mut pass_same);
    report::line("  Orion CPU for it", &mut same_cpu);
    println!("snapshot stored: {stored_bytes} bytes for a {home_mb} MB home");

    // Throughput: scp of a file both ways, through the endpoint and straight to the worker.
    let resp = app
        .rent(json!({ "ssh_public_key": client.public, "username": "scp" }))
        .await;
    let body: Value = resp.json().await?;
    let worker = app.worker(body["worker"].as_str().context("worker")?);
    let host = body["endpoint"]["host"]
        .as_str()
        .context("endpoint")?
        .to_owned();
    let port = body["endpoint"]["port"].as_u64().context("endpoint")? as u16;
    let file = app.dir.path().join("transfer.bin");
    let data: Vec<u8> = (0..transfer_mb << 20)
        .map(|_| rand::random::<u8>())
        .collect();
    std::fs::write(&file, data)?;
    // The direct path needs the worker's own name in the CA's line: 127.0.0.1 is a
    // principal of its certificate (its SSH host).
    let line = std::fs::read_to_string(&client.known_hosts)?;
    std::fs::write(
        &client.known_hosts,
        line.replacen(
            "@cert-authority ",
            "@cert-authority 127.0.0.1,[127.0.0.1]:*,",
            1,
        ),
    )?;
    let mut rows = Vec::new();
    for (path, h, p) in [
        ("gateway", host.as_str(), port),
        ("direct", "127.0.0.1", worker.port),
    ] {
        let (up, down) = scp_both_ways(&client, h, p, "scp", &file).await?;
        rows.push((path, up, down));
    }
    let mb = transfer_mb as f64;
    println!();
    println!("scp of {transfer_mb} MB          up (to the rental)        down");
    for (path, up, down) in &rows {
        println!(
            "{path:<20} {:>7} ms {:>7.0} MB/s   {:>7} ms {:>7.0} MB/s",
            up.as_millis(),
            mb / up.as_secs_f64(),
            down.as_millis(),
            mb / down.as_secs_f64()
        );
    }
    let ratio = |g: Duration, d: Duration| g.as_secs_f64() / d.as_secs_f64();
    println!(
        "gateway / direct time: up {:.2}, down {:.2}",
        ratio(rows[0].1, rows[1].1),
        ratio(rows[0].2, rows[1].2)
    );
    Ok(())
}
