//! The control plane without a single box, measured on the compose platforms (project
//! `orion-bench`, removed at the end):
//!
//! - rent latency (sequential rents through Caddy) and throughput (one client per worker,
//!   each renting and releasing for a while) on one MariaDB with one replica (the default
//!   platform), then on Galera (`up --ha`) with one replica, then with two;
//! - on Galera with two replicas, `runs` times each: the leading replica killed until
//!   another leads; the leader and a rented worker killed together until the rental is
//!   active elsewhere; the Galera node taking the writes killed until a rent is made
//!   again, then started until it is synced again.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::testkit::platform::Platform;
use orion::testkit::{docker, docker_at_once};
use serde_json::{Value, json};

use crate::caddy::{platform, script};
use crate::report;

const WORKERS: u16 = 4;

pub async fn run(runs: usize, rents: usize, seconds: u64) -> anyhow::Result<()> {
    let platform = platform(WORKERS)?;
    script(&platform, &["down", "--volumes"], &[])?;
    println!(
        "control-plane HA: rents through Caddy ({rents} sequential, then {WORKERS} clients \
         renting and releasing for {seconds} s), {WORKERS} workers; then {runs} runs of each drill"
    );
    let mut loads = Vec::new();
    script(&platform, &["up", &WORKERS.to_string()], &[])?;
    loads.push((
        "one MariaDB, 1 replica",
        load(&platform, rents, seconds).await?,
    ));
    script(&platform, &["down", "--volumes"], &[])?;
    for replicas in ["1", "2"] {
        script(
            &platform,
            &["up", "--ha", &WORKERS.to_string()],
            &[("ORION_REPLICAS", replicas)],
        )?;
        let label = if replicas == "1" {
            "Galera, 1 replica"
        } else {
            "Galera, 2 replicas"
        };
        loads.push((label, load(&platform, rents, seconds).await?));
    }
    println!();
    let anchor = loads[0].1.throughput;
    for (label, load) in &mut loads {
        println!(
            "{label:<24} rent → 201: {}   throughput {:.1} rents/s ({:.2}× one MariaDB), {} refused",
            report::triple(&load.latency),
            load.throughput,
            load.throughput / anchor,
            load.refused
        );
    }

    println!();
    let mut takeover = Vec::new();
    let mut moved = Vec::new();
    let mut resumed = Vec::new();
    let mut rejoined = Vec::new();
    for run in 1..=runs {
        takeover.push(kill_leader(&platform).await?);
        moved.push(kill_leader_and_worker(&platform).await?);
        let (r, j) = kill_writer(&platform).await?;
        resumed.push(r);
        rejoined.push(j);
        println!(
            "run {run:>2}: leader killed → another leads {:>5} ms; leader + worker killed → \
             rental active elsewhere {:>5} ms; Galera writer killed → next rent {:>5} ms, \
             node back in sync {:>5} ms after its start",
            takeover[run - 1].as_millis(),
            moved[run - 1].as_millis(),
            resumed[run - 1].as_millis(),
            rejoined[run - 1].as_millis()
        );
    }
    println!();
    report::line("leader killed → another leads", &mut takeover);
    report::line("leader + worker → active elsewhere", &mut moved);
    report::line("Galera writer killed → next rent", &mut resumed);
    report::line("Galera node started → synced", &mut rejoined);
    Ok(())
}

struct Load {
    latency: Vec<Duration>,
    throughput: f64,
    refused: usize,
}

/// Sequential rents (each released before the next), then `WORKERS` clients renting and
/// releasing as fast as they can for `seconds`.
async fn load(platform: &Platform, rents: usize, seconds: u64) -> anyhow::Result<Load> {
    let http = platform.client();
    let base = platform.base();
    platform
        .free_workers(&http, WORKERS.into(), Duration::from_secs(180))
        .await;
    let mut latency = Vec::new();
    for _ in 0..rents {
        let (id, took) = rent(&http, &base).await?.context("a rent was refused")?;
        latency.push(took);
        release(&http, &base, &id).await?;
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let clients = (0..WORKERS).map(|_| {
        let http = http.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let (mut made, mut refused) = (0usize, 0usize);
            while Instant::now() < until {
                match rent(&http, &base).await? {
                    Some((id, _)) => {
                        made += 1;
                        release(&http, &base, &id).await?;
                    }
                    None => refused += 1,
                }
            }
            anyhow::Ok((made, refused))
        })
    });
    let started = Instant::now();
    let (mut made, mut refused) = (0, 0);
    for client in futures::future::join_all(clients).await {
        let (m, r) = client??;
        made += m;
        refused += r;
    }
    Ok(Load {
        latency,
        throughput: made as f64 / started.elapsed().as_secs_f64(),
        refused,
    })
}

