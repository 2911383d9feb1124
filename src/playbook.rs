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
}

impl Playbook {
    pub const ALL: [Playbook; 2] = [Playbook::CreateUser, Playbook::DeleteUser];

    pub fn name(self) -> &'static str {
        match self {
            Playbook::CreateUser => "create_user",
            Playbook::DeleteUser => "delete_user",
        }
    }

    fn template(self) -> String {
        format!("{}.sh.j2", self.name())
    }
}

/// The values a playbook is rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct Vars {
    pub username: String,
    /// One canonical OpenSSH key line, or none.
    pub public_key: Option<String>,
    /// SHA-512 crypt hash for `/etc/shadow`, or none (key-only login).
    pub password_hash: Option<String>,
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
            PlaybookError::Read { .. } | PlaybookError::Template { .. } => false,
            PlaybookError::Ssh { cause, .. } => !matches!(
                **cause,
                SshError::Connect { .. }
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
}

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
        for playbook in Playbook::ALL {
            let name = playbook.template();
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

    /// Renders a playbook into the shell script that will run on the worker.
    pub fn render(&self, playbook: Playbook, vars: &Vars) -> Result<String, PlaybookError> {
        let name = playbook.template();
        let template_error = |cause| PlaybookError::Template {
            name: name.clone(),
            cause,
        };
        self.env
            .get_template(&name)
            .and_then(|t| t.render(vars))
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
}

/// Most stderr quoted back in an error: the tail is where the reason is.
const STDERR_SUMMARY: usize = 600;

impl Executor {
    /// The native executor.
    pub fn new(playbooks: Arc<Playbooks>, ssh: SshClient) -> Self {
        Self {
            playbooks,
            ssh,
            ansible: None,
        }
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
        if let Some(ansible) = &self.ansible {
            return ansible.run(playbook, vars, target).await;
        }
        let script = self.playbooks.render(playbook, vars)?;
        let ssh_error = |cause| PlaybookError::Ssh {
            playbook: playbook.name(),
            worker: target.name.clone(),
            cause: Box::new(cause),
        };
        let session = self.ssh.session(target).await.map_err(ssh_error)?;
        let result = session.exec("sh -s", Some(script.as_bytes())).await;
        session.close().await;
        let out = result.map_err(ssh_error)?;
        if out.success() {
            return Ok(());
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
        vars: &Vars,
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
            serde_json::to_string(vars).expect("vars serialise"),
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
        Err(fail(format!(
            "ansible-playbook exited with {}: {}",
            output
                .status
                .code()
                .map_or("a signal".to_owned(), |c| c.to_string()),
            summarise(&reason)
        )))
    }
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
        for playbook in Playbook::ALL {
            let script = playbooks.render(playbook, &vars("alice")).unwrap();
            assert!(script.contains("'alice'"), "{script}");
            assert!(
                script.starts_with("#!/bin/sh") || script.contains("set -eu"),
                "{script}"
            );
        }
    }

    #[test]
    fn create_user_with_key_only_sets_no_password() {
        let mut v = vars("bob");
        v.password_hash = None;
        let script = shipped().render(Playbook::CreateUser, &v).unwrap();
        assert!(!script.contains("chpasswd"), "{script}");
        assert!(script.contains("authorized_keys"), "{script}");
    }

    #[test]
    fn the_password_hash_is_only_fed_to_chpasswd_quoted() {
        let script = shipped()
            .render(Playbook::CreateUser, &vars("carol"))
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
    fn long_stderr_is_summarised_by_its_tail() {
        let long = format!("{}END", "x".repeat(5000));
        let s = summarise(&long);
        assert!(s.ends_with("END") && s.chars().count() <= STDERR_SUMMARY + 1);
    }
}
