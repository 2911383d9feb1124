//! A fleet of lightweight sshd worker containers for benchmarks over hundreds of workers.
//!
//! The containers sit on a private Docker network and are reached at their own addresses,
//! port 22: no published ports, so no `docker-proxy` process per worker. Each generates
//! only an ed25519 host key at start, and is bounded like a lab worker (pids, memory:
//! limits, not reservations). Everything is removed when the fleet is dropped.

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::testkit::docker;

/// `docker run` calls in flight while the fleet starts.
const STARTERS: usize = 6;

pub struct Fleet {
    network: String,
    pub workers: Vec<FleetWorker>,
}

pub struct FleetWorker {
    pub name: String,
    pub container: String,
    pub ip: String,
}

impl Fleet {
    /// Starts `n` workers authorising `orion_key`, and waits until each sshd answers.
    pub fn start(n: usize, orion_key: &str) -> anyhow::Result<Self> {
        let image = std::env::var("ORION_TEST_WORKER_IMAGE")
            .unwrap_or_else(|_| "orion/worker:latest".into());
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let network = format!("orion-bench-{tag}");
        docker(&["network", "create", "--label", "orion.bench=1", &network]);
        let mut fleet = Self {
            network,
            workers: Vec::new(),
        };
        let progress = orion::progress::bar(n as u64, "starting workers");
        let next = AtomicUsize::new(1);
        let started = Mutex::new(Vec::new());
        let failure = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..STARTERS {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i > n || failure.lock().unwrap().is_some() {
                            return;
                        }
                        let name = format!("w{i:03}");
                        let container = format!("orion-bench-{tag}-{name}");
                        let out = Command::new("docker")
                            .args(["run", "-d", "--name", &container])
                            .args(["--label", "orion.bench=1", "--network", &fleet.network])
                            .args(["-e", &format!("ORION_AUTHORIZED_KEY={orion_key}")])
                            .args(orion::testkit::worker_limit_args())
                            .arg(&image)
                            .output();
                        match out {
                            Ok(o) if o.status.success() => {
                                started.lock().unwrap().push((name, container));
                                progress.inc(1);
                            }
                            Ok(o) => {
                                *failure.lock().unwrap() = Some(format!(
                                    "docker run {container}: {}",
                                    String::from_utf8_lossy(&o.stderr).trim()
                                ));
                            }
                            Err(e) => *failure.lock().unwrap() = Some(format!("docker: {e}")),
                        }
                    }
                });
            }
        });
        progress.finish_and_clear();
        let mut started = started.into_inner().unwrap();
        started.sort();
        fleet.workers = started
            .into_iter()
            .map(|(name, container)| FleetWorker {
                name,
                container,
                ip: String::new(),
            })
            .collect();
        if let Some(failure) = failure.into_inner().unwrap() {
            bail!("the fleet did not start: {failure}");
        }
        for chunk in fleet.workers.chunks_mut(100) {
            let mut args = vec![
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            ];
            args.extend(chunk.iter().map(|w| w.container.as_str()));
            let ips = docker(&args);
            for (worker, ip) in chunk.iter_mut().zip(ips.lines()) {
                worker.ip = ip.trim().to_owned();
            }
        }
        fleet.wait_for_sshd()?;
        Ok(fleet)
    }

    /// Waits until every worker sends its SSH banner.
    fn wait_for_sshd(&self) -> anyhow::Result<()> {
        let progress = orion::progress::bar(self.workers.len() as u64, "waiting for sshd");
        let deadline = Instant::now() + Duration::from_secs(120);
        for worker in &self.workers {
            while !banner(&worker.ip) {
                if Instant::now() > deadline {
                    bail!(
                        "{} ({}) has no sshd after 120 s",
                        worker.container,
                        worker.ip
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok(())
    }

    /// Inventory text for the first `n` workers.
    pub fn inventory(&self, n: usize) -> String {
        self.workers[..n]
            .iter()
            .map(|w| {
                format!(
                    "[[workers]]\nname = \"{}\"\nhost = \"{}\"\nport = 22\nsite = \"bench\"\n\n",
                    w.name, w.ip
                )
            })
            .collect()
    }
}

fn banner(ip: &str) -> bool {
    let Ok(addr) = format!("{ip}:22").parse() else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).is_ok() && &head == b"SSH-"
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let progress = orion::progress::bar(self.workers.len() as u64, "removing workers");
        for chunk in self.workers.chunks(50) {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(chunk.iter().map(|w| &w.container))
                .output();
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output()
            .context("docker network rm");
    }
}
