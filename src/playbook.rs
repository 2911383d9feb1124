//! Playbooks: templated shell scripts in `playbooks/`, rendered with a rental's values and
//! run on a worker over SSH.
//!
//! Templates are data, not code. Every value a template prints is shell-quoted by the
//! environment's formatter, so `useradd {{ username }}` can only ever pass one argument,
//! whatever the value holds; template authors cannot forget. The rendered script goes to
//! `sh -s` on stdin, so nothing it contains (a password hash, a key) appears in the
//! worker's process list.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::ssh::{SshClient, SshError, Target};

/// The playbooks Orion runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Playbook {
    /// Creates the tenant's account (idempotent: converges an existing one).
    CreateUser,
    /// Removes the tenant's account, its processes and its home (idempotent).
    DeleteUser,
    /// Runs an app's instance: creates its container, or starts it again (idempotent).
    AppRun,
    /// Removes containers of a worker's node (idempotent).
    AppRemove,
    /// Installs the worker's host certificate and has sshd present it (idempotent).
    HostCert,
    /// Streams a snapshot of a tenant's home (shell only: see [`Playbook::STREAMS`]).
    SnapshotHome,
    /// Restores a snapshot into a tenant's new home (shell only).
    RestoreHome,
}

impl Playbook {
    /// The playbooks of tenants' accounts, rendered with [`Vars`].
    pub const ACCOUNTS: [Playbook; 2] = [Playbook::CreateUser, Playbook::DeleteUser];
    /// The playbooks of apps' instances, rendered with [`AppVars`].
    pub const APPS: [Playbook; 2] = [Playbook::AppRun, Playbook::AppRemove];
    /// The playbooks that stream a home's archive over the SSH channel (out of, or into,
    /// the worker). They always run with Orion's own SSH client, whatever the executor:
    /// Ansible moves files, not streams, and would have to stage every archive on disk
    /// on both sides.
    pub const STREAMS: [Playbook; 2] = [Playbook::SnapshotHome, Playbook::RestoreHome];
    /// The playbooks with an Ansible twin (`<name>.yml`).
    pub const WITH_TWINS: [Playbook; 5] = [
        Playbook::CreateUser,
        Playbook::DeleteUser,
        Playbook::AppRun,
        Playbook::AppRemove,
        Playbook::HostCert,
    ];
    pub const ALL: [Playbook; 7] = [
        Playbook::CreateUser,
        Playbook::DeleteUser,
        Playbook::AppRun,
        Playbook::AppRemove,
        Playbook::HostCert,
        Playbook::SnapshotHome,
        Playbook::RestoreHome,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Playbook::CreateUser => "create_user",
            Playbook::DeleteUser => "delete_user",
            Playbook::AppRun => "app_run",
            Playbook::AppRemove => "app_remove",
            Playbook::HostCert => "host_cert",
            Playbook::SnapshotHome => "snapshot_home",
            Playbook::RestoreHome => "restore_home",
        }
    }

    fn template(self) -> String {
        format!("{}.sh.j2", self.name())
    }
}

/// Template pieces other playbooks include (`{% include %}`).
const PARTIALS: [&str; 1] = ["_end_processes.sh.j2"];

/// The values a playbook is rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct Vars {
    pub username: String,
    /// The account's uid on the worker, Orion's own and never handed to a second tenant
    /// (see [`crate::store::Store::claim_worker_for`]). `None` only when removing an
    /// account made before Orion allocated uids: then the account's own uid is used,
    /// if the account is Orion's.
    pub uid: Option<u32>,
    /// One canonical OpenSSH key line, or none.
    pub public_key: Option<String>,
    /// SHA-512 crypt hash for `/etc/shadow`, or none (key-only login).
    pub password_hash: Option<String>,
}

/// The values an app playbook is rendered with: the spec `orion-runtime` reads on its
/// stdin, as JSON in one base64 word, so that neither the shell nor Ansible's templating
/// ever reads what a tenant wrote.
#[derive(Debug, Clone, Serialize)]
pub struct AppVars {
    pub spec: String,
}

impl AppVars {
    /// The values that hand `spec` to `orion-runtime`.
    pub fn new(spec: &impl Serialize) -> Self {
        use base64::Engine as _;
        let json = serde_json::to_vec(spec).expect("specs serialise");
        Self {
            spec: base64::engine::general_purpose::STANDARD.encode(json),
        }
    }
}

