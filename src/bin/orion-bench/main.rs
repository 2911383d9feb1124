//! `orion-bench`: benchmarks against real sshd worker containers and MariaDB.
//! Run through `scripts/bench.sh`, which starts what they need.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::Utc;
use clap::{Parser, Subcommand};
use orion::config::{HealthConfig, MigrationConfig};
use orion::ssh::Auth;
use orion::testkit::{spawn_app_with, tenant_key};
use serde_json::{Value, json};

mod apps;
mod apps_caddy;
mod caddy;
mod continuity;
mod fleet;
mod flood;
mod footprint;
mod ha;
mod leader;
mod probe;
mod rents;
mod report;
mod sites;

#[derive(Parser)]
#[command(
    name = "orion-bench",
    about = "Orion benchmarks on the local Docker setup"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// The stop-the-worker drill, N times, with Orion's default settings: time from
    /// `docker stop` to the worker declared dead, to the rental active elsewhere, and to
    /// a working SSH login there with the same key.
    Failover {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Workers in the fleet.
        #[arg(long, default_value_t = 3)]
        workers: usize,
    },
    /// Apps with default settings: an instance removed by hand (`docker rm -f`) until it
    /// runs and answers again; its worker stopped until it runs and answers elsewhere;
    /// then the cost of one steady reconcile pass over every worker.
    Apps {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Apps of one instance per worker each, for the pass cost.
        #[arg(long, default_value_t = 3)]
        apps: usize,
    },
    /// An app of 2 replicas behind Caddy on the docker-compose platform under a steady
    /// load over HTTPS: requests lost when one instance is removed by hand, then when a
    /// worker hosting one is stopped; time from an instance running to traffic reaching it.
    AppsCaddy {
        /// Requests per second.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// How long the load lasts; the kill comes at 1/4, the stop at 1/2.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Rental continuity with default settings: a home of `home_mb` MB written through
    /// the rental's endpoint, snapshotted, its worker stopped, until a plain OpenSSH
    /// client (only the CA's known_hosts line, strict checking) logs in through the same
    /// endpoint and finds the home intact; the cost of a snapshot pass; `scp` of
    /// `transfer_mb` MB both ways through the gateway against straight to the worker.
    Continuity {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 3)]
        workers: usize,
        #[arg(long, default_value_t = 10)]
        home_mb: usize,
        #[arg(long, default_value_t = 100)]
        transfer_mb: usize,
        /// `snapshots.interval` of the run (the default is 60s: what a failover loses
        /// scales with it).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Leader takeover: two `orion` processes on one database, the leading one killed
    /// (nothing handed over) until the other leads; N times.
    Leader {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// The control plane without a single box (compose platforms): rent latency and
    /// throughput on one MariaDB with one replica, on Galera with one and with two; then
    /// N runs each of the leader killed, the leader and a rented worker killed together,
    /// and the Galera node taking the writes killed (and started again).
    Ha {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Sequential rents timed per configuration.
        #[arg(long, default_value_t = 30)]
        rents: usize,
        /// How long the throughput load lasts per configuration.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// A whole site lost (two-site compose platform): every worker of the site holding 2
    /// rentals and an app's instance stopped at once, under load through Caddy, until
    /// the rentals and the app run on the other site; requests lost; N runs.
    Sites {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Rent latency, native executor against Ansible on the same workers in the same run:
    /// `POST /api/rent` until an SSH login with the rented key works, then release.
    Rent {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Rent latency through Caddy on the docker-compose platform (`scripts/platform.sh`),
    /// native executor then Ansible on the same workers: `POST /api/rent` over HTTPS
    /// until an SSH login with the rented key works, then release.
    RentCaddy {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// A tenant's rent while one address floods the API with junk-token requests (the
    /// rate limit answers them 429): rent → 201 with and without the flood, in-process
    /// Orion on loopback, 2 workers.
    Flood {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Concurrent junk-token requests per run.
        #[arg(long, default_value_t = 400)]
        flood: usize,
    },
    /// Probe rounds over fleets of lightweight workers (private Docker network, no
    /// published ports), against `ansible all -m ping` over the same workers; then the
    /// footprint of a real `orion serve` over the largest fleet.
    Probe {
        /// Fleet sizes, comma-separated; one fleet of the largest is started and reused.
        #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
        sizes: Vec<usize>,
        /// Timed rounds per size and mode.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Skip the Ansible comparison.
        #[arg(long)]
        no_ansible: bool,
        /// Timed `ansible all -m ping` runs per size after the first (which opens the
        /// connections).
        #[arg(long, default_value_t = 3)]
        ansible_runs: usize,
        /// Ansible forks (default: one per worker).
        #[arg(long)]
        forks: Option<usize>,
        /// How long to sample `orion serve` over the largest fleet; 0 skips it.
        #[arg(long, default_value = "65s", value_parser = humantime::parse_duration)]
        footprint: Duration,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.bench {
            Bench::Failover { runs, workers } => failover(runs, workers).await,
            Bench::Rent { runs } => rent(runs).await,
            Bench::Apps {
                runs,
                workers,
                apps,
            } => apps::run(runs, workers, apps).await,
            Bench::Continuity {
                runs,
                workers,
                home_mb,
                transfer_mb,
                interval,
            } => continuity::run(runs, workers, home_mb, transfer_mb, interval).await,
            Bench::Leader { runs } => leader::run(runs).await,
            Bench::Ha {
                runs,
                rents,
                seconds,
            } => ha::run(runs, rents, seconds).await,
            Bench::Sites { runs } => sites::run(runs).await,
            Bench::AppsCaddy { rate, seconds } => apps_caddy::run(rate, seconds).await,
            Bench::RentCaddy { runs } => caddy::run(runs).await,
            Bench::Flood { runs, flood } => flood::run(runs, flood).await,
            Bench::Probe {
                sizes,
                rounds,
                no_ansible,
                ansible_runs,
                forks,
                footprint,
            } => {
                let args = probe::Args {
                    sizes,
                    rounds,
                    ansible: !no_ansible,
                    ansible_runs,
                    forks,
                };
                fleet_benches(args, footprint).await
            }
        }
    })
}

async fn failover(runs: usize, workers: usize) -> anyhow::Result<()> {
    if workers < 2 {
        bail!("the drill needs at least 2 workers");
    }
    // Orion's defaults for detection and migration: what a user gets.
    let app = spawn_app_with(
        workers,
        Box::new(|c| {
            c.health = HealthConfig::default();
            c.migration = MigrationConfig::default();
        }),
    )
    .await;
    println!(
        "failover drill: {runs} runs, {workers} workers, default settings \
         (dead_after {}, retry_delay {:?}, keepalive {:?} x {})",
        app.ctx.config.health.dead_after,
        app.ctx.config.health.retry_delay,
        app.ctx.config.health.keepalive_interval,
        app.ctx.config.health.keepalive_max,
    );
    let (key, public) = tenant_key();
    let (mut detect, mut moved, mut login) = (Vec::new(), Vec::new(), Vec::new());
    let progress = orion::progress::bar(runs as u64, "failover runs");
    for run in 1..=runs {
        let resp = app
            .rent(json!({ "ssh_public_key": public, "username": format!("bench{run}") }))
            .await;
        if resp.status() != 201 {
            bail!("rent failed: {}", resp.text().await.unwrap_or_default());
        }
        let body: Value = resp.json().await?;
        let id = body["id"].as_str().context("rental id")?.to_owned();
        let first = body["worker"].as_str().context("worker")?.to_owned();
        let worker = app.worker(&first);

        let stopped_at = Utc::now();
        let stopped = Instant::now();
        worker.stop();
        let (port, t_moved) = loop {
            let (_, r) = app.get_json(&format!("/api/rentals/{id}")).await;
            if r["status"] == "active" && r["worker"] != first.as_str() {
                break (
                    r["port"].as_u64().context("port")? as u16,
                    stopped.elapsed(),
                );
            }
            if stopped.elapsed() > Duration::from_secs(60) {
                bail!("run {run}: the rental did not move within 60 s: {r}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let username = format!("bench{run}");
        let t_login = loop {
            if app
                .tenant_whoami("127.0.0.1", port, &username, Auth::Key(key.clone()))
                .await
                .is_ok_and(|who| who == username)
            {
                break stopped.elapsed();
            }
            if stopped.elapsed() > Duration::from_secs(60) {
                bail!("run {run}: no working login within 60 s");
            }
        };
        let dead_at: chrono::DateTime<Utc> = sqlx::query_scalar(
            "SELECT at FROM events WHERE kind = 'worker.dead' AND worker = ? AND at >= ? \
             ORDER BY id LIMIT 1",
        )
        .bind(&first)
        .bind(stopped_at)
        .fetch_one(app.ctx.store.pool())
        .await
        .context("no worker.dead event")?;
        let t_detect = (dead_at - stopped_at).to_std().unwrap_or_default();
        progress.suspend(|| {
            println!(
                "run {run:>2}: {first} stopped → dead {:>5} ms, moved {:>5} ms, login {:>5} ms",
                t_detect.as_millis(),
                t_moved.as_millis(),
                t_login.as_millis()
            )
        });
        detect.push(t_detect);
        moved.push(t_moved);
        login.push(t_login);

        // Put the fleet back: the worker returns, is fenced, and the rental ends.
        worker.start();
        for _ in 0..app.ctx.config.health.alive_after {
            orion::loops::health::probe_round(&app.ctx, &app.loops.probes).await?;
        }
        orion::loops::cleanup::cleanup_pass(&app.ctx).await?;
        let resp = app
            .http
            .delete(app.url(&format!("/api/rentals/{id}")))
            .send()
            .await?;
        if resp.status() != 204 {
            bail!("release failed: {}", resp.status());
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    println!();
    report::line("stop → declared dead", &mut detect);
    report::line("stop → rental active elsewhere", &mut moved);
    report::line("stop → working login (same key)", &mut login);
    Ok(())
}

async fn rent(runs: usize) -> anyhow::Result<()> {
    use orion::config::ExecutorKind;
    println!("rent latency: {runs} rents per executor, 2 workers, API on loopback");
    let mut results = Vec::new();
    for kind in [ExecutorKind::Native, ExecutorKind::Ansible] {
        let app = spawn_app_with(2, Box::new(move |c| c.provisioning.executor = kind)).await;
        // Steady state: the watch connections that provisioning rides are open (they
        // open within a couple of seconds of the first probe round).
        let deadline = Instant::now() + Duration::from_secs(30);
        while app.ctx.ssh.watched() < app.workers.len() {
            if Instant::now() > deadline {
                bail!("the watch sessions did not open within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        results.push(rents::run(&app.http, &app.address, runs, &format!("{kind:?}")).await?);
    }
    println!();
    rents::compare(&results[0], &results[1]);
    Ok(())
}

async fn fleet_benches(args: probe::Args, footprint: Duration) -> anyhow::Result<()> {
    let largest = args
        .sizes
        .iter()
        .copied()
        .max()
        .context("no fleet size given")?;
    if args.sizes.contains(&0) || args.rounds == 0 || args.ansible_runs == 0 {
        bail!("fleet sizes, rounds and Ansible runs must be at least 1");
    }
    let key = std::sync::Arc::new(orion::testkit::OrionKey::generate());
    println!("starting {largest} lightweight workers");
    let started = Instant::now();
    let fleet = fleet::Fleet::start(largest, &key.public)?;
    println!(
        "{largest} workers up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    probe::run(args, &fleet, &key).await?;
    if !footprint.is_zero() {
        footprint::run(&fleet, &key, footprint).await?;
    }
    Ok(())
}
