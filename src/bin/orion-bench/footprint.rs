//! The footprint of a real `orion serve` process over a fleet: resident memory and CPU,
//! sampled every second from `/proc` once every worker is alive and watched.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::testkit::{ADMIN_TOKEN, OrionKey, client_with_token, create_database};
use serde_json::Value;

use crate::fleet::Fleet;

/// Kills the server when the benchmark ends, however it ends: its whole process group,
/// so that a server started under `ORION_BENCH_WRAPPER` goes with its wrapper.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // The child leads its own group (`process_group(0)`), whose id is its pid.
        let group = self.0.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals a process group; no memory involved.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The configurations measured, each as a fresh `orion serve`: the defaults, then the
/// levers on memory (the allocator's per-thread arenas, the watch sessions).
const VARIANTS: &[(&str, &[(&str, &str)])] = &[
    ("defaults", &[]),
    ("health.watch = false", &[("ORION_HEALTH__WATCH", "false")]),
];

pub async fn run(fleet: &Fleet, key: &Arc<OrionKey>, window: Duration) -> anyhow::Result<()> {
    for (name, env) in VARIANTS {
        measure(fleet, key, window, name, env).await?;
    }
    Ok(())
}

async fn measure(
    fleet: &Fleet,
    key: &Arc<OrionKey>,
    window: Duration,
    variant: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<()> {
    let size = fleet.workers.len();
    let dir = tempfile::tempdir()?;
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(&inventory, fleet.inventory(size))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let database = create_database().await;
    let playbooks = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("playbooks");
    // Orion's defaults for everything but the addresses and the timeouts of the first,
    // cold round (see `probe::COLD_TIMEOUT`): what a user runs.
    let timeout = humantime::format_duration(crate::probe::COLD_TIMEOUT);
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\ninventory = \"{}\"\nplaybooks = \"{}\"\n\
         [database]\nurl = \"{database}\"\n[ssh]\nkey = \"{}\"\nconnect_timeout = \"{timeout}\"\n\
         [health]\nprobe_timeout = \"{timeout}\"\n\
         [auth]\nadmin_token = \"{ADMIN_TOKEN}\"\n[log]\nfilter = \"warn\"\n",
        inventory.display(),
        playbooks.display(),
        key.path.display(),
    );
    let config_path = dir.path().join("orion.toml");
    std::fs::write(&config_path, config)?;
    let binary = std::env::current_exe()?.with_file_name("orion");
    if !binary.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release --bin orion`",
            binary.display()
        );
    }
    // ORION_BENCH_WRAPPER="heaptrack -o /tmp/orion" runs the server under a profiler
    // (the figures are then the wrapper's, not Orion's: for the profile only).
    let wrapper = std::env::var("ORION_BENCH_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(&binary);
            c
        }
        None => Command::new(&binary),
    };
    let child = command
        .args(["serve", "--config"])
        .arg(&config_path)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let server = Server(child);
    let pid = server.0.id();
    let http = client_with_token(ADMIN_TOKEN);
    let base = format!("http://127.0.0.1:{port}");

    // Settled: every worker alive and watched (the watch count is not exposed, so give
    // the watches the time of a few handshakes each after the fleet is alive).
    let progress = orion::progress::bar(size as u64, "workers alive");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let alive = alive_workers(&http, &base).await.unwrap_or(0);
        progress.set_position(alive as u64);
        if alive == size {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {alive} of {size} workers alive after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    progress.finish_and_clear();
    tokio::time::sleep(Duration::from_secs(10)).await;

    let ticks_per_second = crate::report::clock_ticks();
    let seconds = window.as_secs().max(1);
    let progress = orion::progress::bar(seconds, "sampling");
    let mut cpu = Vec::new();
    let mut rss = Vec::new();
    let mut last = cpu_ticks(pid)?;
    let mut last_at = Instant::now();
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_ticks(pid)?;
        let at = Instant::now();
        let used = (now - last) as f64 / ticks_per_second as f64;
        cpu.push(100.0 * used / (at - last_at).as_secs_f64());
        rss.push(status_kib(pid, "VmRSS")?);
        (last, last_at) = (now, at);
        progress.inc(1);
    }
    progress.finish_and_clear();
    // Idle: from 2 s after a probe round ends, for 20 s, which ends before the next.
    let idle_window = Duration::from_secs(20);
    let round_done = last_round(&http, &base).await?;
    while last_round(&http, &base).await? == round_done {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_ticks(pid)?;
    tokio::time::sleep(idle_window).await;
    let idle = 100.0 * (cpu_ticks(pid)? - before) as f64
        / ticks_per_second as f64
        / idle_window.as_secs_f64();
    let peak = status_kib(pid, "VmHWM")?;
    let average = cpu.iter().sum::<f64>() / cpu.len() as f64;
    let mut sorted = cpu.clone();
    sorted.sort_by(f64::total_cmp);
    let mut rss_sorted = rss.clone();
    rss_sorted.sort();
    println!(
        "\n`orion serve` over {size} workers, {variant} (probe round every {} s), \
         sampled every second for {seconds} s:",
        orion::config::HealthConfig::default().interval.as_secs()
    );
    println!(
        "  resident memory: median {:.1} MB, max {:.1} MB, peak since start (VmHWM) {:.1} MB",
        mib(rss_sorted[rss_sorted.len() / 2]),
        mib(rss_sorted[rss_sorted.len() - 1]),
        mib(peak)
    );
    println!(
        "  CPU, % of one core: between rounds (20 s) {idle:.2} %; over the {seconds} s \
         window, rounds included: average {average:.2} %, busiest second {:.1} %",
        sorted[sorted.len() - 1]
    );
    Ok(())
}

/// How many workers `GET /api/workers` says are alive.
pub async fn alive_workers(http: &reqwest::Client, base: &str) -> anyhow::Result<usize> {
    let workers: Value = http
        .get(format!("{base}/api/workers"))
        .send()
        .await?
        .json()
        .await?;
    let list = workers["workers"].as_array().context("workers list")?;
    Ok(list.iter().filter(|w| w["status"] == "alive").count())
}

/// When the health loop last finished a round, as `/api/status` says.
async fn last_round(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let health: Value = http
        .get(format!("{base}/api/status"))
        .send()
        .await?
        .json()
        .await?;
    Ok(health["loops"]["health"]["last_success"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// User plus system CPU time of the server, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    crate::report::cpu_ticks(&pid.to_string())
        .map(|(own, _)| own)
        .context("the server exited during the measurement")
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("the server exited during the measurement")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("status format")?
        .parse()?)
}
