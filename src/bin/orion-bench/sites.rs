//! A whole site lost, on a two-site compose platform (`scripts/platform.sh up --sites 2`,
//! project `orion-bench`, removed at the end): an app of 2 replicas, one per site, and 2
//! rentals on one site; every worker of the site holding the rentals is stopped at once
//! while one client asks the app through Caddy every 20 ms. Measured each run: the time
//! until every rental is active on the other site, until the app runs both replicas
//! there, and the requests that failed. The site is then started again (fenced: its
//! leftover accounts removed), the app spreads over both sites again, and the next run
//! loses the other site.

use std::time::Duration;

use anyhow::bail;
use orion::testkit::platform::Platform;
use serde_json::{Value, json};

use crate::caddy::{PROJECT, script};
use crate::report;

const PER_SITE: u16 = 4;
const RENTALS: usize = 2;

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let binary = std::env::current_exe()?.with_file_name("orion");
    let platform = Platform::with_sites(PROJECT, 2, PER_SITE, &binary);
    script(&platform, &["down", "--volumes"], &[])?;
    script(
        &platform,
        &["up", "--sites", "2", &PER_SITE.to_string()],
        &[],
    )?;
    let http = platform.client();
    let base = platform.base();
    platform
        .free_workers(&http, 2 * usize::from(PER_SITE), Duration::from_secs(180))
        .await;
    println!(
        "whole-site loss: 2 sites of {PER_SITE} workers, an app of 2 replicas (one per site) \
         under load through Caddy, {RENTALS} rentals on the site lost; {runs} runs"
    );
    let resp = http
        .post(format!("{base}/api/apps"))
        .json(&json!({"name": "bench", "image": "orion/demo-app:latest", "replicas": 2, "port": 8080}))
        .send()
        .await?;
    if resp.status() != 201 {
        bail!("creating the app: {}", resp.text().await?);
    }
    let sites = platform.sites(&http).await;
    wait(&platform, &http, &sites).await?;
    let mut rentals = Vec::new();
    for _ in 0..RENTALS {
        let resp = http
            .post(format!("{base}/api/rent"))
            .json(&json!({"site": "a"}))
            .send()
            .await?;
        let rented: Value = resp.json().await?;
        let Some(id) = rented["id"].as_str() else {
            bail!("a rent on site a was refused: {rented}");
        };
        rentals.push(id.to_owned());
    }

    let (mut moved, mut instances, mut lost_requests) = (Vec::new(), Vec::new(), Vec::new());
    let (mut answered, mut failed) = (0, 0);
    let mut site = "a";
    for run in 1..=runs {
        let containers = platform.site_containers(site, PER_SITE);
        let loss = platform
            .lose_site(&http, site, &containers, &rentals, "bench", 2)
            .await;
        println!(
            "run {run:>2}: site {site} lost → {RENTALS} rentals active on the other site {:>5} ms, \
             both instances there {:>5} ms; requests through Caddy {:>4} answered, {:>3} failed \
             {:?} between {:?} after the stop",
            loss.rentals_moved.as_millis(),
            loss.instances_moved.as_millis(),
            loss.answered,
            loss.failed,
            loss.failures,
            loss.failing
        );
        moved.push(loss.rentals_moved);
        instances.push(loss.instances_moved);
        lost_requests.push(loss.failed);
        answered += loss.answered;
        failed += loss.failed;
        platform
            .restore_site(&http, &containers, usize::from(PER_SITE))
            .await;
        // The app spreads over both sites again before the next loss.
        wait(&platform, &http, &sites).await?;
        site = if site == "a" { "b" } else { "a" };
    }
    println!();
    report::line("site lost → rentals active elsewhere", &mut moved);
    report::line("site lost → instances running elsewhere", &mut instances);
    lost_requests.sort();
    println!(
        "requests lost by the app: {failed} of {} ({:.2} %), per run min {} median {} max {}",
        answered + failed,
        100.0 * failed as f64 / (answered + failed).max(1) as f64,
        lost_requests[0],
        lost_requests[lost_requests.len() / 2],
        lost_requests[lost_requests.len() - 1]
    );
    Ok(())
}

/// Waits until the app has one running instance on each site.
async fn wait(
    platform: &Platform,
    http: &reqwest::Client,
    sites: &std::collections::HashMap<String, String>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while platform.app_sites(http, "bench", sites).await != ["a", "b"] {
        if std::time::Instant::now() > deadline {
            bail!("the app never ran one instance per site");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
