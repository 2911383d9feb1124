//! Playbooks: templated shell scripts in `playbooks/`, rendered with a rental's values and
//! run on a worker over SSH.
//!
//! Templates are data, not code. Every value a template prints is shell-quoted by the
//! environment's formatter, so `useradd {{ username }}` can only ever pass one argument,
//! whatever the value holds; template authors cannot forget. The rendered script goes to
//! `sh -s` on stdin, so nothing it contains (a password hash, a key) appears in the
//! worker's process list.
//!
//! This file holds the playbooks' names and what a run can end in; the rest by concern:
//!
//! - [`vars`]: the values each kind of playbook is rendered with;
//! - [`render`]: the templates, compiled once, and the shell quoting every value gets;
//! - [`native`]: the [`Executor`], which runs a rendered script with Orion's own SSH
//!   client (or hands the run to Ansible when configured);
//! - [`ansible`]: the Ansible executor, `ansible-playbook` against one worker.

mod ansible;
mod native;
mod render;
mod vars;

pub use ansible::Ansible;
pub use native::Executor;
pub use render::{Playbooks, shell_quote};
pub use vars::{AppVars, CertVars, HomeVars, Vars};

use std::path::PathBuf;

use crate::ssh::SshError;

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

/// Most stderr quoted back in an error: the tail is where the reason is.
const STDERR_SUMMARY: usize = 600;

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
    fn long_stderr_is_summarised_by_its_tail() {
        let long = format!("{}END", "x".repeat(5000));
        let s = summarise(&long);
        assert!(s.ends_with("END") && s.chars().count() <= STDERR_SUMMARY + 1);
    }
}
