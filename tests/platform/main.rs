//! The compose platforms end to end, each as `scripts/platform.sh up` makes it: the
//! README's walk on the default platform ([`walk`]) and the drills of the `--ha` one
//! ([`ha`]). Each runs a platform of its own (its own project, ports and worker names),
//! so they never touch one a developer has running, nor each other.

mod ha;
mod walk;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use orion::testkit::docker;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One platform of `scripts/platform.sh`, taken down with its data when dropped.
pub struct Platform {
    pub project: &'static str,
    pub https_port: u16,
    pub env: Vec<(&'static str, String)>,
}

impl Platform {
    pub fn script(&self, args: &[&str]) -> bool {
        Command::new(repo().join("scripts/platform.sh"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .expect("cannot run scripts/platform.sh")
            .success()
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
        let env = std::fs::read_to_string(self.dir().join(".env")).unwrap();
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("{name} is in .env"))
    }

    pub fn admin_token(&self) -> String {
        self.env_value("ORION_ADMIN_TOKEN")
    }

    /// A client that trusts the platform's Caddy CA (saved by `platform.sh up`) and sends
    /// the admin token.
    pub fn client(&self) -> reqwest::Client {
        let cert = std::fs::read(self.dir().join("caddy-root.crt"))
            .expect("platform.sh saves Caddy's root certificate");
        orion::testkit::client_with_token_and_ca(&self.admin_token(), &cert)
    }

    pub fn base(&self) -> String {
        format!("https://localhost:{}", self.https_port)
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.script(&["down", "--volumes"]);
    }
}

pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
