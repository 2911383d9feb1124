//! The harness shared by the integration tests and the benchmarks: real MariaDB, real
//! sshd worker containers, the real application on port 0. `scripts/test.sh` starts
//! MariaDB and builds the worker image; every test gets its own database and its own
//! worker containers. Failures panic with a message saying what is missing: this is
//! harness code, never used by `orion serve`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::context::Context;
use crate::ssh::{Auth, SshClient, Target};
use crate::startup::Application;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use serde_json::Value;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

/// The MariaDB server the tests use; `scripts/test.sh` starts it and sets this.
fn database_server_url() -> String {
    std::env::var("ORION_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "ORION_TEST_DATABASE_URL is not set: these tests need a running MariaDB. \
             Run them with `scripts/test.sh`, which starts one in Docker."
        )
    })
}

fn worker_image() -> String {
    let image =
        std::env::var("ORION_TEST_WORKER_IMAGE").unwrap_or_else(|_| "orion/worker:latest".into());
    let found = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &image])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `docker` ({e}): these tests need Docker"));
    assert!(
        found.status.success(),
        "worker image {image} is missing: build it with `scripts/images.sh` \
         (or run the tests with `scripts/test.sh`)"
    );
    image
}

pub fn docker(args: &[&str]) -> String {
    docker_with_env(args, &[])
}

/// Several `docker` commands started together (a leader and a worker killed at the same
/// moment), each of which must succeed.
pub fn docker_at_once(commands: &[&[&str]]) {
    let children: Vec<_> = commands
        .iter()
        .map(|args| {
            Command::new("docker")
                .args(*args)
                .spawn()
                .expect("cannot run docker")
        })
        .collect();
    for (mut child, args) in children.into_iter().zip(commands) {
        assert!(child.wait().unwrap().success(), "docker {args:?} failed");
    }
}

