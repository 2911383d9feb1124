//! The inventory: the workers Orion may rent out.
//!
//! One TOML file, `[[workers]]` tables with a name, the address Orion reaches the worker
//! at, the address a client is told, a site, labels and an optional pinned host key. It
//! is validated as a whole; any mistake is reported with the file, line and field, and
//! changes nothing. The file is applied at start (when it changed since it was last
//! applied), on `SIGHUP` and by `orion inventory apply`; the admin API edits the same
//! inventory one worker at a time ([`Inventory::with_worker`], [`Inventory::without`]).
//! Every way ends in [`diff()`]: what is added, changed, restored and retired.
//!
//! This file holds what an inventory is; the rest by concern:
//!
//! - [`file`]: the file read and validated (errors with file, line and field), and
//!   written back out (`orion inventory export`);
//! - [`checks`]: the rules of names, sites, labels, hosts and host keys, shared by the
//!   file and the API's edits;
//! - [`edits`]: one worker added, changed or removed through the admin API, validated as
//!   the file is;
//! - [`diff`]: what applying an inventory over the one Orion holds changes;
//! - [`apply`]: the live inventory: the file or an edit applied while Orion runs, and the
//!   loops woken on what changed.

mod apply;
mod checks;
mod diff;
mod edits;
mod file;

use std::collections::BTreeMap;
use std::fmt;

pub use apply::{apply_file, edit, reload};
pub use checks::{check_labels, check_site};
pub use diff::{Change, Known, diff};
pub use edits::{Edit, EditError, WorkerFields};
pub use file::InventoryError;

/// A worker's free-form `key = value` labels ("disk = ssd", "gpu = a100"): a rent may
/// ask for some of them.
pub type Labels = BTreeMap<String, String>;

/// One worker as the rest of Orion sees it: validated, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSpec {
    /// Stable identity of the worker, used in the API, the database and the logs.
    pub name: String,
    /// Site (room, zone, data centre) the worker lives in.
    pub site: String,
    /// Free-form labels a rent may ask for.
    pub labels: Labels,
    /// Host Orion connects to over SSH (probes and provisioning).
    pub ssh_host: String,
    pub ssh_port: u16,
    /// Host and port handed to clients; differs from the SSH address when Orion reaches
    /// workers through another network than clients do (e.g. `host.docker.internal`).
    pub public_host: String,
    pub public_port: u16,
    /// Host key pinned by the operator, in OpenSSH one-line form. `None`: trusted on
    /// first use and recorded in the database.
    pub host_key: Option<String>,
    /// Where apps' instances on this worker are reached (their port on this host).
    /// `None`: the public host.
    pub app_host: Option<String>,
    /// The container on the worker's engine whose PID and network namespaces instances
    /// join: the lab, where a worker is a container sharing the host's engine, so that a
    /// stopped worker takes its instances with it. `None`: instances publish their port
    /// on the worker itself.
    pub instances_join: Option<String>,
}

/// A validated inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    pub workers: Vec<WorkerSpec>,
}

/// The site of workers whose inventory names none.
pub const DEFAULT_SITE: &str = "default";

impl fmt::Display for WorkerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} site {}", self.ssh_host, self.ssh_port, self.site)?;
        if !self.labels.is_empty() {
            write!(f, " labels {}", show_labels(&self.labels))?;
        }
        Ok(())
    }
}

/// Labels as `k=v,k=v`.
pub fn show_labels(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
