//! The worker image and its container are safe to rent (issue #11, items 10 and 12):
//! sshd offers only modern algorithms (checked with `ssh-audit`), tenants log in only
//! with the keys Orion wrote, and a tenant's fork bomb or memory hog stays inside its
//! limits while Orion's root logins keep working.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orion::ssh::{Auth, SshClient, Target};
use orion::testkit::{WORKER_MEMORY_BYTES, WORKER_PIDS_LIMIT, Worker, write_private_key};
use russh::keys::PrivateKey;

use crate::helpers::{tenant_key, whoami};

/// The tenants' process limit set in the image (`docker/worker/limits.conf`).
const TENANT_NPROC: usize = 256;

/// A worker with Orion's key authorised, and Orion's client for it.
struct Lab {
    worker: Worker,
    /// Orion's client, logging in as root with Orion's key.
    orion: SshClient,
    orion_key: Arc<PrivateKey>,
}

impl Lab {
    fn start(name: &str) -> Self {
        let key = Arc::new(orion::ssh::generate_ed25519());
        let worker = Worker::start_new(name, &orion::ssh::host_key_line(key.public_key()));
        let orion = SshClient::with_key(
            key.clone(),
            "root",
            Duration::from_secs(5),
            Duration::from_secs(20),
            16,
        );
        Self {
            worker,
            orion,
            orion_key: key,
        }
    }

    fn target(&self) -> Target {
        Target {
            name: self.worker.name.clone(),
            host: "127.0.0.1".into(),
            port: self.worker.port,
            host_key: None,
        }
    }

    /// A root login over a new connection, running `true`: what Orion's probe does.
    async fn root_probe(&self) -> Result<Duration, String> {
        orion::probe::Prober::new(self.orion.clone(), Default::default())
            .probe(&self.target(), Duration::from_secs(10))
            .await
            .map(|p| p.latency)
            .map_err(|e| e.to_string())
    }

    /// Creates a tenant account in group orion-tenants, with a uid from a range no other
    /// test uses (the kernel counts a uid's processes across the whole host), and its key
    /// where Orion writes it. Returns the uid and the key.
    fn tenant(&self, user: &str) -> (u32, Arc<PrivateKey>) {
        let uid = 200_000 + rand::random::<u32>() % 100_000;
        let (key, public) = tenant_key();
        self.worker.exec(&format!(
            "useradd -m -s /bin/bash -G orion-tenants -K UID_MIN=200000 -K UID_MAX=399999 -u {uid} {user} && \
             printf '%s\\n' '{public}' > /etc/orion/keys/{user} && \
             chmod 644 /etc/orion/keys/{user}"
        ));
        (uid, key)
    }

    /// How many processes (and threads) of `uid` run on this worker.
    fn processes_of(&self, uid: u32) -> usize {
        self.worker
            .exec(&format!(
                "cat /proc/[0-9]*/task/[0-9]*/status 2>/dev/null | \
                 grep -c '^Uid:[[:space:]]*{uid}[[:space:]]' || true"
            ))
            .parse()
            .expect("a count")
    }

    /// Kills every process of `user`, and waits (bounded) until none is left. Never
    /// panics: it also runs while a failed test unwinds.
    fn kill_all_of(&self, user: &str, uid: u32) {
        let script = format!(
            "for i in $(seq 100); do pkill -KILL -u {user}; \
               grep -qs '^Uid:[[:space:]]*{uid}[[:space:]]' /proc/[0-9]*/status || exit 0; \
               sleep 0.2; done; exit 1"
        );
        let _ = std::process::Command::new("docker")
            .args(["exec", &self.worker.container, "sh", "-c", &script])
            .output();
    }

    /// A client logging in as a tenant, whose commands may run for `limit`.
    fn tenant_client(&self, key: Arc<PrivateKey>, limit: Duration) -> SshClient {
        SshClient::with_key(key, "nobody", Duration::from_secs(5), limit, 4)
    }
}

/// Kills a tenant's processes when the test ends, also when it fails: a uid's count is
/// shared by the whole host.
struct KillOnDrop<'a> {
    lab: &'a Lab,
    user: String,
    uid: u32,
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.lab.kill_all_of(&self.user, self.uid);
    }
}