/// `docker` with `env` in its environment: what `docker exec -e NAME` passes on, so that a
/// secret never stands on a command line.
pub fn docker_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("docker")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("cannot run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A port free on every interface of this machine.
pub fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The base of a free block of `n` consecutive ports (`base + 1 ..= base + n`), for
/// workers published by `scripts/workers.sh`.
pub fn free_port_block(n: u16) -> u16 {
    free_ports_at(&[1..=n])
}

/// A base such that every `base + offset` of `offsets` is a free port (sites' workers
/// publish theirs in blocks of 100 above the base).
pub fn free_ports_at(offsets: &[std::ops::RangeInclusive<u16>]) -> u16 {
    'base: for base in (24000..30000).step_by(50) {
        for i in offsets.iter().flat_map(|r| r.clone()) {
            if TcpListener::bind(("0.0.0.0", base + i)).is_err() {
                continue 'base;
            }
        }
        return base;
    }
    panic!("no free ports at {offsets:?} above any base");
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// Most processes (and threads) a worker container may hold: a tenant's fork bomb stops
/// there instead of exhausting the host. The tenants' own limit inside the worker
/// (`docker/worker/limits.conf`, 256) is lower, so root's sshd keeps room.
pub const WORKER_PIDS_LIMIT: u32 = 1024;

/// Most memory a worker container may use, swap included (`--memory-swap` equal to
/// `--memory`: no swap): a tenant's memory hog is OOM-killed inside its worker. A limit,
/// not a reservation: hundreds of idle workers still fit on one host.
pub const WORKER_MEMORY_BYTES: u64 = 512 * 1024 * 1024;

/// The `docker run` options that bound a worker container, as `scripts/workers.sh` sets
/// them in the lab: [`WORKER_PIDS_LIMIT`], [`WORKER_MEMORY_BYTES`], `no-new-privileges`
/// (no setuid program raises a tenant's privileges) and the kernel's floor of privileged
/// ports.
pub fn worker_limit_args() -> Vec<String> {
    let memory = format!("{}m", WORKER_MEMORY_BYTES / (1024 * 1024));
    vec![
        "--pids-limit".into(),
        WORKER_PIDS_LIMIT.to_string(),
        "--memory".into(),
        memory.clone(),
        "--memory-swap".into(),
        memory,
        "--security-opt".into(),
        "no-new-privileges".into(),
        // Containers let any user bind ports below 1024; a worker keeps the kernel's
        // usual floor, so no tenant can take sshd's port 22 while sshd re-execs.
        "--sysctl".into(),
        "net.ipv4.ip_unprivileged_port_start=1024".into(),
    ]
}

/// The host's container engine socket, mounted where `orion-runtime` looks for it.
pub const RUNTIME_SOCKET_MOUNT: &str = "/var/run/docker.sock:/var/lib/orion/runtime/docker.sock";

/// One sshd worker container, published on a fixed loopback port so that a stop and a
/// start keep its address. Removed when dropped.
pub struct Worker {
    pub name: String,
    pub container: String,
    pub port: u16,
}

impl Worker {
    pub fn start_new(name: &str, orion_public_key: &str) -> Self {
        let image = worker_image();
        let container = format!("orion-test-{}-{name}", short_id());
        let port = free_port();
        let (publish, key) = (
            format!("127.0.0.1:{port}:22"),
            format!("ORION_AUTHORIZED_KEY={orion_public_key}"),
        );
        let limits = worker_limit_args();
        let mut args = vec!["run", "-d", "--name", &container];
        args.extend(["--label", "orion.test=1", "-p", &publish, "-e", &key]);
        // The engine's socket, root-only inside the worker: apps' instances run as its
        // siblings, in its namespaces (as scripts/workers.sh does).
        args.extend(["-v", RUNTIME_SOCKET_MOUNT]);
        args.extend(limits.iter().map(String::as_str));
        args.push(&image);
        docker(&args);
        let worker = Self {
            name: name.to_owned(),
            container,
            port,
        };
        worker.wait_for_sshd();
        worker
    }

    /// Waits until sshd sends its banner on the published port.
    pub fn wait_for_sshd(&self) {
        use std::io::Read;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                let mut banner = [0u8; 4];
                if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "worker {} did not start sshd on port {} within 30 s: {}",
                self.container,
                self.port,
                docker(&["logs", "--tail", "20", &self.container])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&self) {
        docker(&["stop", "-t", "1", &self.container]);
    }

    pub fn start(&self) {
        docker(&["start", &self.container]);
        self.wait_for_sshd();
    }

    /// Runs a shell command inside the container as root and returns its stdout.
    pub fn exec(&self, script: &str) -> String {
        docker(&["exec", &self.container, "sh", "-c", script])
    }

    /// Gives the worker new host keys, as a reinstalled (or impersonated) machine would.
    pub fn rotate_host_keys(&self) {
        self.exec("orion-rotate-host-keys >/dev/null");
        std::thread::sleep(Duration::from_millis(300));
        self.wait_for_sshd();
    }

    /// The worker's address on its Docker network: where its apps' instances listen.
    pub fn address(&self) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.container,
        ])
    }

    /// Whether a login exists on the worker.
    pub fn has_user(&self, user: &str) -> bool {
        self.exec(&format!(
            "getent passwd {user} >/dev/null && echo yes || echo no"
        )) == "yes"
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Its apps' instances first: siblings on the engine, they outlive the worker.
        let node = format!("label=orion.node={}", self.container);
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &node])
            .output()
        {
            let ids = String::from_utf8_lossy(&out.stdout);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.container])
            .output();
    }
}

/// The admin token of test configurations.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// An HTTP client that sends `token` as a bearer token on every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    bearer_client(token).build().expect("an HTTP client")
}

/// A client builder that sends `token` as a bearer token on every request.
fn bearer_client(token: &str) -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}")
            .parse()
            .expect("a token is a valid header"),
    );
    reqwest::Client::builder().default_headers(headers)
}

