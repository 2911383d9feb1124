//! Rent latency through the real platform: `scripts/platform.sh up` (Caddy, orion and
//! MariaDB under docker-compose, workers from `scripts/workers.sh`), then `POST /api/rent`
//! over HTTPS through Caddy until an SSH login with the rented key works, with the native
//! executor and then with Ansible, on the same workers in the same run.
//!
//! It runs its own platform (project `orion-bench`, its own ports and worker names) and
//! removes it at the end.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::testkit::{free_port, free_port_block};

use crate::rents;

pub const PROJECT: &str = "orion-bench";
const WORKERS: u16 = 2;

pub struct Platform {
    env: Vec<(&'static str, String)>,
}

impl Platform {
    pub fn script(&self, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<()> {
        let status = Command::new(repo().join("scripts/platform.sh"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(extra.iter().copied())
            .status()
            .context("cannot run scripts/platform.sh")?;
        if !status.success() {
            bail!("scripts/platform.sh {} failed", args.join(" "));
        }
        Ok(())
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.script(&["down", "--volumes"], &[]);
        let _ = Command::new(repo().join("scripts/workers.sh"))
            .arg("down")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status();
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Platform {
    /// The benchmarks' own platform (project `orion-bench`, its own ports and worker
    /// names), taken down when dropped.
    pub fn new(https_port: u16, workers: u16) -> anyhow::Result<Self> {
        let binary = std::env::current_exe()?.with_file_name("orion");
        Ok(Platform {
            env: vec![
                ("ORION_PROJECT", PROJECT.into()),
                ("ORION_HTTPS_PORT", https_port.to_string()),
                ("ORION_WORKER_PREFIX", format!("{PROJECT}-")),
                (
                    "ORION_WORKER_BASE_PORT",
                    free_port_block(workers).to_string(),
                ),
                ("ORION_BINARY", binary.display().to_string()),
            ],
        })
    }
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let https_port = free_port();
    let platform = Platform::new(https_port, WORKERS)?;
    platform.script(&["down", "--volumes"], &[])?;
    println!(
        "rent latency through Caddy (HTTPS, docker-compose platform): {runs} rents per \
         executor, {WORKERS} workers"
    );
    let base = format!("https://localhost:{https_port}");
    let mut results = Vec::new();
    for executor in ["native", "ansible"] {
        // `up` again with another executor recreates only the orion container.
        platform.script(
            &["up", &WORKERS.to_string()],
            &[("ORION_EXECUTOR", executor)],
        )?;
        let http = https_client()?;
        wait_all_alive(&http, &base, WORKERS as usize).await?;
        results.push(rents::run(&http, &base, runs, executor).await?);
    }
    println!();
    rents::compare(&results[0], &results[1]);
    Ok(())
}

/// A client that trusts the platform's Caddy CA and sends the admin token.
pub fn https_client() -> anyhow::Result<reqwest::Client> {
    let dir = repo().join(format!(".platform/{PROJECT}"));
    let cert = std::fs::read(dir.join("caddy-root.crt")).context("Caddy's root certificate")?;
    let env = std::fs::read_to_string(dir.join(".env")).context("the platform's .env")?;
    let token = env
        .lines()
        .find_map(|l| l.strip_prefix("ORION_ADMIN_TOKEN="))
        .context("no admin token in .env")?;
    Ok(orion::testkit::client_with_token_and_ca(token, &cert))
}

pub async fn wait_all_alive(http: &reqwest::Client, base: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while crate::footprint::alive_workers(http, base).await.ok() != Some(n) {
        if Instant::now() > deadline {
            bail!("the platform's workers are not all alive after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
