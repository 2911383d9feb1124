//! What Orion says to `orion-runtime`, the wrapper each worker carries
//! (`docker/worker/orion-runtime`), and what it answers. The wrapper alone talks to the
//! worker's container engine (Docker's API, which Podman serves too), and only ever
//! lists, starts, reads or removes containers labelled with the worker's node: Orion sees
//! and touches that worker's own containers and nothing else on the engine.
//!
//! Specs travel as JSON on the wrapper's stdin, base64-encoded inside the playbooks
//! ([`crate::playbook::AppVars`]):
//! environment values and commands never pass through a shell or a command line.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where the wrapper is on a worker.
pub const PROGRAM: &str = "/usr/local/sbin/orion-runtime";

/// Labels Orion puts on every instance's container.
pub const LABEL_NODE: &str = "orion.node";
pub const LABEL_APP: &str = "orion.app";
pub const LABEL_TENANT: &str = "orion.tenant";
pub const LABEL_INSTANCE: &str = "orion.instance";

/// One container the wrapper listed (`orion-runtime ps NODE`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Observed {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub state: String,
    pub exit_code: Option<i64>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Observed {
    pub fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "running" | "restarting" | "paused")
    }

    /// The Orion instance the container says it belongs to.
    pub fn instance(&self) -> Option<u64> {
        self.labels.get(LABEL_INSTANCE)?.parse().ok()
    }
}

/// The command that lists a node's containers.
pub fn ps_command(node: &str) -> String {
    format!("{PROGRAM} ps {}", crate::playbook::shell_quote(node))
}

/// The command that follows a node's container events, one JSON line each.
pub fn events_command(node: &str) -> String {
    format!("{PROGRAM} events {}", crate::playbook::shell_quote(node))
}

/// The command that prints the tail of an instance's log.
pub fn logs_command(node: &str, container: &str, tail: u32) -> String {
    format!(
        "{PROGRAM} logs {} {} {tail}",
        crate::playbook::shell_quote(node),
        crate::playbook::shell_quote(container)
    )
}

/// What `orion-runtime ps` listed: the containers read, and those that could not be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listed {
    pub containers: Vec<Observed>,
    pub unreadable: Vec<Unreadable>,
}

/// A container `orion-runtime ps` listed but that could not be read (the wrapper says
/// why, or its entry is not one Orion understands).
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// Its name, when the entry still says it: the instance it holds is left as it is
    /// (neither started again nor said gone) until it can be read.
    pub name: Option<String>,
    pub reason: String,
}

/// Parses `orion-runtime ps`: one JSON array, read entry by entry, so that one container
/// the wrapper could not read (or reported in a way Orion cannot read) never hides the
/// others. A document that is not a JSON array fails whole: it may have been cut short,
/// and what it left out is unknown.
pub fn parse_ps(stdout: &str) -> Result<Listed, serde_json::Error> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(stdout.trim())?;
    let mut listed = Listed::default();
    for entry in entries {
        let name = entry
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        let reason = match entry.get("error") {
            Some(error) => error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned),
            None => match serde_json::from_value::<Observed>(entry) {
                Ok(observed) => {
                    listed.containers.push(observed);
                    continue;
                }
                Err(e) => format!("unreadable entry: {e}"),
            },
        };
        listed.unreadable.push(Unreadable { name, reason });
    }
    Ok(listed)
}

/// One event line of `orion-runtime events`.
#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeEvent {
    pub action: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub exit_code: Option<serde_json::Value>,
}

/// What `orion-runtime run` makes: one instance's container.
#[derive(Debug, Clone, Serialize)]
pub struct RunSpec {
    pub node: String,
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub port: Option<u16>,
    /// The container whose PID and network namespaces the instance joins (the lab).
    pub join: Option<String>,
    pub user: String,
    pub memory: u64,
    pub pids: u32,
    /// CPU share, in thousandths of a CPU.
    pub cpus_milli: Option<u32>,
    /// Largest log file (two are kept).
    pub log_max_bytes: Option<u64>,
}

/// What `orion-runtime rm` removes.
#[derive(Debug, Clone, Serialize)]
pub struct RemoveSpec {
    pub node: String,
    pub names: Vec<String>,
}

/// Runs one `orion-runtime` command on a worker (on its watch connection when one is
/// open) and returns its stdout; a failure says the command and its stderr.
pub async fn run(
    ssh: &crate::ssh::SshClient,
    target: &crate::ssh::Target,
    command: &str,
) -> anyhow::Result<String> {
    let session = ssh.session(target).await?;
    let out = session.exec(command, None).await;
    session.close().await;
    let out = out?;
    anyhow::ensure!(
        out.success(),
        "`{command}` exited with {:?}: {}",
        out.exit_status,
        out.stderr.trim()
    );
    Ok(out.stdout)
}

/// Most bytes of log one read returns (`orion-runtime logs` keeps the last 64 KiB).
pub const LOGS_CAP: usize = 64 * 1024;

/// The last `lines` lines of an instance's log, read on its worker.
pub async fn instance_logs(
    ssh: &crate::ssh::SshClient,
    worker: &crate::store::Worker,
    node: &str,
    container: &str,
    lines: u32,
) -> anyhow::Result<String> {
    run(ssh, &worker.target(), &logs_command(node, container, lines)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_output_parses_with_nulls_and_labels() {
        let out = r#"[{"name":"n.web.3","id":"abc","image":"orion/demo-app","labels":{"orion.instance":"3","orion.node":"n"},"state":"exited","exit_code":137,"started_at":"2026-11-23T10:00:00.123456789Z","finished_at":"2026-11-23T10:01:00Z"},{"name":"n.x.4","id":"d","image":"i","labels":{},"state":"created","exit_code":null,"started_at":null,"finished_at":null}]"#;
        let list = parse_ps(out).unwrap().containers;
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].instance(), Some(3));
        assert_eq!(list[0].exit_code, Some(137));
        assert!(!list[0].is_running());
        assert_eq!(list[1].instance(), None);
        assert!(list[1].started_at.is_none());
    }

    #[test]
    fn one_container_that_cannot_be_read_never_hides_the_others() {
        let out = r#"[
            {"name":"n.a.1","labels":{"orion.instance":"1"},"state":"running","exit_code":null,"started_at":null,"finished_at":null},
            {"name":"n.b.2","error":"orion-runtime: inspect failed"},
            {"name":"n.c.3","labels":{"orion.instance":"3"},"state":7,"exit_code":null},
            {"labels":"not a map"},
            42,
            {"name":"n.d.4","labels":{},"state":"exited","exit_code":1,"started_at":null,"finished_at":null}
        ]"#;
        let listed = parse_ps(out).unwrap();
        let names: Vec<&str> = listed.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["n.a.1", "n.d.4"]);
        let unreadable: Vec<Option<&str>> = listed
            .unreadable
            .iter()
            .map(|u| u.name.as_deref())
            .collect();
        assert_eq!(unreadable, [Some("n.b.2"), Some("n.c.3"), None, None]);
        assert_eq!(listed.unreadable[0].reason, "orion-runtime: inspect failed");
    }

    #[test]
    fn a_listing_cut_short_is_refused_whole() {
        let out = r#"[{"name":"n.a.1","labels":{},"state":"running"},{"name":"n.b"#;
        assert!(parse_ps(out).is_err());
        assert!(parse_ps(r#"{"name":"n.a.1"}"#).is_err());
    }

    #[test]
    fn commands_quote_the_node() {
        assert_eq!(
            ps_command("w 1;x"),
            "/usr/local/sbin/orion-runtime ps 'w 1;x'"
        );
    }
}