/// Runs `ssh-audit` against the worker and returns its exit code and output.
async fn ssh_audit(port: u16) -> (Option<i32>, String) {
    let run = tokio::process::Command::new("ssh-audit")
        .args(["-n", "-t", "10", "-p", &port.to_string(), "127.0.0.1"])
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(120), run).await {
        Err(_) => panic!("ssh-audit did not finish within 120 s"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "ssh-audit is missing: this test audits the worker's sshd with it. Install it \
             (`apt-get install ssh-audit`, or `pip install ssh-audit`); scripts/test.sh does"
        ),
        Ok(Err(e)) => panic!("cannot run ssh-audit: {e}"),
        Ok(Ok(out)) => out,
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test]
async fn ssh_audit_finds_no_failing_algorithm_on_a_worker() {
    let lab = Lab::start("audited");
    let (code, output) = ssh_audit(lab.worker.port).await;
    // ssh-audit's exit codes: 0 all good, 2 warnings only, 3 failures, 1 no connection.
    assert!(
        matches!(code, Some(0 | 2)),
        "ssh-audit exited with {code:?}:\n{output}"
    );
    let failures: Vec<&str> = output.lines().filter(|l| l.contains("[fail]")).collect();
    assert!(
        failures.is_empty(),
        "ssh-audit reports {} failing algorithm(s):\n{}\n\nfull output:\n{output}",
        failures.len(),
        failures.join("\n")
    );
    let host_keys: Vec<&str> = output
        .lines()
        .filter_map(|l| l.strip_prefix("(key) "))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(host_keys, ["ssh-ed25519"], "full output:\n{output}");
}

#[tokio::test]
async fn orion_and_openssh_both_log_in_to_a_hardened_worker() {
    let lab = Lab::start("hardened");
    let probe = lab.root_probe().await;
    assert!(probe.is_ok(), "Orion's client cannot log in: {probe:?}");

    // Ansible's executor drives OpenSSH's `ssh`: it must agree with sshd too.
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("id_ed25519");
    write_private_key(&lab.orion_key, &key_path);
    let port = lab.worker.port.to_string();
    let ssh = tokio::process::Command::new("ssh")
        .args(["-i".as_ref(), key_path.as_os_str()])
        .args(["-p", &port, "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"])
        .args(["root@127.0.0.1", "echo ok"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), ssh)
        .await
        .expect("ssh did not finish within 30 s")
        .expect("cannot run `ssh` (the openssh-client package): the Ansible executor needs it");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "OpenSSH's ssh cannot log in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_tenant_logs_in_only_with_the_key_orion_wrote_not_one_in_its_home() {
    let lab = Lab::start("keys");
    let (_, key) = lab.tenant("tia");
    let (home_key, home_public) = tenant_key();
    // A key the tenant (or anything running as the tenant) put in its own home.
    lab.worker.exec(&format!(
        "install -d -m 700 -o tia -g tia /home/tia/.ssh && \
         printf '%s\\n' '{home_public}' > /home/tia/.ssh/authorized_keys && \
         chown tia:tia /home/tia/.ssh/authorized_keys && chmod 600 /home/tia/.ssh/authorized_keys"
    ));
    let client = lab.tenant_client(key.clone(), Duration::from_secs(10));
    let port = lab.worker.port;
    let who = whoami(&client, "127.0.0.1", port, "tia", Auth::Key(key)).await;
    assert_eq!(who.as_deref(), Ok("tia"), "the key in /etc/orion/keys/tia");
    let who = whoami(&client, "127.0.0.1", port, "tia", Auth::Key(home_key)).await;
    assert!(
        who.is_err(),
        "a key in ~/.ssh/authorized_keys let in: {who:?}"
    );
    // Root (Orion) still uses its own authorized_keys.
    assert!(lab.root_probe().await.is_ok());
}

#[tokio::test]
async fn a_worker_container_is_bounded_in_processes_and_memory_and_gains_no_privileges() {
    let lab = Lab::start("bounded");
    let inspect = orion::testkit::docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.PidsLimit}} {{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} \
         {{range .HostConfig.SecurityOpt}}{{.}}{{end}}",
        &lab.worker.container,
    ]);
    let memory = WORKER_MEMORY_BYTES.to_string();
    assert_eq!(
        inspect.split_whitespace().collect::<Vec<_>>(),
        [
            WORKER_PIDS_LIMIT.to_string().as_str(),
            &memory,
            &memory,
            "no-new-privileges"
        ],
        "docker inspect: {inspect}"
    );
}

/// A fork bomb that stops by itself: forks children that sleep (out of the session's
/// output, so the session can end) until fork fails, prints how many it made, then goes
/// on trying for a while as a real one would. Never more than 600, so that on a worker
/// without limits it is only a burden, not a disaster, for the machine.
const FORK_BOMB: &str = r#"
import os, sys, time
made, failed_at = 0, None
deadline = time.time() + 12
while time.time() < deadline:
    if made >= 600:
        break
    try:
        pid = os.fork()
    except OSError:
        if failed_at is None:
            failed_at = made
            print("limit reached after", made, flush=True)
        time.sleep(0.05)
        continue
    if pid == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.execv("/bin/sleep", ["sleep", "60"])
    made += 1