/// An HTTP client that sends `token` as a bearer token and trusts the CA certificate
/// `ca_pem` (Caddy's internal CA, for the platform behind HTTPS). Every `*.localhost`
/// name (an app's own host, `<app>.apps.localhost`) resolves to loopback.
pub fn client_with_token_and_ca(token: &str, ca_pem: &[u8]) -> reqwest::Client {
    bearer_client(token)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).expect("a PEM certificate"))
        .dns_resolver(std::sync::Arc::new(LoopbackNames))
        .build()
        .expect("an HTTP client")
}

/// Resolves `localhost` and every name under it to 127.0.0.1, as browsers do (RFC 6761):
/// apps are served on hosts of their own (`<app>.apps.localhost`), which the system's
/// resolver may not know. Other names go to the system's resolver.
#[derive(Debug, Clone, Copy)]
pub struct LoopbackNames;

impl reqwest::dns::Resolve for LoopbackNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            if host == "localhost" || host.ends_with(".localhost") {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                return Ok(Box::new(std::iter::once(addr)) as reqwest::dns::Addrs);
            }
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Tweaks to the test configuration.
pub type Tweak = Box<dyn FnOnce(&mut Config)>;

/// A running Orion with its own database and workers.
pub struct TestApp {
    pub address: String,
    pub ctx: Context,
    /// The running loops' own state, for tests that run a pass next to them.
    pub loops: crate::startup::Loops,
    pub workers: Vec<Worker>,
    /// HTTP client carrying the admin token.
    pub http: reqwest::Client,
    /// SSH client with a throwaway key, for logging in as tenants.
    pub tenant_ssh: SshClient,
    /// Holds the inventory; free for a test's own files.
    pub dir: tempfile::TempDir,
    /// Orion's SSH key (`key.path` is what the configuration names).
    pub key: Arc<OrionKey>,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts `n` workers and Orion in front of them, and waits for the first probe round.
pub async fn spawn_app(n: usize) -> TestApp {
    spawn_app_with(n, Box::new(|_| {})).await
}

pub async fn spawn_app_with(n: usize, tweak: Tweak) -> TestApp {
    let key = OrionKey::generate();
    let workers: Vec<Worker> = (1..=n)
        .map(|i| Worker::start_new(&format!("worker_{i}"), &key.public))
        .collect();
    let inventory = inventory_for(&workers);
    spawn_app_on(Arc::new(key), &inventory, workers, tweak).await
}

/// Orion's SSH key for a test or a benchmark, in a private temporary directory.
pub struct OrionKey {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    /// The public key line to authorise on workers.
    pub public: String,
}

impl OrionKey {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::ssh::generate_ed25519();
        let path = dir.path().join("id_ed25519");
        write_private_key(&key, &path);
        let public = crate::ssh::host_key_line(key.public_key());
        Self { dir, path, public }
    }
}

