//! An app behind Caddy under a steady load, on the docker-compose platform: requests
//! lost when one instance is killed by hand, then when a worker hosting one is stopped;
//! and how long after an instance runs the traffic reaches it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::testkit::docker;
use serde_json::{Value, json};

use crate::caddy::{PROJECT, platform, script};

const WORKERS: u16 = 3;

/// What the load saw in one window.
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    failed: usize,
    server_errors: usize,
}

pub async fn run(rate: u32, seconds: u64) -> anyhow::Result<()> {
    let platform = platform(WORKERS)?;
    script(&platform, &["down", "--volumes"], &[])?;
    script(&platform, &["up", &WORKERS.to_string()], &[])?;
    let http = platform.client();
    let base = platform.base();
    platform
        .free_workers(&http, WORKERS.into(), Duration::from_secs(120))
        .await;
    println!(
        "app behind Caddy under load: {rate} requests/s for {seconds} s, 2 replicas, \
         {WORKERS} workers (docker-compose platform, HTTPS through Caddy)"
    );

    let resp = http
        .post(format!("{base}/api/apps"))
        .json(
            &json!({"name": "load", "image": "orion/demo-app:latest", "replicas": 2, "port": 8080}),
        )
        .send()
        .await?;
    if resp.status() != 201 {
        bail!(
            "creating the app: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let url = platform.app_url("load");
    let view = wait_for_instances(&http, &base, &url, 2).await?;

    // The load: one request every 1/rate s, each on its own task, answers tallied by
    // the second they were sent in.
    let started = Instant::now();
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut requests = tokio::task::JoinSet::new();
    let kill_at = Duration::from_secs(seconds / 4);
    let stop_at = Duration::from_secs(seconds / 2);
    let victim = view["instances"][0]["container"]
        .as_str()
        .context("container")?
        .to_owned();
    let (mut killed, mut stopped) = (None, None);
    let mut worker_stopped = String::new();
    let mut tick = tokio::time::interval(period);
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let at = started.elapsed();
        if killed.is_none() && at >= kill_at {
            docker(&["rm", "-f", &victim]);
            killed = Some(at);
        }
        if stopped.is_none() && at >= stop_at {
            // A worker hosting a running instance of the app now.
            let (_, v) = get(&http, &format!("{base}/api/apps/load")).await?;
            let worker = v["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| i["status"] == "running")
                .and_then(|i| i["worker"].as_str())
                .context("no running instance to stop the worker of")?
                .to_owned();
            worker_stopped = platform.worker(&worker);
            docker(&["stop", &worker_stopped]);
            stopped = Some(at);
        }
        let http = http.clone();
        let url = url.clone();
        requests.spawn(async move {
            let status = match http.get(&url).timeout(Duration::from_secs(10)).send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            (at, status)
        });
    }
    let mut before = Tally::default();
    let mut after_kill = Tally::default();
    let mut after_stop = Tally::default();
    let (kill, stop) = (killed.context("no kill")?, stopped.context("no stop")?);
    while let Some(done) = requests.join_next().await {
        let (at, status) = done?;
        let tally = if at < kill {
            &mut before
        } else if at < stop {
            &mut after_kill
        } else {
            &mut after_stop
        };
        tally.sent += 1;
        if status != 200 {
            tally.failed += 1;
        }
        if status >= 500 {
            tally.server_errors += 1;
        }
    }
    docker(&["start", &worker_stopped]);
    let sync = sync_cost(&http, &base).await?;
    println!();
    for (what, t) in [
        ("steady", &before),
        ("instance killed (rm -f)", &after_kill),
        ("worker stopped (docker stop)", &after_stop),
    ] {
        println!(
            "{what:<30} {:>5} requests, {:>3} failed ({} 5xx)",
            t.sent, t.failed, t.server_errors
        );
    }
    println!(
        "config sync through the admin socket: {} ms for a change of one app's upstreams, \
         {} ms median when nothing differs (n=20)",
        sync.0.as_millis(),
        sync.1.as_millis()
    );
    drop(platform);
    Ok(())
}

/// What one sync of Caddy's routes costs, measured with Orion's own router on the
/// platform's admin socket (reached in its Docker volume): applying the app's route
/// once (a change), then syncing with nothing to change.
async fn sync_cost(http: &reqwest::Client, base: &str) -> anyhow::Result<(Duration, Duration)> {
    use orion::apps::caddy::{Admin, AppRoute, Router};
    let volume = format!("{PROJECT}_caddy-admin");
    let dir = docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &volume]);
    let router = Router::new(
        Admin::Unix(std::path::Path::new(&dir).join("admin.sock")),
        "localhost",
    );
    let (_, v) = get(http, &format!("{base}/api/apps/load")).await?;
    let upstreams = v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["status"] == "running")
        .filter_map(|i| Some(format!("{}:8080", i["host"].as_str()?)))
        .collect();
    let routes = [AppRoute {
        name: "load".into(),
        upstreams,
        health_path: "/".into(),
    }];
    let started = Instant::now();
    router.sync(&routes).await?;
    let change = started.elapsed();
    let mut same = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let synced = router.sync(&routes).await?;
        same.push(started.elapsed());
        if synced != Default::default() {
            bail!("a sync with nothing to change changed {synced:?}");
        }
    }
    Ok((change, crate::report::median(&same)))
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Value)> {
    let resp = http.get(url).send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Waits until `n` instances run and each has answered through Caddy; prints how long
/// after the API showed an instance running its first request through Caddy reached it.
async fn wait_for_instances(
    http: &reqwest::Client,
    base: &str,
    url: &str,
    n: usize,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut running_since: std::collections::HashMap<String, Instant> = Default::default();
    let mut reached: std::collections::HashMap<String, Duration> = Default::default();
    loop {
        let (_, view) = get(http, &format!("{base}/api/apps/load")).await?;
        for i in view["instances"].as_array().into_iter().flatten() {
            if i["status"] == "running" {
                running_since
                    .entry(i["id"].to_string().trim_matches('"').to_owned())
                    .or_insert_with(Instant::now);
            }
        }
        if let Ok((200, body)) = get(http, url).await
            && let Some(id) = body["instance"].as_str()
            && let Some(since) = running_since.get(id)
        {
            reached
                .entry(id.to_owned())
                .or_insert_with(|| since.elapsed());
        }
        if reached.len() >= n {
            for (id, after) in &reached {
                println!(
                    "instance {id}: first request through Caddy {} ms after the API showed it running",
                    after.as_millis()
                );
            }
            return Ok(view);
        }
        if Instant::now() > deadline {
            bail!("the app's instances did not all answer through Caddy within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
