//! Probe rounds over fleets of 10, 100, 500… workers, timed against `ansible all -m ping`
//! over the same workers in the same run.
//!
//! Orion is timed three ways per size ([`Mode`]): **cold**, where every probe opens a new
//! SSH connection and runs `true`; **exec**, where every probe runs `true` in a new
//! channel of the watch connection; and its **default**, where between two commands
//! (`health.exec_every`) a probe is a keepalive round trip on the watch connection.
//! Ansible is timed two ways: its first run opens every connection; later runs reuse
//! them through OpenSSH's ControlPersist.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use orion::config::HealthConfig;
use orion::testkit::{OrionKey, TestApp, spawn_app_on};

use crate::fleet::Fleet;
use crate::report;

/// Connect and probe timeout of the benchmark's Orion (defaults: 5 s).
pub const COLD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Args {
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub ansible: bool,
    pub ansible_runs: usize,
    pub forks: Option<usize>,
}

/// How the probes of a timed round reach the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No watch connections: every probe connects, authenticates and runs `true`.
    Cold,
    /// Over the watch connections, every probe runs `true` (`exec_every = 0s`).
    Exec,
    /// Orion's defaults: over the watch connections, keepalive round trips between two
    /// commands.
    Default,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Cold => "cold",
            Mode::Exec => "exec",
            Mode::Default => "default",
        }
    }
}

pub async fn run(args: Args, fleet: &Fleet, key: &Arc<OrionKey>) -> anyhow::Result<()> {
    let mut table = String::new();
    for &size in &args.sizes {
        println!("\n## {size} workers ({} rounds each)", args.rounds);
        let (cold, _) = orion_rounds(fleet, key, size, args.rounds, Mode::Cold).await?;
        let (exec, _) = orion_rounds(fleet, key, size, args.rounds, Mode::Exec).await?;
        let (default, host_keys) =
            orion_rounds(fleet, key, size, args.rounds, Mode::Default).await?;
        let mut line = format!(
            "| {size} | {} | {} | {} |",
            report::triple(&cold),
            report::triple(&exec),
            report::triple(&default)
        );
        if args.ansible {
            let forks = args.forks.unwrap_or(size);
            let (first, later) =
                ansible_rounds(fleet, key, &host_keys, args.ansible_runs, forks).await?;
            let _ = write!(
                line,
                " {} ms | {} | {:.0}× / {:.0}× / {:.0}× |",
                first.as_millis(),
                report::triple(&later),
                first.as_secs_f64() / report::median(&cold).as_secs_f64(),
                report::median(&later).as_secs_f64() / report::median(&exec).as_secs_f64(),
                report::median(&later).as_secs_f64() / report::median(&default).as_secs_f64(),
            );
        }
        table.push_str(&line);
        table.push('\n');
    }
    println!(
        "\n| workers | Orion cold (min / median / max ms) | Orion exec | Orion default | Ansible first run | Ansible later runs | Orion faster (cold / exec / default) |"
    );
    println!("|---|---|---|---|---|---|---|");
    print!("{table}");
    Ok(())
}

/// Starts Orion over the first `size` workers and times `rounds` full probe rounds.
async fn orion_rounds(
    fleet: &Fleet,
    key: &Arc<OrionKey>,
    size: usize,
    rounds: usize,
    mode: Mode,
) -> anyhow::Result<(Vec<Duration>, Vec<(String, String)>)> {
    let watch = mode != Mode::Cold;
    let exec_every = match mode {
        Mode::Exec => Duration::ZERO,
        _ => HealthConfig::default().exec_every,
    };
    let app = spawn_app_on(
        key.clone(),
        &fleet.inventory(size),
        Vec::new(),
        Box::new(move |c| {
            // Orion's defaults, except that this benchmark runs the rounds itself, and
            // that a cold round's handshakes, which queue for this machine's cores behind
            // every worker's sshd, are given time to finish rather than timed out.
            c.health = HealthConfig {
                interval: Duration::from_secs(3600),
                watch,
                exec_every,
                probe_timeout: COLD_TIMEOUT,
                ..HealthConfig::default()
            };
            c.ssh.connect_timeout = COLD_TIMEOUT;
        }),
    )
    .await;
    if watch {
        wait_for_watches(&app, size).await?;
    }
    // Recorded on first use by the first round; Ansible checks the same keys.
    let host_keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT ssh_host, known_host_key FROM workers \
         WHERE known_host_key IS NOT NULL ORDER BY name",
    )
    .fetch_all(app.ctx.store.pool())
    .await?;
    ensure!(
        host_keys.len() == size,
        "the first round recorded {} of {size} host keys",
        host_keys.len()
    );
    let what = mode.name();
    let progress = orion::progress::bar(rounds as u64, &format!("orion {what} rounds"));
    let mut samples = Vec::new();
    let cpu_before = report::cpu_times().0;
    let machine_before = report::machine_busy();
    for _ in 0..rounds {
        let started = Instant::now();
        let summary = orion::loops::health::probe_round(&app.ctx, &app.loops.probes).await?;
        samples.push(started.elapsed());
        ensure!(
            summary.alive == size,
            "a {what} round saw {summary:?} of {size} workers"
        );
        progress.inc(1);
    }
    progress.finish_and_clear();
    let cpu = (report::cpu_times().0 - cpu_before) / rounds as u32;
    let machine = (report::machine_busy() - machine_before) / rounds as u32;
    report::line(&format!("orion {what} round"), &mut samples.clone());
    println!(
        "{:<34} CPU per round: Orion {} ms, whole machine {} ms (the workers' sshd, Docker)",
        "",
        cpu.as_millis(),
        machine.as_millis()
    );
    Ok((samples, host_keys))
}