/// The values `host_cert` is rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct CertVars {
    /// The certificate, one OpenSSH line.
    pub certificate: String,
    /// The host key it certifies (the one Orion trusts), one OpenSSH line.
    pub host_key: String,
}

/// The values the home playbooks ([`Playbook::STREAMS`]) are rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct HomeVars {
    pub username: String,
    /// The account's uid on the worker.
    pub uid: u32,
    /// The last snapshot's fingerprint (`snapshot_home`; empty: none).
    pub fingerprint: String,
    /// A planned move's last snapshot: the tenant's sessions end first (`snapshot_home`).
    pub r#final: bool,
    /// The largest home snapshotted, in bytes of its files' apparent size, measured
    /// before anything is streamed (`snapshot_home`: `snapshots.max_bytes`).
    pub max_bytes: u64,
    /// Seconds the worker lets the commands run as the tenant live: the tenant can stop
    /// its own, not root's `timeout`, so what Orion gave up on at `snapshots.deadline`
    /// does not linger on the worker.
    pub deadline: u64,
}

/// What a playbook sees: the rental's values and the uid floor from the configuration.
#[derive(Serialize)]
struct Rendered<'a> {
    #[serde(flatten)]
    vars: &'a Vars,
    uid_min: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaybookError {
    #[error("cannot read playbook {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("playbook {name}: {cause}")]
    Template {
        name: String,
        cause: minijinja::Error,
    },
    #[error("playbook {playbook} on {worker}: {cause}")]
    Ssh {
        playbook: &'static str,
        worker: String,
        cause: Box<SshError>,
    },
    #[error("playbook {playbook}.yml on {worker}: {message}")]
    Ansible {
        playbook: &'static str,
        worker: String,
        message: String,
        /// Whether `ansible-playbook` ran at all (it may have changed the worker).
        ran: bool,
    },
    /// The playbook found the account is not one Orion may touch (a system account, a
    /// uid below the floor, not in `orion-tenants`) and changed nothing.
    #[error("playbook {playbook} on {worker} refused: {reason}")]
    Refused {
        playbook: &'static str,
        worker: String,
        reason: String,
    },
    #[error("playbook {playbook} on {worker} failed (exit {status}): {stderr}")]
    Failed {
        playbook: &'static str,
        worker: String,
        status: String,
        stderr: String,
    },
}

impl PlaybookError {
    /// Whether the run may have changed the worker. False when it failed before anything
    /// reached the worker (template error, no connection, no `ansible-playbook`): then
    /// there is nothing to undo.
    pub fn may_have_run(&self) -> bool {
        match self {
            PlaybookError::Read { .. }
            | PlaybookError::Template { .. }
            | PlaybookError::Refused { .. } => false,
            PlaybookError::Ssh { cause, .. } => !matches!(
                **cause,
                SshError::Connect { .. }
                    | SshError::ChannelOpen { .. }
                    | SshError::HostKeyMismatch { .. }
                    | SshError::AuthRejected { .. }
                    | SshError::Timeout {
                        stage: "connect",
                        ..
                    }
            ),
            PlaybookError::Ansible { ran, .. } => *ran,
            PlaybookError::Failed { .. } => true,
        }
    }

    /// Whether the worker refused because of the name the request asked for (an account
    /// or group of that name that is not Orion's): the request's fault, not the worker's.
    pub fn is_name_taken(&self) -> bool {
        matches!(self, PlaybookError::Refused { reason, .. } if reason.starts_with(NAME_TAKEN))
    }
}

/// What the playbooks put after `orion: refused: ` when the name asked for is taken on the
/// worker by something that is not Orion's.
const NAME_TAKEN: &str = "name taken:";

/// The playbook templates, compiled once at start.
pub struct Playbooks {
    env: Environment<'static>,
    dir: PathBuf,
}

impl std::fmt::Debug for Playbooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Playbooks").field("dir", &self.dir).finish()
    }
}

