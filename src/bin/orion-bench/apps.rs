//! Apps: self-heal after an instance is removed by hand, reschedule after its worker is
//! stopped, and the cost of one reconcile pass, with Orion's default settings.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::config::{AppsConfig, HealthConfig, MigrationConfig};
use orion::testkit::{TestApp, docker, spawn_app_with};
use serde_json::{Value, json};

use crate::report;

const IMAGE: &str = "orion/demo-app:latest";

pub async fn run(runs: usize, workers: usize, apps: usize) -> anyhow::Result<()> {
    if workers < 2 {
        bail!("rescheduling needs at least 2 workers");
    }
    let app = spawn_app_with(
        workers,
        Box::new(|c| {
            c.health = HealthConfig::default();
            c.migration = MigrationConfig::default();
            c.apps = AppsConfig::default();
        }),
    )
    .await;
    // Steady state: the watch connections (which carry the engines' events) are open.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.ctx.ssh.watched() < workers {
        if Instant::now() > deadline {
            bail!("the watch sessions did not open within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "apps: {runs} runs, {workers} workers, default settings (apps.interval {:?}, \
         dead_after {}, retry_delay {:?})",
        app.ctx.config.apps.interval,
        app.ctx.config.health.dead_after,
        app.ctx.config.health.retry_delay
    );
    create(&app, "bench", 1, 8080).await?;
    let mut heal = Vec::new();
    let mut heal_http = Vec::new();
    for run in 1..=runs {
        let i = running_instance(&app, "bench", None).await?;
        let container = i["container"].as_str().context("container")?.to_owned();
        let host = i["host"].as_str().context("host")?.to_owned();
        answering(
            &host,
            i["id"].as_u64().context("id")?,
            Duration::from_secs(20),
        )
        .await?;
        let restarts = i["restarts"].as_u64().unwrap_or(0);
        let removed = Instant::now();
        docker(&["rm", "-f", &container]);
        let again = running_instance(&app, "bench", Some(restarts)).await?;
        let t_api = removed.elapsed();
        answering(
            &host,
            again["id"].as_u64().context("id")?,
            Duration::from_secs(20),
        )
        .await?;
        let t_http = removed.elapsed();
        println!(
            "heal run {run:>2}: rm -f → running {:>5} ms, answering {:>5} ms",
            t_api.as_millis(),
            t_http.as_millis()
        );
        heal.push(t_api);
        heal_http.push(t_http);
    }

    let mut moved = Vec::new();
    let mut moved_http = Vec::new();
    for run in 1..=runs {
        let i = running_instance(&app, "bench", None).await?;
        let first = i["worker"].as_str().context("worker")?.to_owned();
        let worker = app.worker(&first);
        let stopped = Instant::now();
        worker.stop();
        let again = loop {
            let (_, v) = app.get_json("/api/apps/bench").await;
            let elsewhere = v["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| i["status"] == "running" && i["worker"] != first.as_str())
                .cloned();
            if let Some(i) = elsewhere {
                break i;
            }
            if stopped.elapsed() > Duration::from_secs(60) {
                bail!("run {run}: the instance did not move within 60 s: {v}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let t_api = stopped.elapsed();
        let host = again["host"].as_str().context("host")?;
        answering(
            host,
            again["id"].as_u64().context("id")?,
            Duration::from_secs(20),
        )
        .await?;
        let t_http = stopped.elapsed();
        println!(
            "move run {run:>2}: {first} stopped → running elsewhere {:>5} ms, answering {:>5} ms",
            t_api.as_millis(),
            t_http.as_millis()
        );
        moved.push(t_api);
        moved_http.push(t_http);
        // The worker returns and is fenced before the next run.
        worker.start();
        for _ in 0..app.ctx.config.health.alive_after {
            orion::loops::health::probe_round(&app.ctx, &app.loops.probes).await?;
        }
        orion::loops::apps::apps_pass(&app.ctx, &app.loops.apps).await?;
    }

    // One pass over every worker, nothing to change: its cost.
    for a in 0..apps {
        create(&app, &format!("load{a}"), workers as u32, 8081 + a as u16).await?;
    }
    let instances = apps * workers + 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, list) = app.get_json("/api/apps").await;
        let ready: u64 = list["apps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a["ready"].as_u64().unwrap_or(0))
            .sum();
        if ready as usize == instances {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {instances} instances ran within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let passes = 20;
    let mut walls = Vec::new();
    let (cpu_before, _) = report::cpu_times();
    for _ in 0..passes {
        let started = Instant::now();
        let summary = orion::loops::apps::apps_pass(&app.ctx, &app.loops.apps).await?;
        walls.push(started.elapsed());
        if summary.started + summary.removed + summary.placed > 0 {
            bail!("a steady pass changed something: {summary:?}");
        }
    }
    let (cpu_after, _) = report::cpu_times();
    let cpu_per_pass = (cpu_after - cpu_before) / passes;

    println!();
    report::line("rm -f → running again (API)", &mut heal);
    report::line("rm -f → answering HTTP again", &mut heal_http);
    report::line("docker stop → running elsewhere", &mut moved);
    report::line("docker stop → answering elsewhere", &mut moved_http);
    report::line(
        &format!("steady pass, {workers} workers × {instances} inst."),
        &mut walls,
    );
    println!(
        "steady pass: {} ms of CPU in this process (Orion and the harness), 1 SSH command \
         per worker (`orion-runtime ps`), {} passes",
        cpu_per_pass.as_millis(),
        passes
    );
    Ok(())
}

/// An app of `replicas` demo instances listening on `port`.
async fn create(app: &TestApp, name: &str, replicas: u32, port: u16) -> anyhow::Result<()> {
    let resp = app
        .http
        .post(app.url("/api/apps"))
        .json(
            &json!({"name": name, "image": IMAGE, "replicas": replicas, "port": port,
                      "env": {"PORT": port.to_string()}}),
        )
        .send()
        .await?;
    if resp.status() != 201 {
        bail!("creating {name}: {}", resp.text().await.unwrap_or_default());
    }
    Ok(())
}

/// The app's running instance; with `restarts_above`, once it has been restarted more
/// often than that (polling every 5 ms).
async fn running_instance(
    app: &TestApp,
    name: &str,
    restarts_above: Option<u64>,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let (_, v) = app.get_json(&format!("/api/apps/{name}")).await;
        let found = v["instances"].as_array().into_iter().flatten().find(|i| {
            i["status"] == "running"
                && restarts_above.is_none_or(|n| i["restarts"].as_u64().unwrap_or(0) > n)
        });
        if let Some(i) = found {
            return Ok(i.clone());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{name} has no running instance within 60 s: {v}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the instance `id` answers HTTP on `host:8080`.
async fn answering(host: &str, id: u64, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()?;
    let started = Instant::now();
    loop {
        if let Ok(resp) = client.get(format!("http://{host}:8080/")).send().await
            && let Ok(body) = resp.json::<Value>().await
            && body["instance"].as_str() == Some(id.to_string().as_str())
        {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("instance {id} did not answer on {host}:8080 within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
