//! A whole compose platform, as `scripts/platform.sh` makes it, for the end-to-end tests
//! and the benchmarks: its own project, HTTPS port, gateway ports and worker names, so
//! that it never touches a platform a developer has running, nor another test's. Taken
//! down with its data when dropped.
//!
//! For the `--ha` profile it also finds the replica that leads, asks a Galera node, and
//! tells which node HAProxy sends the writes to.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{docker, docker_with_env, free_port, free_port_block};

pub struct Platform {
    pub project: String,
    pub https_port: u16,
    /// The gateway's ports (`ORION_GATEWAY_PORTS`).
    pub gateway: std::ops::RangeInclusive<u16>,
    env: Vec<(&'static str, String)>,
}

/// The repository: where `scripts/` and the platforms' generated state live.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Platform {
    /// A platform of project `project` for `workers` workers, on free ports, running
    /// `binary` as orion (no release build needed).
    pub fn new(project: &str, workers: u16, binary: &std::path::Path) -> Self {
        let https_port = free_port();
        let worker_base = free_port_block(workers);
        // The gateway's 4 ports, in the same free block of 50 as the workers' (base + 1..=n).
        let gateway = worker_base + 11..=worker_base + 14;
        Platform {
            project: project.to_owned(),
            https_port,
            env: vec![
                ("ORION_PROJECT", project.to_owned()),
                ("ORION_HTTPS_PORT", https_port.to_string()),
                ("ORION_WORKER_PREFIX", format!("{project}-")),
                ("ORION_WORKER_BASE_PORT", worker_base.to_string()),
                (
                    "ORION_GATEWAY_PORTS",
                    format!("{}-{}", gateway.start(), gateway.end()),
                ),
                ("ORION_BINARY", binary.display().to_string()),
            ],
            gateway,
        }
    }

    /// Runs `scripts/platform.sh` with `args`, and `extra` in its environment.
    pub fn script_with(&self, args: &[&str], extra: &[(&str, &str)]) -> bool {
        Command::new(repo().join("scripts/platform.sh"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(extra.iter().copied())
            .status()
            .expect("cannot run scripts/platform.sh")
            .success()
    }

    pub fn script(&self, args: &[&str]) -> bool {
        self.script_with(args, &[])
    }

    /// A worker's container name.
    pub fn worker(&self, name: &str) -> String {
        format!("{}-{name}", self.project)
    }

    /// The ids of a compose service's containers, running or not.
    pub fn containers(&self, service: &str) -> Vec<String> {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        ids.lines().map(str::to_owned).collect()
    }

    /// The one container of a compose service.
    pub fn container(&self, service: &str) -> String {
        let mut ids = self.containers(service);
        assert_eq!(
            ids.len(),
            1,
            "one {service} container in project {}",
            self.project
        );
        ids.remove(0)
    }

    /// Where `platform.sh` keeps this platform's generated state.
    pub fn dir(&self) -> PathBuf {
        repo().join(format!(".platform/{}", self.project))
    }

    /// A value `platform.sh` generated into the platform's `.env`.
    pub fn env_value(&self, name: &str) -> String {
        let env = std::fs::read_to_string(self.dir().join(".env")).expect("the platform's .env");
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("{name} is not in the platform's .env"))
    }

    pub fn admin_token(&self) -> String {
        self.env_value("ORION_ADMIN_TOKEN")
    }

    /// Caddy's root certificate, which `platform.sh up` saves.
    pub fn caddy_root(&self) -> Vec<u8> {
        std::fs::read(self.dir().join("caddy-root.crt"))
            .expect("platform.sh saves Caddy's root certificate")
    }

    /// A client that trusts Caddy's root certificate and sends the admin token.
    pub fn client(&self) -> reqwest::Client {
        super::client_with_token_and_ca(&self.admin_token(), &self.caddy_root())
    }

    /// The API's address, through Caddy.
    pub fn base(&self) -> String {
        format!("https://localhost:{}", self.https_port)
    }

    /// Waits until `n` workers are alive and free.
    pub async fn free_workers(&self, http: &reqwest::Client, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let free = match http
                .get(format!("{}/api/workers", self.base()))
                .send()
                .await
            {
                Ok(r) => r.json::<Value>().await.ok().and_then(|v| {
                    Some(
                        v["workers"]
                            .as_array()?
                            .iter()
                            .filter(|w| w["status"] == "alive" && w["rental"].is_null())
                            .count(),
                    )
                }),
                Err(_) => None,
            };
            if free.is_some_and(|f| f >= n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} free workers not alive within {timeout:?} (last seen: {free:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The replica leading the loops, and its epoch, once exactly one leads.
    pub async fn leader(&self, timeout: Duration) -> (String, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            let leading: Vec<(String, u64)> = self
                .containers("orion")
                .into_iter()
                .filter_map(|c| {
                    let epoch = replica_health(&c)?["epoch"].as_u64()?;
                    Some((c, epoch))
                })
                .collect();
            if let [one] = leading.as_slice() {
                return one.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no single leader within {timeout:?}: {leading:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the orion replica in `container` answers again (after a start).
    pub async fn replica_answers(&self, container: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while replica_health(container).is_none() {
            assert!(
                Instant::now() < deadline,
                "replica {container} does not answer within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The Galera node HAProxy sends Orion's SQL to now, asked through HAProxy from
    /// `through` with Orion's own account (its password passed by environment, never on
    /// a command line).
    pub fn galera_writer(&self, through: &str) -> String {
        let password = self.env_value("ORION_DB_PASSWORD");
        let host = docker_with_env(
            &[
                "exec",
                "-e",
                "MYSQL_PWD",
                through,
                "mariadb",
                "-hproxy",
                "-uorion",
                "-N",
                "-B",
                "-e",
                "SELECT @@hostname",
            ],
            &[("MYSQL_PWD", &password)],
        );
        self.container(&host)
    }

    /// Waits until a container's health check says healthy.
    pub async fn healthy(&self, container: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while docker(&["inspect", "-f", "{{.State.Health.Status}}", container]) != "healthy" {
            assert!(
                Instant::now() < deadline,
                "{container} not healthy within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.script(&["down", "--volumes"]);
    }
}

/// What one orion replica says of itself (`orion healthcheck` inside its container: which
/// instance, whether it leads, with which epoch), or `None` when it does not answer.
pub fn replica_health(container: &str) -> Option<Value> {
    let out = Command::new("docker")
        .args(["exec", container, "orion", "healthcheck"])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Runs `query` in Orion's database as root on the Galera node `node`, over its socket
/// (root logs in by socket there: no password): the rows, tab-separated.
pub fn galera_sql(node: &str, query: &str) -> String {
    docker(&[
        "exec", node, "mariadb", "-uroot", "-N", "-B", "orion", "-e", query,
    ])
}