impl Playbooks {
    /// Loads and compiles every playbook Orion needs from `dir`; a missing or broken one
    /// is an error now rather than at the first rent.
    pub fn load(dir: &Path) -> Result<Self, PlaybookError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_formatter(shell_quoting_formatter);
        let names = Playbook::ALL
            .iter()
            .map(|p| p.template())
            .chain(PARTIALS.iter().map(|p| p.to_string()));
        for name in names {
            let path = dir.join(&name);
            let text = std::fs::read_to_string(&path).map_err(|cause| PlaybookError::Read {
                path: path.clone(),
                cause,
            })?;
            env.add_template_owned(name.clone(), text)
                .map_err(|cause| PlaybookError::Template { name, cause })?;
        }
        Ok(Self {
            env,
            dir: dir.to_owned(),
        })
    }

    /// Renders a playbook into the shell script that will run on the worker. `uid_min`
    /// is the floor below which the script refuses to touch an account.
    pub fn render(
        &self,
        playbook: Playbook,
        vars: &Vars,
        uid_min: u32,
    ) -> Result<String, PlaybookError> {
        self.render_with(playbook, &Rendered { vars, uid_min })
    }

    /// Renders an app playbook ([`Playbook::APPS`]).
    pub fn render_app(&self, playbook: Playbook, vars: &AppVars) -> Result<String, PlaybookError> {
        self.render_with(playbook, vars)
    }

    /// Renders `host_cert`.
    pub fn render_cert(&self, vars: &CertVars) -> Result<String, PlaybookError> {
        self.render_with(Playbook::HostCert, vars)
    }

    /// Renders a home playbook ([`Playbook::STREAMS`]) into the command that runs it
    /// (`sh -c '<script>'`: the channel's stdin and stdout carry the archive). Nothing
    /// secret is in it; `uid_min` is the floor below which it refuses.
    pub fn render_home(
        &self,
        playbook: Playbook,
        vars: &HomeVars,
        uid_min: u32,
    ) -> Result<String, PlaybookError> {
        debug_assert!(Playbook::STREAMS.contains(&playbook));
        if vars.uid < uid_min {
            return Err(PlaybookError::Refused {
                playbook: playbook.name(),
                worker: String::new(),
                reason: format!("uid {} is below Orion's floor {uid_min}", vars.uid),
            });
        }
        let script = self.render_with(playbook, vars)?;
        Ok(format!("sh -c {}", shell_quote(&script)))
    }

    /// Renders a playbook with any values (strict: a value it prints must be there).
    fn render_with(
        &self,
        playbook: Playbook,
        values: &impl Serialize,
    ) -> Result<String, PlaybookError> {
        let name = playbook.template();
        let template_error = |cause| PlaybookError::Template {
            name: name.clone(),
            cause,
        };
        self.env
            .get_template(&name)
            .and_then(|t| t.render(values))
            .map_err(template_error)
    }
}

/// Writes every printed value as one shell word in single quotes. `None` prints as `''`.
fn shell_quoting_formatter(
    out: &mut minijinja::Output<'_>,
    _state: &minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let text = if value.is_none() {
        String::new()
    } else {
        value.to_string()
    };
    out.write_str(&shell_quote(&text))
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string()))
}