/// Starts Orion on `inventory` (TOML text) with its own database, and waits for the
/// first probe round. `workers` are kept alive as long as the app.
pub async fn spawn_app_on(
    key: Arc<OrionKey>,
    inventory: &str,
    workers: Vec<Worker>,
    tweak: Tweak,
) -> TestApp {
    // ORION_TEST_LOG=<filter> (e.g. `orion=debug`) shows Orion's logs in a test's output.
    if let Ok(filter) = std::env::var("ORION_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let key_path = key.path.clone();
    let inventory_path = dir.path().join("inventory.toml");
    std::fs::write(&inventory_path, inventory).unwrap();

    let database_url = create_database().await;
    let mut config = test_config(&database_url, &inventory_path, &key_path);
    tweak(&mut config);

    let app = Application::build(config)
        .await
        .expect("orion failed to build");
    let address = format!("http://127.0.0.1:{}", app.port());
    let ctx = app.context().clone();
    let loops = app.loops().clone();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    // The loops run a first pass at start; wait for it so tests begin from a probed fleet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ctx
        .loops
        .snapshot()
        .get("health")
        .is_none_or(|s| s.passes == 0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first probe round never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let tenant_ssh = tenant_ssh_client();
    TestApp {
        address,
        ctx,
        loops,
        workers,
        http: client_with_token(ADMIN_TOKEN),
        tenant_ssh,
        dir,
        key,
        shutdown,
        server: Some(server),
    }
}

pub fn write_private_key(key: &PrivateKey, path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, key.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Inventory text for workers published on loopback. Their apps' instances join the
/// worker container's namespaces and are reached at its address.
pub fn inventory_for(workers: &[Worker]) -> String {
    workers.iter().map(|w| inventory_entry(w, "test")).collect()
}

/// [`inventory_for`] with worker `i` on site `sites[i]`.
pub fn inventory_on_sites(workers: &[Worker], sites: &[&str]) -> String {
    workers
        .iter()
        .zip(sites)
        .map(|(w, site)| inventory_entry(w, site))
        .collect()
}

/// One worker's `[[workers]]` table.
pub fn inventory_entry(w: &Worker, site: &str) -> String {
    format!(
        "[[workers]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nsite = \"{site}\"\n\
         instances_join = \"{}\"\napp_host = \"{}\"\n\n",
        w.name,
        w.port,
        w.container,
        w.address()
    )
}

/// A configuration whose loops wait an hour between passes: tests drive rounds
/// themselves, by calling a loop's pass directly.
pub fn test_config(
    database_url: &str,
    inventory: &std::path::Path,
    key: &std::path::Path,
) -> Config {
    let gateway = free_gateway_ports();
    let text = format!(
        r#"
        listen = "127.0.0.1:0"
        inventory = "{inventory}"
        playbooks = "{playbooks}"
        [database]
        url = "{database_url}"
        max_connections = 20
        acquire_timeout = "3s"
        [ssh]
        key = "{key}"
        host_ca_key = "{host_ca}"
        connect_timeout = "3s"
        command_timeout = "20s"
        [health]
        interval = "1h"
        probe_timeout = "3s"
        dead_after = 2
        alive_after = 1
        retry_delay = "100ms"
        [auth]
        admin_token = "{admin_token}"
        [migration]
        interval = "1h"
        # Test receivers of notifications listen on loopback.
        notify_allow = ["127.0.0.1/32"]
        [cleanup]
        interval = "1h"
        [apps]
        interval = "1h"
        [snapshots]
        interval = "1h"
        [gateway]
        ports = "{first}-{last}"
        listen = "127.0.0.1"
        host = "localhost"
        "#,
        host_ca = inventory.with_file_name("host_ca").display(),
        first = gateway.start(),
        last = gateway.end(),
        inventory = inventory.display(),
        playbooks = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("playbooks")
            .display(),
        key = key.display(),
        admin_token = ADMIN_TOKEN,
    );
    Config::from_toml_str(&text).expect("test config is valid")
}

/// Ports of the SSH gateway of one test: a window of loopback ports free right now
/// (tests run in parallel, each with its own gateway).
pub fn free_gateway_ports() -> std::ops::RangeInclusive<u16> {
    const WIDTH: u16 = 8;
    loop {
        // Below the kernel's ephemeral range (32768+), where outgoing connections live.
        let first = 20_000 + (rand::random::<u16>() % 1_500) * WIDTH;
        let ports = first..=first + WIDTH - 1;
        let bound: Vec<_> = ports
            .clone()
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if bound.len() == usize::from(WIDTH) {
            return ports;
        }
    }
}

/// Creates a fresh database for one test and returns its URL.
pub async fn create_database() -> String {
    let server = database_server_url();
    let name = format!("orion_test_{}", short_id());
    let mut conn = sqlx::MySqlConnection::connect(&server)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to MariaDB at ORION_TEST_DATABASE_URL ({e}); \
             is it running? `scripts/test.sh` starts it"
            )
        });
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    format!("{}/{name}", server.trim_end_matches('/'))
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn rent(&self, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/api/rent"))
            .json(&body)
            .send()
            .await
            .expect("rent request failed")
    }

    /// Rents, insists on 201, and returns the rental.
    pub async fn rent_ok(&self, body: Value) -> Value {
        let resp = self.rent(body).await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 201, "rent failed: {text}");
        serde_json::from_str(&text).expect("a rental is JSON")
    }

    /// `DELETE /api/rentals/{id}` with the admin token; returns the status.
    pub async fn release(&self, id: &str) -> reqwest::StatusCode {
        self.http
            .delete(self.url(&format!("/api/rentals/{id}")))
            .send()
            .await
            .expect("release request failed")
            .status()
    }

    /// Makes a tenant token with the admin token; returns its id and the token.
    pub async fn tenant_token(&self, tenant: &str) -> (String, String) {
        self.tenant_token_with(serde_json::json!({ "tenant": tenant }))
            .await
    }

    /// Makes a tenant token from a `POST /api/tokens` body (e.g. with `max_rentals`);
    /// returns its id and the token.
    pub async fn tenant_token_with(&self, body: Value) -> (String, String) {
        let resp = self
            .http
            .post(self.url("/api/tokens"))
            .json(&body)
            .send()
            .await
            .expect("token request failed");
        assert_eq!(resp.status(), 201, "making a token: {body}");
        let made: Value = resp.json().await.expect("a token is JSON");
        (
            made["id"].as_str().expect("token id").to_owned(),
            made["token"].as_str().expect("token").to_owned(),
        )
    }

    /// `POST /api/workers/{name}/drain` as the admin.
    pub async fn drain(&self, worker: &str) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/api/workers/{worker}/drain")))
            .send()
            .await
            .unwrap()
    }

    /// The worker's row in this test's database.
    pub async fn worker_row(&self, name: &str) -> crate::store::Worker {
        self.ctx
            .store
            .worker_by_name(name)
            .await
            .expect("reading a worker")
            .unwrap_or_else(|| panic!("no worker named {name} in the database"))
    }

    pub async fn get_json(&self, path: &str) -> (reqwest::StatusCode, Value) {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub fn worker(&self, name: &str) -> &Worker {
        self.workers
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no test worker named {name}"))
    }

    /// Logs in to `host:port` as a tenant and runs `whoami`.
    pub async fn tenant_whoami(
        &self,
        host: &str,
        port: u16,
        user: &str,
        auth: Auth,
    ) -> Result<String, String> {
        whoami(&self.tenant_ssh, host, port, user, auth).await
    }

    /// Polls the rental until `pred` holds, or fails the test after `timeout`.
    pub async fn wait_rental(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (_, rental) = self.get_json(&format!("/api/rentals/{id}")).await;
            if pred(&rental) {
                return rental;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rental never reached the expected state: {rental}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the rental is active on a worker other than `from` (a move done).
    pub async fn wait_moved_off(&self, id: &str, from: &str) -> Value {
        self.wait_rental(id, Duration::from_secs(20), |r| {
            r["status"] == "active" && r["worker"] != from
        })
        .await
    }

    /// Counts rows of a table in this test's database.
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(self.ctx.store.pool())
            .await
            .unwrap()
    }

    /// Stops Orion gracefully and waits for it; the workers and database stay.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }

    /// Kills Orion as `docker kill` would: every task dropped at once, nothing handed
    /// over (its lease expires by itself). The workers and database stay.
    pub async fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Another Orion process on the same database, inventory and key (a replica), with
    /// its own API port and gateway ports.
    pub async fn start_replica(&self) -> Replica {
        let mut config = (*self.ctx.config).clone();
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let ports = free_gateway_ports();
        config.gateway.ports = Some(ports);
        config.leader.instance = None;
        let app = Application::build(config)
            .await
            .expect("the replica failed to build");
        let address = format!("http://127.0.0.1:{}", app.port());
        let ctx = app.context().clone();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Replica {
            address,
            ctx,
            shutdown,
            server: Some(server),
        }
    }
}

/// A second Orion process of a test ([`TestApp::start_replica`]).
pub struct Replica {
    pub address: String,
    pub ctx: Context,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Replica {
    /// Kills it as `docker kill` would.
    pub async fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Logs in to `host:port` as `user` with `ssh` (any host key accepted) and runs `whoami`.
pub async fn whoami(
    ssh: &SshClient,
    host: &str,
    port: u16,
    user: &str,
    auth: Auth,
) -> Result<String, String> {
    let target = Target {
        name: format!("{host}:{port}"),
        host: host.to_owned(),
        port,
        host_key: None,
    };
    let session = ssh
        .connect_as(&target, user, auth)
        .await
        .map_err(|e| e.to_string())?;
    let out = session
        .exec("whoami", None)
        .await
        .map_err(|e| e.to_string())?;
    session.close().await;
    Ok(out.stdout.trim().to_owned())
}

/// A tenant's plain OpenSSH client (the `ssh` and `scp` programs): its own key, and a
/// `known_hosts` holding only the lines `GET /api/ssh/known_hosts` gave, with strict
/// checking, so that any host key the CA does not vouch for fails the login.
pub struct OpenSshTenant {
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// The public key line, for the rent.
    pub public: String,
    /// What `GET /api/ssh/known_hosts` answered.
    pub known_hosts_lines: String,
}

/// What one `ssh` run gave.
pub struct Ran {
    pub ok: bool,
    /// Trimmed.
    pub stdout: String,
    pub stderr: String,
}

impl OpenSshTenant {
    /// A new key and the CA's lines, in files of `app`'s directory named after `name`.
    pub async fn new(app: &TestApp, name: &str) -> Self {
        assert!(
            Command::new("ssh").arg("-V").output().is_ok(),
            "the OpenSSH client `ssh` is missing: install openssh-client"
        );
        let key = crate::ssh::generate_ed25519();
        let path = app.dir.path().join(format!("{name}_ed25519"));
        write_private_key(&key, &path);
        let resp = app
            .http
            .get(app.url("/api/ssh/known_hosts"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "GET /api/ssh/known_hosts");
        let lines = resp.text().await.unwrap();
        let known_hosts = app.dir.path().join(format!("{name}_known_hosts"));
        std::fs::write(&known_hosts, &lines).unwrap();
        Self {
            key: path,
            known_hosts,
            public: crate::ssh::host_key_line(key.public_key()),
            known_hosts_lines: lines,
        }
    }

    /// The options `ssh` and `scp` share; `port_flag` is `-p` for ssh, `-P` for scp.
    pub fn args(&self, port_flag: &str, port: u16) -> Vec<String> {
        let option = |o: String| ["-o".to_owned(), o];
        let mut args = vec!["-F".into(), "/dev/null".into(), "-i".into()];
        args.push(self.key.display().to_string());
        for o in [
            "IdentitiesOnly=yes".to_owned(),
            "BatchMode=yes".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            "ConnectTimeout=10".to_owned(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".to_owned(),
            "LogLevel=ERROR".to_owned(),
        ] {
            args.extend(option(o));
        }
        args.extend([port_flag.to_owned(), port.to_string()]);
        args
    }

    /// Runs `command` as `user` at `host:port`. Async: the gateway forwarding the login
    /// may run on the caller's own runtime.
    pub async fn ssh(&self, host: &str, port: u16, user: &str, command: &str) -> Ran {
        let out = tokio::process::Command::new("ssh")
            .args(self.args("-p", port))
            .arg(format!("{user}@{host}"))
            .arg(command)
            .output()
            .await
            .expect("ssh runs");
        Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// An SSH client with a throwaway key, for logging in as tenants.
pub fn tenant_ssh_client() -> SshClient {
    SshClient::with_key(
        Arc::new(crate::ssh::generate_ed25519()),
        "nobody",
        Duration::from_secs(5),
        Duration::from_secs(10),
        64,
    )
}

/// A tenant key pair and its public line.
pub fn tenant_key() -> (Arc<PrivateKey>, String) {
    let key = crate::ssh::generate_ed25519();
    let public = crate::ssh::host_key_line(key.public_key());
    (Arc::new(key), public)
}
pub mod platform;