async fn wait_for_watches(app: &TestApp, size: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while app.ctx.ssh.watched() < size {
        if Instant::now() > deadline {
            bail!(
                "only {} of {size} watch sessions opened in 180 s",
                app.ctx.ssh.watched()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs `ansible all -m ping` over the same workers `rounds + 1` times: the first run
/// opens the connections, the others reuse them (ControlPersist).
async fn ansible_rounds(
    fleet: &Fleet,
    key: &Arc<OrionKey>,
    host_keys: &[(String, String)],
    rounds: usize,
    forks: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let dir = tempfile::tempdir()?;
    let size = host_keys.len();
    let mut inventory = String::from("[workers]\n");
    for w in &fleet.workers[..size] {
        let _ = writeln!(inventory, "{} ansible_host={}", w.name, w.ip);
    }
    std::fs::write(dir.path().join("hosts"), inventory)?;
    // Host keys checked, as Orion does: the keys Orion recorded.
    let known_hosts: String = host_keys
        .iter()
        .map(|(host, key)| format!("{host} {key}\n"))
        .collect();
    std::fs::write(dir.path().join("known_hosts"), known_hosts)?;
    std::fs::create_dir(dir.path().join("cp"))?;
    let key_path = key.path.clone();
    tokio::task::spawn_blocking(move || {
        let ping = || ansible_ping(dir.path(), &key_path, forks, size);
        let progress = orion::progress::bar(rounds as u64 + 1, "ansible ping runs");
        let first = ping()?;
        progress.inc(1);
        let mut later = Vec::new();
        for _ in 0..rounds {
            later.push(ping()?);
            progress.inc(1);
        }
        progress.finish_and_clear();
        // Close the persistent connections this benchmark opened.
        for socket in std::fs::read_dir(dir.path().join("cp"))?.flatten() {
            let _ = Command::new("ssh")
                .args(["-o", &format!("ControlPath={}", socket.path().display())])
                .args(["-O", "exit", "x"])
                .output();
        }
        println!("{:<34} {} ms", "ansible ping, first run", first.as_millis());
        report::line("ansible ping, later runs", &mut later.clone());
        Ok((first, later))
    })
    .await?
}

/// One `ansible all -m ping` over the inventory in `dir`, forks raised, pipelining on,
/// host keys checked; fails unless every worker answered.
fn ansible_ping(dir: &Path, key: &Path, forks: usize, size: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let children_before = report::cpu_times().1;
    let machine_before = report::machine_busy();
    let out = Command::new("ansible")
        .args(["all", "-i"])
        .arg(dir.join("hosts"))
        .args(["-m", "ping", "-o", "-u", "root"])
        .args(["--forks", &forks.to_string()])
        .arg("--private-key")
        .arg(key)
        .env("ANSIBLE_PIPELINING", "True")
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
        .env("ANSIBLE_CONTROL_PATH_DIR", dir.join("cp"))
        .env(
            "ANSIBLE_SSH_ARGS",
            format!(
                "-C -o ControlMaster=auto -o ControlPersist=300s -o UserKnownHostsFile={}",
                dir.join("known_hosts").display()
            ),
        )
        .env("ANSIBLE_LOCAL_TEMP", dir.join("tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .context("cannot run `ansible` (install ansible-core)")?;
    let elapsed = started.elapsed();
    let cpu = report::cpu_times().1 - children_before;
    let machine = report::machine_busy() - machine_before;
    println!(
        "{:<34} {} ms; CPU: Ansible and its ssh {} ms, whole machine {} ms",
        "ansible ping run",
        elapsed.as_millis(),
        cpu.as_millis(),
        machine.as_millis()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ok = stdout.lines().filter(|l| l.contains("SUCCESS")).count();
    if !out.status.success() || ok != size {
        bail!(
            "ansible ping: {ok} of {size} answered ({}): {}",
            out.status,
            stdout
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
                .filter(|l| !l.contains("SUCCESS"))
                .take(5)
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    Ok(elapsed)
}