/// Quotes `s` as a single POSIX shell word: `it's` becomes `'it'\''s'`.
pub fn shell_quote(s: &str) -> String {
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('\'');
    for c in s.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Runs playbooks on workers: with Orion's own SSH client (the native executor, the
/// default) or with `ansible-playbook`.
#[derive(Clone)]
pub struct Executor {
    playbooks: Arc<Playbooks>,
    ssh: SshClient,
    ansible: Option<Arc<Ansible>>,
    /// Orion's accounts have uids at or above this; nothing below is ever touched.
    uid_min: u32,
}

/// Most stderr quoted back in an error: the tail is where the reason is.
const STDERR_SUMMARY: usize = 600;

impl Executor {
    /// The native executor. Accounts get uids at or above `uid_min`.
    pub fn new(playbooks: Arc<Playbooks>, ssh: SshClient, uid_min: u32) -> Self {
        Self {
            playbooks,
            ssh,
            ansible: None,
            uid_min,
        }
    }

    /// The floor of Orion's uids.
    pub fn uid_min(&self) -> u32 {
        self.uid_min
    }

    /// Runs playbooks with `ansible-playbook` instead.
    pub fn with_ansible(mut self, ansible: Ansible) -> Self {
        self.ansible = Some(Arc::new(ansible));
        self
    }

    pub fn playbooks(&self) -> &Playbooks {
        &self.playbooks
    }

    /// Renders `playbook` and runs it as root on `target` with `sh -s`, the script on
    /// stdin. Succeeds only if the script exits 0.
    pub async fn run(
        &self,
        playbook: Playbook,
        vars: &Vars,
        target: &Target,
    ) -> Result<(), PlaybookError> {
        self.check(playbook, vars, target)?;
        let uid_min = self.uid_min;
        self.execute(playbook, &Rendered { vars, uid_min }, target)
            .await
    }

    /// Installs a host certificate on `target`, as [`Executor::run`] runs a playbook.
    pub async fn run_cert(&self, vars: &CertVars, target: &Target) -> Result<(), PlaybookError> {
        self.execute(Playbook::HostCert, vars, target).await
    }

    /// Runs an app playbook ([`Playbook::APPS`]) on `target`, as [`Executor::run`] does.
    pub async fn run_app(
        &self,
        playbook: Playbook,
        vars: &AppVars,
        target: &Target,
    ) -> Result<(), PlaybookError> {
        debug_assert!(Playbook::APPS.contains(&playbook));
        self.execute(playbook, vars, target).await
    }

    async fn execute(
        &self,
        playbook: Playbook,
        values: &impl Serialize,
        target: &Target,
    ) -> Result<(), PlaybookError> {
        if let Some(ansible) = &self.ansible {
            return ansible.run(playbook, values, target).await;
        }
        let script = self.playbooks.render_with(playbook, values)?;
        let ssh_error = |cause| PlaybookError::Ssh {
            playbook: playbook.name(),
            worker: target.name.clone(),
            cause: Box::new(cause),
        };
        let session = self.ssh.session(target).await.map_err(ssh_error)?;
        let mut result = session.exec("sh -s", Some(script.as_bytes())).await;
        session.close().await;
        if session.is_shared() && matches!(result, Err(SshError::ChannelOpen { .. })) {
            // The watch connection died unnoticed (the worker restarted a moment ago) and
            // the script never started: once more on a connection of its own.
            tracing::debug!(worker = %target.name, "watch connection unusable; reconnecting");
            let fresh = self.ssh.connect(target).await.map_err(ssh_error)?;
            result = fresh.exec("sh -s", Some(script.as_bytes())).await;
            fresh.close().await;
        }
        let out = result.map_err(ssh_error)?;
        if out.success() {
            return Ok(());
        }
        let stderr = &out.stderr;
        if let Some(reason) = refusal(stderr) {
            return Err(PlaybookError::Refused {
                playbook: playbook.name(),
                worker: target.name.clone(),
                reason,
            });
        }
        Err(PlaybookError::Failed {
            playbook: playbook.name(),
            worker: target.name.clone(),
            status: out
                .exit_status
                .map_or_else(|| "none".to_owned(), |s| s.to_string()),
            stderr: summarise(&out.stderr),
        })
    }

    /// Refuses, before anything runs, values that can only come from a bug or a tampered
    /// row: a name that is not a tenant's (`root`, a system account, anything
    /// [`crate::model::Username`] rejects) or a uid below the floor. The playbooks check
    /// the account on the worker as well.
    fn check(&self, playbook: Playbook, vars: &Vars, target: &Target) -> Result<(), PlaybookError> {
        let refused = |reason: String| PlaybookError::Refused {
            playbook: playbook.name(),
            worker: target.name.clone(),
            reason,
        };
        if let Err(e) = crate::model::Username::parse(&vars.username) {
            return Err(refused(format!(
                "`{}` is not a tenant's account: {e}",
                vars.username
            )));
        }
        match vars.uid {
            Some(uid) if uid < self.uid_min => Err(refused(format!(
                "uid {uid} is below Orion's floor {}",
                self.uid_min
            ))),
            None if playbook == Playbook::CreateUser => {
                Err(refused("an account is never made without its uid".into()))
            }
            _ => Ok(()),
        }
    }
}

/// The reason a playbook gave for refusing, from its `orion: refused: …` line.
fn refusal(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| {
            l.split_once("orion: refused: ")
                .map(|(_, r)| r.trim().to_owned())
        })
        .map(|r| r.trim_end_matches(['"', '\\', ',']).to_owned())
}