print("made", made, "failed_at", failed_at, flush=True)
"#;

#[tokio::test]
async fn a_tenants_fork_bomb_stops_at_its_limit_and_orion_still_logs_in_as_root() {
    let lab = Lab::start("forkbomb");
    let (uid, key) = lab.tenant("bomber");
    let _cleanup = KillOnDrop {
        lab: &lab,
        user: "bomber".into(),
        uid,
    };
    let client = lab.tenant_client(key.clone(), Duration::from_secs(40));
    let bomb = tokio::spawn(run_as(client, lab.target(), "bomber", key, FORK_BOMB));

    // While the bomb holds everything it could get and keeps trying for more.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut most = 0;
    while Instant::now() < deadline && !bomb.is_finished() {
        most = most.max(lab.processes_of(uid));
        if most >= 250 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(most >= 100, "the bomb never got going: {most} processes");
    for _ in 0..3 {
        let probe = lab.root_probe().await;
        assert!(
            probe.is_ok(),
            "Orion cannot log in as root during the bomb: {probe:?}"
        );
        most = most.max(lab.processes_of(uid));
    }

    let out = tokio::time::timeout(Duration::from_secs(60), bomb)
        .await
        .expect("the bomb ends by itself")
        .unwrap()
        .expect("the bomb's session ends normally");
    most = most.max(lab.processes_of(uid));
    println!("fork bomb: {}; at most {most} processes", out.stdout.trim());
    assert!(
        out.stdout.contains("limit reached after"),
        "fork never failed for the tenant: {} {}",
        out.stdout,
        out.stderr
    );
    assert!(
        most <= TENANT_NPROC,
        "the tenant had {most} processes, over its limit of {TENANT_NPROC}: {}",
        out.stdout
    );
    assert!(lab.root_probe().await.is_ok());
}

/// Allocates (and touches) 2 GiB in 64 MiB steps, printing how far it got.
const MEMORY_HOG: &str = r#"
import sys
chunks = []
for i in range(32):
    chunks.append(b"\x01" * (64 << 20))
    print((i + 1) * 64, "MiB", flush=True)
print("allocated 2 GiB", flush=True)
"#;

/// The most memory the worker's container has used since it started, in bytes.
fn peak_memory(worker: &Worker) -> u64 {
    worker
        .exec(
            "cat /sys/fs/cgroup/memory/memory.memsw.max_usage_in_bytes 2>/dev/null || \
             cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes 2>/dev/null || \
             cat /sys/fs/cgroup/memory.peak",
        )
        .parse()
        .expect("a byte count")
}

#[tokio::test]
async fn a_tenants_memory_hog_is_stopped_inside_its_worker_which_still_answers_root() {
    let lab = Lab::start("memhog");
    let (uid, key) = lab.tenant("hogger");
    let _cleanup = KillOnDrop {
        lab: &lab,
        user: "hogger".into(),
        uid,
    };
    let client = lab.tenant_client(key.clone(), Duration::from_secs(60));
    // The kernel may kill the session's own process rather than python: stopped too.
    let out = run_as(client, lab.target(), "hogger", key, MEMORY_HOG)
        .await
        .unwrap_or_else(|e| orion::ssh::Output {
            stderr: e.to_string(),
            ..Default::default()
        });
    assert!(
        !out.success() && !out.stdout.contains("allocated 2 GiB"),
        "the tenant allocated 2 GiB: {:?} {} {}",
        out.exit_status,
        out.stdout,
        out.stderr
    );
    let peak = peak_memory(&lab.worker);
    assert!(
        peak <= WORKER_MEMORY_BYTES,
        "the worker used {} MiB, over its {} MiB: {}",
        peak >> 20,
        WORKER_MEMORY_BYTES >> 20,
        out.stdout
    );
    let probe = lab.root_probe().await;
    assert!(
        probe.is_ok(),
        "Orion cannot log in as root after the hog: {probe:?}"
    );
}

/// Logs in as tenant `user` and runs the Python `script` (fed on stdin).
async fn run_as(
    client: SshClient,
    target: Target,
    user: &'static str,
    key: Arc<PrivateKey>,
    script: &'static str,
) -> Result<orion::ssh::Output, orion::ssh::SshError> {
    let session = client.connect_as(&target, user, Auth::Key(key)).await?;
    let out = session.exec("python3 -", Some(script.as_bytes())).await;
    session.close().await;
    out
}
