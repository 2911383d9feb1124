//! The native executor: runs a rendered playbook as root on a worker with Orion's own SSH
//! client, the script on `sh -s`'s stdin, and reads how it ended. When Orion is
//! configured for Ansible, the same [`Executor`] hands each run to [`Ansible`] instead, so
//! callers never choose.

use std::sync::Arc;

use serde::Serialize;

use super::vars::Rendered;
use super::{
    Ansible, AppVars, CertVars, Playbook, PlaybookError, Playbooks, Vars, refusal, summarise,
};
use crate::ssh::{SshClient, SshError, Target};

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