/// The Ansible executor: `ansible-playbook` against exactly one worker, checking its host
/// key against the one Orion recorded (never with host-key checking off), with the
/// rental's values as extra vars from a private file removed afterwards.
#[derive(Debug, Clone)]
pub struct Ansible {
    /// The `ansible-playbook` program (a name on `PATH`, or a path).
    pub program: PathBuf,
    /// Directory of `create_user.yml` and `delete_user.yml`.
    pub playbooks: PathBuf,
    /// Orion's private key, for `--private-key`.
    pub key: PathBuf,
    pub user: String,
    /// Bound on one run.
    pub timeout: std::time::Duration,
}

impl Ansible {
    async fn run(
        &self,
        playbook: Playbook,
        values: &impl Serialize,
        target: &Target,
    ) -> Result<(), PlaybookError> {
        let failed = |message: String, ran: bool| PlaybookError::Ansible {
            playbook: playbook.name(),
            worker: target.name.clone(),
            message,
            ran,
        };
        let fail = |message: String| failed(message, false);
        let Some(host_key) = &target.host_key else {
            return Err(fail(
                "no host key recorded for the worker yet; it must be probed first".into(),
            ));
        };
        // Private scratch directory (mode 700): inventory, known_hosts and the vars file.
        let dir = tempfile::tempdir()
            .map_err(|e| fail(format!("cannot make a scratch directory: {e}")))?;
        let host_pattern = if target.port == 22 {
            target.host.clone()
        } else {
            format!("[{}]:{}", target.host, target.port)
        };
        let known_hosts = dir.path().join("known_hosts");
        let inventory = dir.path().join("inventory.ini");
        let extra_vars = dir.path().join("vars.json");
        let write = |path: &Path, text: String| {
            std::fs::write(path, text)
                .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
        };
        write(
            &known_hosts,
            format!("{host_pattern} {}\n", crate::ssh::host_key_line(host_key)),
        )?;
        write(
            &inventory,
            format!(
                "{} ansible_host={} ansible_port={} ansible_user={} ansible_python_interpreter=/usr/bin/python3\n",
                target.name, target.host, target.port, self.user
            ),
        )?;
        write(
            &extra_vars,
            serde_json::to_string(values).expect("vars serialise"),
        )?;
        let playbook_file = self.playbooks.join(format!("{}.yml", playbook.name()));
        let ssh_args = format!(
            "-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes \
             -o ControlMaster=auto -o ControlPersist=30s",
            known_hosts.display()
        );
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg("-i")
            .arg(&inventory)
            .arg("--private-key")
            .arg(&self.key)
            .arg("-e")
            .arg(format!("@{}", extra_vars.display()))
            .arg(&playbook_file)
            .env("ANSIBLE_HOST_KEY_CHECKING", "True")
            .env("ANSIBLE_SSH_ARGS", ssh_args)
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
            .env("ANSIBLE_LOCAL_TEMP", dir.path())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(self.timeout, command.output()).await {
            Err(_) => return Err(failed(format!("timed out after {:?}", self.timeout), true)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(format!(
                    "`{}` not found: install ansible-core or set provisioning.ansible_playbook",
                    self.program.display()
                )));
            }
            Ok(Err(e)) => {
                return Err(fail(format!(
                    "cannot run `{}`: {e}",
                    self.program.display()
                )));
            }
            Ok(Ok(output)) => output,
        };
        drop(dir); // the vars file goes with it
        if output.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // Ansible's reasons are on its `fatal:` / `ERROR!` / `UNREACHABLE!` lines.
        let reasons: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("fatal:") || l.contains("ERROR!") || l.contains("UNREACHABLE!"))
            .collect();
        let reason = if reasons.is_empty() {
            text.trim().to_owned()
        } else {
            reasons.join("\n")
        };
        if let Some(reason) = refusal(&text) {
            return Err(PlaybookError::Refused {
                playbook: playbook.name(),
                worker: target.name.clone(),
                reason,
            });
        }
        Err(failed(
            format!(
                "ansible-playbook exited with {}: {}",
                output
                    .status
                    .code()
                    .map_or("a signal".to_owned(), |c| c.to_string()),
                summarise(&reason)
            ),
            ansible_may_have_changed(output.status.code(), &text),
        ))
    }
}

