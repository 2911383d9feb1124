//! The Ansible executor: each playbook's `<name>.yml` twin run with `ansible-playbook`
//! against exactly one worker, behaving as the native executor does (same values, same
//! refusals, same errors).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Playbook, PlaybookError, refusal, summarise};
use crate::ssh::Target;

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
    pub(super) async fn run(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