/// One rent: `Some((id, time to the 201))`, or `None` if it was refused (503: no free
/// worker at that instant, another client's release not yet done).
async fn rent(http: &reqwest::Client, base: &str) -> anyhow::Result<Option<(String, Duration)>> {
    let started = Instant::now();
    let resp = http
        .post(format!("{base}/api/rent"))
        .json(&json!({}))
        .send()
        .await?;
    let took = started.elapsed();
    match resp.status().as_u16() {
        201 => {
            let body: Value = resp.json().await?;
            Ok(Some((
                body["id"].as_str().context("rental id")?.to_owned(),
                took,
            )))
        }
        503 => Ok(None),
        status => bail!(
            "rent answered {status}: {}",
            resp.text().await.unwrap_or_default()
        ),
    }
}

async fn release(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<()> {
    let resp = http
        .delete(format!("{base}/api/rentals/{id}"))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("release of {id} answered {}", resp.status());
    }
    Ok(())
}

/// `docker kill` of the leading replica until another one leads.
async fn kill_leader(platform: &Platform) -> anyhow::Result<Duration> {
    let (leader, epoch) = platform.leader(Duration::from_secs(30)).await;
    let killed = Instant::now();
    docker(&["kill", &leader]);
    let (next, next_epoch) = platform.leader(Duration::from_secs(30)).await;
    let took = killed.elapsed();
    if next == leader || next_epoch <= epoch {
        bail!("no takeover: {next} leads with epoch {next_epoch} (was {epoch})");
    }
    docker(&["start", &leader]);
    platform
        .replica_answers(&leader, Duration::from_secs(60))
        .await;
    Ok(took)
}

/// The leader and a rented worker killed at the same moment, until the rental is active
/// on another worker.
async fn kill_leader_and_worker(platform: &Platform) -> anyhow::Result<Duration> {
    let http = platform.client();
    let base = platform.base();
    platform
        .free_workers(&http, 2, Duration::from_secs(180))
        .await;
    let resp = http
        .post(format!("{base}/api/rent"))
        .json(&json!({}))
        .send()
        .await?;
    if resp.status() != 201 {
        bail!("rent answered {}", resp.status());
    }
    let rental: Value = resp.json().await?;
    let id = rental["id"].as_str().context("id")?.to_owned();
    let first = rental["worker"].as_str().context("worker")?.to_owned();
    let (leader, _) = platform.leader(Duration::from_secs(30)).await;
    let worker = platform.worker(&first);
    let killed = Instant::now();
    docker_at_once(&[&["kill", &leader], &["kill", &worker]]);
    let took = loop {
        if let Ok(r) = http.get(format!("{base}/api/rentals/{id}")).send().await
            && let Ok(v) = r.json::<Value>().await
            && v["status"] == "active"
            && v["worker"] != first.as_str()
        {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the rental did not move within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    docker(&["start", &leader]);
    docker(&["start", &worker]);
    platform
        .replica_answers(&leader, Duration::from_secs(60))
        .await;
    release(&http, &base, &id).await?;
    Ok(took)
}

/// `docker kill` of the Galera node HAProxy sends the writes to, until a rent through
/// Caddy is made again; then `docker start` of it until it is synced again (IST).
async fn kill_writer(platform: &Platform) -> anyhow::Result<(Duration, Duration)> {
    let http = platform.client();
    let base = platform.base();
    platform
        .free_workers(&http, 1, Duration::from_secs(180))
        .await;
    let nodes: Vec<String> = (1..=3)
        .map(|i| platform.container(&format!("galera-{i}")))
        .collect();
    let writer = platform.galera_writer(&nodes[0]);
    let killed = Instant::now();
    docker(&["kill", &writer]);
    let resumed = loop {
        let attempt = http
            .post(format!("{base}/api/rent"))
            .timeout(Duration::from_secs(10))
            .json(&json!({}))
            .send()
            .await;
        if let Ok(r) = attempt
            && r.status() == 201
        {
            let took = killed.elapsed();
            let v: Value = r.json().await?;
            release(&http, &base, v["id"].as_str().context("id")?).await?;
            break took;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("no rent made within 60 s of the writer's death");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let started = Instant::now();
    docker(&["start", &writer]);
    platform.healthy(&writer, Duration::from_secs(300)).await;
    Ok((resumed, started.elapsed()))
}
