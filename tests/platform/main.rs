//! The compose platforms end to end, each as `scripts/platform.sh up` makes it: the
//! README's walk on the default platform ([`walk`]) and the drills of the `--ha` one
//! ([`ha`]). Each runs a platform of its own (its own project, ports and worker names),
//! so they never touch one a developer has running, nor each other.

mod ha;
mod sites;
mod walk;

use std::sync::Arc;
use std::time::{Duration, Instant};

use orion::ssh::Auth;
use orion::testkit::{tenant_ssh_client, whoami};

/// Logs in as `user` with `key` on `localhost:port` and runs `whoami`.
pub async fn tenant_login(
    port: u16,
    user: &str,
    key: Arc<russh::keys::PrivateKey>,
) -> Result<String, String> {
    whoami(
        &tenant_ssh_client(),
        "localhost",
        port,
        user,
        Auth::Key(key),
    )
    .await
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
