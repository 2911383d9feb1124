//! A whole compose platform, as `scripts/platform.sh` makes it, for the end-to-end tests
//! and the benchmarks: its own project, HTTPS port, gateway ports and worker names, so
//! that it never touches a platform a developer has running, nor another test's. Taken
//! down with its data when dropped.
//!
//! For the `--ha` profile it also finds the replica that leads, asks a Galera node, and
//! tells which node HAProxy sends the writes to.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{docker, docker_with_env, free_port, free_port_block, free_ports_at};

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
        Self::on_ports(project, free_port_block(workers.max(14)), binary)
    }

    /// A platform of `sites` sites (`platform.sh up --sites`) of up to `per_site` workers
    /// each: site k's workers publish their ports at base + 100·k + i.
    pub fn with_sites(project: &str, sites: u16, per_site: u16, binary: &std::path::Path) -> Self {
        let mut offsets = vec![1..=14];
        offsets.extend((1..=sites).map(|k| 100 * k + 1..=100 * k + per_site));
        Self::on_ports(project, free_ports_at(&offsets), binary)
    }

    fn on_ports(project: &str, worker_base: u16, binary: &std::path::Path) -> Self {
        let https_port = free_port();
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

    /// Runs `scripts/workers.sh` with `args` on this platform.
    pub fn workers_script(&self, args: &[&str]) -> bool {
        Command::new(repo().join("scripts/workers.sh"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .expect("cannot run scripts/workers.sh")
            .success()
    }

    /// The platform's events of `kind`, oldest first (the latest thousand events).
    pub async fn events(&self, http: &reqwest::Client, kind: &str) -> Vec<String> {
        let page: Value = match http
            .get(format!("{}/api/events?last=1000", self.base()))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        page["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter(|e| e["kind"] == kind)
                    .filter_map(|e| e["message"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
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

    /// An app's own origin, through Caddy (the clients of [`Platform::client`] resolve it).
    pub fn app_url(&self, app: &str) -> String {
        format!("https://{app}.apps.localhost:{}/", self.https_port)
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

/// What losing a whole site cost, measured under load through Caddy (see
/// [`Platform::lose_site`]).
#[derive(Debug, Clone)]
pub struct SiteLoss {
    /// From the stop until every rental was active on another site.
    pub rentals_moved: Duration,
    /// From the stop until the app had all its replicas running on other sites.
    pub instances_moved: Duration,
    /// Requests to the app through Caddy that answered 2xx, and those that did not.
    pub answered: u64,
    pub failed: u64,
    /// The failures by what they were (`502`, `503`, `timeout`…), and when the first and
    /// the last came, from the stop.
    pub failures: std::collections::BTreeMap<String, u64>,
    pub failing: Option<(Duration, Duration)>,
}

impl Platform {
    /// Each worker's site, from `GET /api/workers`.
    pub async fn sites(&self, http: &reqwest::Client) -> HashMap<String, String> {
        let fleet = get_json(http, &format!("{}/api/workers", self.base())).await;
        fleet["workers"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .filter_map(|w| Some((w["name"].as_str()?.into(), w["site"].as_str()?.into())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The sites of app `app`'s running instances, sorted.
    pub async fn app_sites(
        &self,
        http: &reqwest::Client,
        app: &str,
        sites: &HashMap<String, String>,
    ) -> Vec<String> {
        let view = get_json(http, &format!("{}/api/apps/{app}", self.base())).await;
        let mut on: Vec<String> = view["instances"]
            .as_array()
            .map(|is| {
                is.iter()
                    .filter(|i| i["status"] == "running")
                    .filter_map(|i| sites.get(i["worker"].as_str()?).cloned())
                    .collect()
            })
            .unwrap_or_default();
        on.sort();
        on
    }

    /// The containers of site `site`'s workers (`workers.sh up N --site S` names them).
    pub fn site_containers(&self, site: &str, per_site: u16) -> Vec<String> {
        (1..=per_site)
            .map(|i| self.worker(&format!("worker_{site}_{i}")))
            .collect()
    }

    /// The drill: every worker of `site` (`containers`) stopped at once, while one client
    /// asks app `app` through Caddy every 20 ms (bounded: 3 minutes at most). Returns
    /// once every rental of `rentals` is active on another site and the app runs
    /// `replicas` instances none of which is on `site`, after 3 s more of load.
    pub async fn lose_site(
        &self,
        http: &reqwest::Client,
        site: &str,
        containers: &[String],
        rentals: &[String],
        app: &str,
        replicas: usize,
    ) -> SiteLoss {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

        let base = self.base();
        let sites = self.sites(http).await;
        // The app answers through Caddy before the load starts (its route may still be
        // catching up with its instances).
        let url = self.app_url(app);
        let ready = Instant::now() + Duration::from_secs(60);
        while !matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) {
            assert!(
                Instant::now() < ready,
                "app {app} does not answer through Caddy"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let started = Instant::now() + Duration::from_secs(1);
        let load = {
            let (http, url) = (http.clone(), self.app_url(app));
            let (stop, counts) = (stop.clone(), counts.clone());
            tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs(180);
                let mut failures = std::collections::BTreeMap::<String, u64>::new();
                let mut failing: Option<(Duration, Duration)> = None;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let failure = match http.get(&url).timeout(Duration::from_secs(5)).send().await
                    {
                        Ok(r) if r.status().is_success() => None,
                        Ok(r) => Some(r.status().as_u16().to_string()),
                        Err(e) if e.is_timeout() => Some("timeout".to_owned()),
                        Err(_) => Some("connection".to_owned()),
                    };
                    let counter = if failure.is_none() {
                        &counts.0
                    } else {
                        &counts.1
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Some(kind) = failure {
                        *failures.entry(kind).or_default() += 1;
                        let at = Instant::now().saturating_duration_since(started);
                        failing = Some(failing.map_or((at, at), |(first, _)| (first, at)));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (failures, failing)
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stops: Vec<Vec<&str>> = containers
            .iter()
            .map(|c| vec!["stop", "-t", "1", c.as_str()])
            .collect();
        let lost_at = Instant::now();
        super::docker_at_once(&stops.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let deadline = lost_at + Duration::from_secs(120);
        let (mut rentals_moved, mut instances_moved) = (None, None);
        while rentals_moved.is_none() || instances_moved.is_none() {
            assert!(
                Instant::now() < deadline,
                "site {site} lost: rentals moved {rentals_moved:?}, instances moved {instances_moved:?} within 120 s"
            );
            if rentals_moved.is_none() {
                let mut all = true;
                for id in rentals {
                    let r = get_json(http, &format!("{base}/api/rentals/{id}")).await;
                    all &= r["status"] == "active" && r["site"] != site && !r["site"].is_null();
                }
                if all {
                    rentals_moved = Some(lost_at.elapsed());
                }
            }
            if instances_moved.is_none() {
                let on = self.app_sites(http, app, &sites).await;
                if on.len() == replicas && on.iter().all(|s| s != site) {
                    instances_moved = Some(lost_at.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let (failures, failing) = load.await.expect("the load task");
        SiteLoss {
            rentals_moved: rentals_moved.expect("measured"),
            instances_moved: instances_moved.expect("measured"),
            answered: counts.0.load(Ordering::Relaxed),
            failed: counts.1.load(Ordering::Relaxed),
            failures,
            failing,
        }
    }

    /// Starts the workers in `containers` again and waits until `free` workers are
    /// alive and free (the returning site fenced: leftover accounts removed).
    pub async fn restore_site(&self, http: &reqwest::Client, containers: &[String], free: usize) {
        let starts: Vec<Vec<&str>> = containers
            .iter()
            .map(|c| vec!["start", c.as_str()])
            .collect();
        super::docker_at_once(&starts.iter().map(Vec::as_slice).collect::<Vec<_>>());
        self.free_workers(http, free, Duration::from_secs(120))
            .await;
    }
}

/// A GET's JSON answer (`Null` when there is none).
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    match http.get(url).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
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