/// Whether a failed `ansible-playbook` run may have changed the worker. Its exit code
/// alone cannot say: 4 means both "could not parse" and "host unreachable" (possibly
/// mid-play), 1 and 2 come after tasks ran. So: bad options (5) changed nothing, and
/// neither did a run that never started a task; anything else may have.
fn ansible_may_have_changed(code: Option<i32>, output: &str) -> bool {
    code != Some(5) && output.lines().any(|l| l.starts_with("TASK ["))
}

fn summarise(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.len() <= STDERR_SUMMARY {
        return trimmed.to_owned();
    }
    let mut start = trimmed.len() - STDERR_SUMMARY;
    while !trimmed.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &trimmed[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Playbooks {
        Playbooks::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/playbooks"))).unwrap()
    }

    fn vars(username: &str) -> Vars {
        Vars {
            username: username.into(),
            uid: Some(200_123),
            public_key: Some(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPGmoeQtEFLPvpG1nEm0qOGCMmviF+bRgDjkt8J0nQ+b"
                    .into(),
            ),
            password_hash: Some("$6$salt$hash".into()),
        }
    }

    #[test]
    fn quoting_makes_one_word_of_anything() {
        assert_eq!(shell_quote("alice"), "'alice'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn every_printed_value_is_quoted_by_the_environment() {
        let mut env = Environment::new();
        env.set_formatter(shell_quoting_formatter);
        env.add_template("t", "echo {{ v }} {{ n }}").unwrap();
        let out = env
            .get_template("t")
            .unwrap()
            .render(minijinja::context! { v => "a'; rm -rf / #\nb", n => None::<String> })
            .unwrap();
        assert_eq!(out, "echo 'a'\\''; rm -rf / #\nb' ''");
    }

    #[test]
    fn every_shipped_playbook_renders() {
        let playbooks = shipped();
        for playbook in Playbook::ACCOUNTS {
            let script = playbooks.render(playbook, &vars("alice"), 200_000).unwrap();
            assert!(script.contains("'alice'"), "{script}");
            assert!(
                script.starts_with("#!/bin/sh") || script.contains("set -eu"),
                "{script}"
            );
        }
    }

    #[test]
    fn app_playbooks_hand_the_spec_to_the_runtime_as_one_quoted_word() {
        let spec = AppVars::new(&serde_json::json!({"env": {"X": "'; rm -rf / #"}})).spec;
        for playbook in Playbook::APPS {
            let script = shipped()
                .render_app(playbook, &AppVars { spec: spec.clone() })
                .unwrap();
            assert!(script.contains(&format!("spec='{spec}'")), "{script}");
            assert!(!script.contains("rm -rf"), "{script}");
            assert!(
                script.contains("| /usr/local/sbin/orion-runtime "),
                "{script}"
            );
        }
    }

    #[test]
    fn the_home_playbooks_render_into_one_command_with_their_values_quoted() {
        let playbooks = shipped();
        let mut vars = HomeVars {
            username: "erin".into(),
            uid: 200_321,
            fingerprint: "abc'; rm -rf / #".into(),
            r#final: false,
            max_bytes: 1 << 20,
            deadline: 65,
        };
        let snapshot = playbooks
            .render_home(Playbook::SnapshotHome, &vars, 200_000)
            .unwrap();
        assert!(snapshot.starts_with("sh -c '"), "{snapshot}");
        assert!(snapshot.contains("user='\\''erin'\\''"), "{snapshot}");
        assert!(snapshot.contains("final='\\''no'\\''"), "{snapshot}");
        assert!(
            snapshot.contains("max_bytes='\\''1048576'\\''"),
            "{snapshot}"
        );
        assert!(snapshot.contains("deadline='\\''65'\\''"), "{snapshot}");
        vars.r#final = true;
        let last = playbooks
            .render_home(Playbook::SnapshotHome, &vars, 200_000)
            .unwrap();
        assert!(last.contains("final='\\''yes'\\''"), "{last}");
        assert!(last.contains("kill -KILL -1"), "{last}");
        let restore = playbooks
            .render_home(Playbook::RestoreHome, &vars, 200_000)
            .unwrap();
        assert!(restore.contains("--no-same-owner"), "{restore}");
        vars.uid = 5;
        assert!(
            playbooks
                .render_home(Playbook::RestoreHome, &vars, 200_000)
                .is_err()
        );
    }

    #[test]
    fn the_host_certificate_playbook_gets_the_certificate_and_the_key_quoted() {
        let vars = CertVars {
            certificate: "ssh-ed25519-cert-v01@openssh.com AAAA w1".into(),
            host_key: "ssh-ed25519 BBBB".into(),
        };
        let script = shipped().render_cert(&vars).unwrap();
        assert!(script.contains("certificate='ssh-ed25519-cert-v01@openssh.com AAAA w1'"));
        assert!(script.contains("host_key='ssh-ed25519 BBBB'"));
    }

    #[test]
    fn specs_are_one_shell_word_whatever_they_hold() {
        use base64::Engine as _;
        let spec = serde_json::json!({"node": "n", "names": ["'; rm -rf / #\n$(id)"]});
        let word = AppVars::new(&spec).spec;
        assert!(
            word.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
        );
        let back = base64::engine::general_purpose::STANDARD
            .decode(word)
            .unwrap();
        assert!(String::from_utf8(back).unwrap().contains("rm -rf"));
    }

    #[test]
    fn create_user_with_key_only_sets_no_password() {
        let mut v = vars("bob");
        v.password_hash = None;
        let script = shipped().render(Playbook::CreateUser, &v, 200_000).unwrap();
        assert!(!script.contains("chpasswd"), "{script}");
        assert!(script.contains(r#"mv -f "$tmp" "$keys/$user""#), "{script}");
    }

    #[test]
    fn the_password_hash_is_only_fed_to_chpasswd_quoted() {
        let script = shipped()
            .render(Playbook::CreateUser, &vars("carol"), 200_000)
            .unwrap();
        assert!(script.contains("'$6$salt$hash'"), "{script}");
    }

    #[test]
    fn a_missing_variable_is_an_error_not_an_empty_string() {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_formatter(shell_quoting_formatter);
        env.add_template("t", "userdel {{ usernme }}").unwrap();
        assert!(env.get_template("t").unwrap().render(vars("x")).is_err());
    }

    #[test]
    fn a_missing_playbook_directory_names_the_file() {
        let err = Playbooks::load(Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/create_user.sh.j2"), "{err}");
    }

    #[test]
    fn the_uid_and_its_floor_reach_every_playbook_quoted() {
        let playbooks = shipped();
        for playbook in Playbook::ACCOUNTS {
            let script = playbooks.render(playbook, &vars("dave"), 200_000).unwrap();
            assert!(script.contains("uid='200123'"), "{script}");
            assert!(script.contains("uid_min='200000'"), "{script}");
        }
    }

    #[test]
    fn a_refusal_is_read_from_the_playbooks_own_line() {
        assert_eq!(
            refusal("x\norion: refused: account root has uid 0\n").as_deref(),
            Some("account root has uid 0")
        );
        assert_eq!(
            refusal(r#"fatal: [w]: FAILED! => {"stdout": "orion: refused: uid 5 is below","#)
                .as_deref(),
            Some("uid 5 is below")
        );
        assert_eq!(refusal("useradd: failure"), None);
    }

    #[test]
    fn an_ansible_run_that_started_a_task_may_have_changed_the_worker() {
        let ran = "PLAY [x] ****\n\nTASK [The account] ****\nfatal: [w]: FAILED!";
        assert!(ansible_may_have_changed(Some(2), ran));
        assert!(
            ansible_may_have_changed(Some(4), ran),
            "unreachable mid-play"
        );
        assert!(!ansible_may_have_changed(Some(4), "ERROR! could not parse"));
        assert!(!ansible_may_have_changed(Some(5), ran));
        assert!(!ansible_may_have_changed(
            Some(1),
            "ERROR! the playbook could not be found"
        ));
    }

    #[test]
    fn long_stderr_is_summarised_by_its_tail() {
        let long = format!("{}END", "x".repeat(5000));
        let s = summarise(&long);
        assert!(s.ends_with("END") && s.chars().count() <= STDERR_SUMMARY + 1);
    }
}
