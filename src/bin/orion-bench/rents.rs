//! The rent latency loop shared by `rent` (loopback) and `rent-caddy` (through Caddy):
//! `POST /api/rent` with a key, an SSH login with that key at the host and port of the
//! answer, a release; timed to the 201 and to the working login.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::ssh::Auth;
use orion::testkit::{tenant_key, tenant_ssh_client, whoami};
use serde_json::{Value, json};

use crate::report;

/// One executor's samples.
pub struct RentTimes {
    pub answered: Vec<Duration>,
    pub working: Vec<Duration>,
}

/// `runs` rents through `http` (which carries the admin token) against `base`, printing
/// min / median / max under `label`.
pub async fn run(
    http: &reqwest::Client,
    base: &str,
    runs: usize,
    label: &str,
) -> anyhow::Result<RentTimes> {
    let (key, public) = tenant_key();
    let tenant_ssh = tenant_ssh_client();
    let prefix: String = label.to_lowercase().chars().take(3).collect();
    let mut times = RentTimes {
        answered: Vec::new(),
        working: Vec::new(),
    };
    let progress = orion::progress::bar(runs as u64, &format!("{label} rents"));
    for run in 0..runs {
        let username = format!("{prefix}{run}");
        let started = Instant::now();
        let resp = http
            .post(format!("{base}/api/rent"))
            .json(&json!({ "ssh_public_key": public, "username": username }))
            .send()
            .await?;
        if resp.status() != 201 {
            bail!("{label}: rent failed: {}", resp.text().await?);
        }
        times.answered.push(started.elapsed());
        let rental: Value = resp.json().await?;
        let port = rental["port"].as_u64().context("port")? as u16;
        let host = rental["host"].as_str().context("host")?;
        let who = whoami(&tenant_ssh, host, port, &username, Auth::Key(key.clone())).await;
        if who.as_deref() != Ok(username.as_str()) {
            bail!("{label}: the rented login does not work: {who:?}");
        }
        times.working.push(started.elapsed());
        let id = rental["id"].as_str().context("id")?;
        let resp = http
            .delete(format!("{base}/api/rentals/{id}"))
            .send()
            .await?;
        if resp.status() != 204 {
            bail!("{label}: release failed: {}", resp.status());
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    report::line(&format!("{label}: rent → 201"), &mut times.answered.clone());
    report::line(
        &format!("{label}: rent → working login"),
        &mut times.working.clone(),
    );
    Ok(times)
}

/// The medians side by side, and how many times faster native is.
pub fn compare(native: &RentTimes, ansible: &RentTimes) {
    for (what, n, a) in [
        ("rent → 201", &native.answered, &ansible.answered),
        ("rent → working login", &native.working, &ansible.working),
    ] {
        let (n, a) = (report::median(n), report::median(a));
        println!(
            "median {what}: native {} ms, Ansible {} ms: native {:.1}x faster",
            n.as_millis(),
            a.as_millis(),
            a.as_secs_f64() / n.as_secs_f64()
        );
    }
}
