//! Rent latency through the real platform: `scripts/platform.sh up` (Caddy, orion and
//! MariaDB under docker-compose, workers from `scripts/workers.sh`), then `POST /api/rent`
//! over HTTPS through Caddy until an SSH login with the rented key works, with the native
//! executor and then with Ansible, on the same workers in the same run.
//!
//! It runs its own platform (project `orion-bench`, its own ports and worker names) and
//! removes it at the end.

use std::time::Duration;

use anyhow::bail;
use orion::testkit::platform::Platform;

use crate::rents;

pub const PROJECT: &str = "orion-bench";
const WORKERS: u16 = 2;

/// The benchmarks' own platform (project `orion-bench`), running the `orion` built
/// beside this benchmark; taken down when dropped.
pub fn platform(workers: u16) -> anyhow::Result<Platform> {
    let binary = std::env::current_exe()?.with_file_name("orion");
    Ok(Platform::new(PROJECT, workers, &binary))
}

/// `scripts/platform.sh` with `args` (and `extra` in its environment), as an error if
/// it fails.
pub fn script(platform: &Platform, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<()> {
    if !platform.script_with(args, extra) {
        bail!("scripts/platform.sh {} failed", args.join(" "));
    }
    Ok(())
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let platform = platform(WORKERS)?;
    script(&platform, &["down", "--volumes"], &[])?;
    println!(
        "rent latency through Caddy (HTTPS, docker-compose platform): {runs} rents per \
         executor, {WORKERS} workers"
    );
    let base = platform.base();
    let mut results = Vec::new();
    for executor in ["native", "ansible"] {
        // `up` again with another executor recreates only the orion container.
        script(
            &platform,
            &["up", &WORKERS.to_string()],
            &[("ORION_EXECUTOR", executor)],
        )?;
        let http = platform.client();
        platform
            .free_workers(&http, WORKERS.into(), Duration::from_secs(120))
            .await;
        results.push(rents::run(&http, &base, runs, executor).await?);
    }
    println!();
    rents::compare(&results[0], &results[1]);
    Ok(())
}
