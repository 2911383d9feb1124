//! The inventory: the workers Orion may rent out.
//!
//! One TOML file, `[[workers]]` tables with a name, the address Orion reaches the worker
//! at, the address a client is told, a site, labels and an optional pinned host key. It
//! is validated as a whole; any mistake is reported with the file, line and field, and
//! changes nothing. The file is applied at start (when it changed since it was last
//! applied), on `SIGHUP` and by `orion inventory apply`; the admin API edits the same
//! inventory one worker at a time ([`Inventory::with_worker`], [`Inventory::without`]).
//! Every way ends in [`diff`]: what is added, changed, restored and retired.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use russh::keys::PublicKey;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::model::InvalidInput;

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

/// What is wrong with an inventory, and where.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}:{line}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    workers: Vec<RawWorker>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    site: Option<Spanned<String>>,
    public_host: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: Spanned<String>,
    host: Spanned<String>,
    port: Spanned<u16>,
    public_host: Option<Spanned<String>>,
    public_port: Option<Spanned<u16>>,
    site: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    host_key: Option<Spanned<String>>,
    app_host: Option<Spanned<String>>,
    instances_join: Option<Spanned<String>>,
}

/// The site of workers whose inventory names none.
pub const DEFAULT_SITE: &str = "default";

impl Inventory {
    /// Reads and validates the inventory at `path`.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|cause| InventoryError::Read {
            path: path.to_owned(),
            cause,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates inventory text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, InventoryError> {
        let at =
            |span: std::ops::Range<usize>, field: &str, message: String| InventoryError::Invalid {
                path: path.to_owned(),
                line: line_of(text, span.start),
                field: field.to_owned(),
                message,
            };
        let raw: RawInventory = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at(span, "syntax", e.message().to_owned())
        })?;

        let default_site = raw.defaults.site.as_ref().map(|s| s.get_ref().clone());
        if let Some(site) = &raw.defaults.site {
            check_label(site.get_ref(), "defaults.site")
                .map_err(|m| at(site.span(), "defaults.site", m))?;
        }
        let default_labels = match &raw.defaults.labels {
            Some(l) => {
                check_labels(l.get_ref()).map_err(|m| at(l.span(), "defaults.labels", m))?;
                l.get_ref().clone()
            }
            None => Labels::new(),
        };
        let default_public_host = raw.defaults.public_host.as_ref();
        if let Some(host) = default_public_host {
            check_host(host.get_ref()).map_err(|m| at(host.span(), "defaults.public_host", m))?;
        }

        let mut names: HashMap<String, usize> = HashMap::new();
        let mut addresses: HashMap<(String, u16), String> = HashMap::new();
        let mut workers = Vec::with_capacity(raw.workers.len());
        for (i, w) in raw.workers.iter().enumerate() {
            let field = |f: &str| format!("workers[{i}].{f}");
            check_label(w.name.get_ref(), "name")
                .map_err(|m| at(w.name.span(), &field("name"), m))?;
            let name = w.name.get_ref().clone();
            if let Some(first) = names.insert(name.clone(), line_of(text, w.name.span().start)) {
                return Err(at(
                    w.name.span(),
                    &field("name"),
                    format!("worker `{name}` is already defined on line {first}"),
                ));
            }
            check_host(w.host.get_ref()).map_err(|m| at(w.host.span(), &field("host"), m))?;
            check_port(&w.port).map_err(|m| at(w.port.span(), &field("port"), m))?;
            let address = (w.host.get_ref().clone(), *w.port.get_ref());
            if let Some(other) = addresses.insert(address.clone(), name.clone()) {
                return Err(at(
                    w.port.span(),
                    &field("port"),
                    format!(
                        "{}:{} is already the address of worker `{other}`",
                        address.0, address.1
                    ),
                ));
            }
            let public_host = match (&w.public_host, default_public_host) {
                (Some(h), _) => {
                    check_host(h.get_ref()).map_err(|m| at(h.span(), &field("public_host"), m))?;
                    h.get_ref().clone()
                }
                (None, Some(h)) => h.get_ref().clone(),
                (None, None) => w.host.get_ref().clone(),
            };
            let public_port = match &w.public_port {
                Some(p) => {
                    check_port(p).map_err(|m| at(p.span(), &field("public_port"), m))?;
                    *p.get_ref()
                }
                None => *w.port.get_ref(),
            };
            let site = match &w.site {
                Some(s) => {
                    check_label(s.get_ref(), "site")
                        .map_err(|m| at(s.span(), &field("site"), m))?;
                    s.get_ref().clone()
                }
                None => default_site
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SITE.to_owned()),
            };
            let host_key = match &w.host_key {
                Some(k) => Some(
                    check_host_key(k.get_ref()).map_err(|m| at(k.span(), &field("host_key"), m))?,
                ),
                None => None,
            };
            let mut labels = default_labels.clone();
            if let Some(l) = &w.labels {
                check_labels(l.get_ref()).map_err(|m| at(l.span(), &field("labels"), m))?;
                labels.extend(l.get_ref().clone());
            }
            if let Some(h) = &w.app_host {
                check_host(h.get_ref()).map_err(|m| at(h.span(), &field("app_host"), m))?;
            }
            if let Some(j) = &w.instances_join {
                check_label(j.get_ref(), "instances_join")
                    .map_err(|m| at(j.span(), &field("instances_join"), m))?;
            }
            workers.push(WorkerSpec {
                name,
                site,
                labels,
                ssh_host: w.host.get_ref().clone(),
                ssh_port: *w.port.get_ref(),
                public_host,
                public_port,
                host_key,
                app_host: w.app_host.as_ref().map(|h| h.get_ref().clone()),
                instances_join: w.instances_join.as_ref().map(|j| j.get_ref().clone()),
            });
        }
        Ok(Inventory { workers })
    }
}

/// The fields of one worker as the admin API takes them (`POST` and `PATCH
/// /api/workers/{name}`), with the inventory file's names and meanings. For a new worker
/// `host` and `port` are required; a change sets the fields given and keeps the others.
/// In a change, an empty `public_host`, `host_key`, `app_host` or `instances_join`
/// removes it (the default applies again).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Replaces the worker's labels as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances_join: Option<String>,
}

/// Whether [`Inventory::with_worker`] makes a worker or changes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Add,
    Change,
}

/// Why an edit of the inventory through the API is refused.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("worker `{0}` is already in the inventory")]
    Exists(String),
    #[error("no worker `{0}` in the inventory")]
    Missing(String),
}

impl Inventory {
    /// `wanted` in place of this whole inventory (a file applied), unless it names no
    /// worker while this one has some: that is far more likely a file caught while being
    /// written, or the wrong file, than an operator retiring the whole fleet at once
    /// (`DELETE /api/workers/{name}` retires workers one by one).
    pub fn replaced_by(&self, wanted: Inventory) -> Result<Inventory, EditError> {
        if wanted.workers.is_empty() && !self.workers.is_empty() {
            return Err(InvalidInput::new(
                "inventory",
                "names no worker: applying it would retire every worker; refused",
            )
            .into());
        }
        Ok(wanted)
    }

    /// This inventory with worker `name` added or changed by `fields`, validated as
    /// the file is.
    pub fn with_worker(
        &self,
        name: &str,
        fields: &WorkerFields,
        edit: Edit,
    ) -> Result<Inventory, EditError> {
        let mut workers = self.workers.clone();
        let at = workers.iter().position(|w| w.name == name);
        let spec = match (edit, at) {
            (Edit::Add, Some(_)) => return Err(EditError::Exists(name.to_owned())),
            (Edit::Change, None) => return Err(EditError::Missing(name.to_owned())),
            (Edit::Add, None) => {
                check_label(name, "name").map_err(|m| InvalidInput::new("name", m))?;
                let host = fields
                    .host
                    .clone()
                    .ok_or_else(|| InvalidInput::new("host", "required for a new worker"))?;
                let port = fields
                    .port
                    .ok_or_else(|| InvalidInput::new("port", "required for a new worker"))?;
                WorkerSpec {
                    name: name.to_owned(),
                    site: DEFAULT_SITE.to_owned(),
                    labels: Labels::new(),
                    public_host: host.clone(),
                    public_port: port,
                    ssh_host: host,
                    ssh_port: port,
                    host_key: None,
                    app_host: None,
                    instances_join: None,
                }
            }
            (Edit::Change, Some(i)) => workers[i].clone(),
        };
        let spec = spec.changed(fields)?;
        match at {
            Some(i) => workers[i] = spec,
            None => workers.push(spec),
        }
        let inventory = Inventory { workers };
        inventory.check_addresses()?;
        Ok(inventory)
    }

    /// This inventory without worker `name`.
    pub fn without(&self, name: &str) -> Result<Inventory, EditError> {
        if !self.workers.iter().any(|w| w.name == name) {
            return Err(EditError::Missing(name.to_owned()));
        }
        Ok(Inventory {
            workers: self
                .workers
                .iter()
                .filter(|w| w.name != name)
                .cloned()
                .collect(),
        })
    }

    /// No two workers at one SSH address (names are unique by construction).
    fn check_addresses(&self) -> Result<(), InvalidInput> {
        let mut addresses: HashMap<(&str, u16), &str> = HashMap::new();
        for w in &self.workers {
            if let Some(other) = addresses.insert((&w.ssh_host, w.ssh_port), &w.name) {
                return Err(InvalidInput::new(
                    "port",
                    format!(
                        "{}:{} is already the address of worker `{other}`",
                        w.ssh_host, w.ssh_port
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The inventory as a file [`Inventory::parse`] reads back the same: every field
    /// written out, no defaults.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct File<'a> {
            workers: Vec<FileWorker<'a>>,
        }
        #[derive(Serialize)]
        struct FileWorker<'a> {
            name: &'a str,
            host: &'a str,
            port: u16,
            public_host: &'a str,
            public_port: u16,
            site: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            host_key: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            app_host: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            instances_join: Option<&'a str>,
            // Last: a table, written after the plain values.
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            labels: &'a Labels,
        }
        let file = File {
            workers: self
                .workers
                .iter()
                .map(|w| FileWorker {
                    name: &w.name,
                    host: &w.ssh_host,
                    port: w.ssh_port,
                    public_host: &w.public_host,
                    public_port: w.public_port,
                    site: &w.site,
                    host_key: w.host_key.as_deref(),
                    app_host: w.app_host.as_deref(),
                    instances_join: w.instances_join.as_deref(),
                    labels: &w.labels,
                })
                .collect(),
        };
        let body = toml::to_string(&file).expect("an inventory is plain TOML");
        format!(
            "# Orion's inventory, exported from its database (`orion inventory export`).\n\
             # Apply it with `orion inventory apply FILE` or load it at start.\n\n{body}"
        )
    }
}

impl WorkerSpec {
    /// This worker with `fields` set, each checked as the file's.
    fn changed(mut self, fields: &WorkerFields) -> Result<WorkerSpec, InvalidInput> {
        let host_only =
            |v: &str, field: &'static str| check_host(v).map_err(|m| InvalidInput::new(field, m));
        let port_only = |p: u16, field: &'static str| {
            if p == 0 {
                Err(InvalidInput::new(field, "must be between 1 and 65535"))
            } else {
                Ok(p)
            }
        };
        // The public address follows the SSH address unless it was set apart.
        let public_follows = self.public_host == self.ssh_host && self.public_port == self.ssh_port;
        if let Some(h) = &fields.host {
            host_only(h, "host")?;
            if public_follows {
                self.public_host = h.clone();
            }
            self.ssh_host = h.clone();
        }
        if let Some(p) = fields.port {
            self.ssh_port = port_only(p, "port")?;
            if public_follows {
                self.public_port = p;
            }
        }
        match fields.public_host.as_deref() {
            Some("") => self.public_host = self.ssh_host.clone(),
            Some(h) => {
                host_only(h, "public_host")?;
                self.public_host = h.to_owned();
            }
            None => {}
        }
        if let Some(p) = fields.public_port {
            self.public_port = port_only(p, "public_port")?;
        }
        if let Some(site) = &fields.site {
            check_label(site, "site").map_err(|m| InvalidInput::new("site", m))?;
            self.site = site.clone();
        }
        if let Some(labels) = &fields.labels {
            check_labels(labels).map_err(|m| InvalidInput::new("labels", m))?;
            self.labels = labels.clone();
        }
        match fields.host_key.as_deref() {
            Some("") => self.host_key = None,
            Some(k) => {
                self.host_key =
                    Some(check_host_key(k).map_err(|m| InvalidInput::new("host_key", m))?)
            }
            None => {}
        }
        match fields.app_host.as_deref() {
            Some("") => self.app_host = None,
            Some(h) => {
                host_only(h, "app_host")?;
                self.app_host = Some(h.to_owned());
            }
            None => {}
        }
        match fields.instances_join.as_deref() {
            Some("") => self.instances_join = None,
            Some(j) => {
                check_label(j, "instances_join")
                    .map_err(|m| InvalidInput::new("instances_join", m))?;
                self.instances_join = Some(j.to_owned());
            }
            None => {}
        }
        Ok(self)
    }
}

/// A worker as the database holds it, for [`diff`].
#[derive(Debug, Clone)]
pub struct Known {
    pub spec: WorkerSpec,
    pub retired: bool,
    /// Held by a rental (serving it, or until its leftover account is removed).
    pub occupied: bool,
}

/// One difference between the inventory Orion holds and one it is given.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A worker Orion has never had.
    Add(WorkerSpec),
    /// A retired worker back in the inventory.
    Restore(WorkerSpec),
    Update {
        from: WorkerSpec,
        to: WorkerSpec,
    },
    /// Gone from the inventory: no new rental; a rental on it moves away first, the
    /// worker stays until then (and in the history after).
    Retire {
        name: String,
        occupied: bool,
    },
}

impl Change {
    pub fn worker(&self) -> &str {
        match self {
            Change::Add(s) | Change::Restore(s) => &s.name,
            Change::Update { to, .. } => &to.name,
            Change::Retire { name, .. } => name,
        }
    }
}

/// What applying `wanted` over `known` changes, in the order of `wanted` then retirements.
pub fn diff(known: &[Known], wanted: &Inventory) -> Vec<Change> {
    let mut changes = Vec::new();
    for spec in &wanted.workers {
        match known.iter().find(|k| k.spec.name == spec.name) {
            None => changes.push(Change::Add(spec.clone())),
            Some(k) if k.retired => changes.push(Change::Restore(spec.clone())),
            Some(k) if k.spec != *spec => changes.push(Change::Update {
                from: k.spec.clone(),
                to: spec.clone(),
            }),
            Some(_) => {}
        }
    }
    for k in known.iter().filter(|k| !k.retired) {
        if !wanted.workers.iter().any(|s| s.name == k.spec.name) {
            changes.push(Change::Retire {
                name: k.spec.name.clone(),
                occupied: k.occupied,
            });
        }
    }
    changes
}

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

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Add(s) => write!(f, "+ {}: added, {s}", s.name),
            Change::Restore(s) => write!(f, "+ {}: back in the inventory, {s}", s.name),
            Change::Update { from, to } => {
                write!(f, "~ {}:", to.name)?;
                let mut parts = Vec::new();
                let mut field = |name: &str, a: String, b: String| {
                    if a != b {
                        parts.push(format!(" {name} {a} -> {b}"));
                    }
                };
                let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
                field("site", from.site.clone(), to.site.clone());
                field("labels", show_labels(&from.labels), show_labels(&to.labels));
                field(
                    "address",
                    format!("{}:{}", from.ssh_host, from.ssh_port),
                    format!("{}:{}", to.ssh_host, to.ssh_port),
                );
                field(
                    "public address",
                    format!("{}:{}", from.public_host, from.public_port),
                    format!("{}:{}", to.public_host, to.public_port),
                );
                field("host_key", opt(&from.host_key), opt(&to.host_key));
                field("app_host", opt(&from.app_host), opt(&to.app_host));
                field(
                    "instances_join",
                    opt(&from.instances_join),
                    opt(&to.instances_join),
                );
                write!(f, "{}", parts.join(","))
            }
            Change::Retire { name, occupied } => {
                write!(f, "- {name}: retired")?;
                if *occupied {
                    write!(f, " (its rental moves to another worker first)")?;
                }
                Ok(())
            }
        }
    }
}

/// Labels: keys as names, values short and printable.
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > 32 {
        return Err("at most 32 labels".into());
    }
    for (key, value) in labels {
        check_label(key, "label")?;
        let ok = !value.is_empty()
            && value.len() <= 128
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'));
        if !ok {
            return Err(format!(
                "label `{key}`: value `{value}` must be 1 to 128 characters of letters, digits, `_`, `-`, `.`, `:` or `/`"
            ));
        }
    }
    Ok(())
}

/// A site or label name asked for by a client: the rules of the inventory's.
pub fn check_site(site: &str) -> Result<(), String> {
    check_label(site, "site")
}

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Names and sites: short, printable, safe in logs, URLs and container names.
fn check_label(v: &str, what: &str) -> Result<(), String> {
    let ok_chars = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if v.is_empty()
        || v.len() > 64
        || !ok_chars
        || !v.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "{what} `{v}` must be 1 to 64 characters of letters, digits, `_`, `-` or `.`, starting with a letter or digit"
        ));
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a host name or IP address"))
    }
}

fn check_port(port: &Spanned<u16>) -> Result<(), String> {
    if *port.get_ref() == 0 {
        Err("port must be between 1 and 65535".to_owned())
    } else {
        Ok(())
    }
}

/// Parses an OpenSSH public key line (`ssh-ed25519 AAAA… [comment]`) and returns it in
/// canonical form, without the comment.
fn check_host_key(line: &str) -> Result<String, String> {
    let key = PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("not an OpenSSH public key ({e})"))?;
    Ok(crate::ssh::host_key_line(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPGmoeQtEFLPvpG1nEm0qOGCMmviF+bRgDjkt8J0nQ+b";

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("inventory/test.toml"))
    }

    #[test]
    fn defaults_fill_public_address_and_site() {
        let inv = parse(
            r#"
            [defaults]
            site = "paris"
            [[workers]]
            name = "worker_1"
            host = "host.docker.internal"
            port = 22221
            "#,
        )
        .unwrap();
        let w = &inv.workers[0];
        assert_eq!(w.site, "paris");
        assert_eq!(w.public_host, "host.docker.internal");
        assert_eq!(w.public_port, 22221);
        assert_eq!(w.host_key, None);
    }

    #[test]
    fn a_pinned_host_key_is_kept_in_canonical_form() {
        let inv = parse(&format!(
            "[[workers]]\nname = \"w\"\nhost = \"h\"\nport = 22\nhost_key = \"{KEY} comment@host\"\n"
        ))
        .unwrap();
        assert_eq!(inv.workers[0].host_key.as_deref(), Some(KEY));
    }

    #[test]
    fn a_duplicate_name_names_the_file_line_and_field() {
        let err = parse(
            "[[workers]]\nname = \"w\"\nhost = \"a\"\nport = 22\n\n[[workers]]\nname = \"w\"\nhost = \"b\"\nport = 22\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("inventory/test.toml:7: workers[1].name:"),
            "{err}"
        );
        assert!(err.contains("already defined on line 2"), "{err}");
    }

    #[test]
    fn port_zero_is_refused_with_its_line() {
        let err = parse("[[workers]]\nname = \"w\"\nhost = \"a\"\nport = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("inventory/test.toml:4: workers[0].port:"),
            "{err}"
        );
    }

    #[test]
    fn a_port_out_of_range_is_a_located_error() {
        let err = parse("[[workers]]\nname = \"w\"\nhost = \"a\"\nport = 70000\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("inventory/test.toml:4:"), "{err}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = parse("[[workers]]\nname = \"w\"\nport = 22\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("host"), "{err}");
        assert!(err.starts_with("inventory/test.toml:"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_named() {
        let err = parse("[[workers]]\nname = \"w\"\nhost = \"a\"\nport = 22\nprot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn a_bad_host_key_is_refused() {
        let err = parse(
            "[[workers]]\nname = \"w\"\nhost = \"a\"\nport = 22\nhost_key = \"ssh-ed25519 nope\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("workers[0].host_key"), "{err}");
        assert!(err.contains(":5:"), "{err}");
    }

    #[test]
    fn two_workers_on_one_address_are_refused() {
        let err = parse(
            "[[workers]]\nname = \"a\"\nhost = \"h\"\nport = 22\n[[workers]]\nname = \"b\"\nhost = \"h\"\nport = 22\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("already the address of worker `a`"), "{err}");
    }

    #[test]
    fn a_name_with_a_space_is_refused() {
        let err = parse("[[workers]]\nname = \"w 1\"\nhost = \"h\"\nport = 22\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("workers[0].name"), "{err}");
    }

    #[test]
    fn labels_merge_over_the_defaults_and_are_checked() {
        let inv = parse(
            "[defaults]\nlabels = { disk = \"hdd\", zone = \"z1\" }\n\
             [[workers]]\nname = \"w\"\nhost = \"h\"\nport = 22\nlabels = { disk = \"ssd\" }\n",
        )
        .unwrap();
        let labels: Vec<_> = inv.workers[0].labels.iter().collect();
        assert_eq!(
            labels,
            [
                (&"disk".to_owned(), &"ssd".to_owned()),
                (&"zone".to_owned(), &"z1".to_owned())
            ]
        );
        let err = parse(
            "[[workers]]\nname = \"w\"\nhost = \"h\"\nport = 22\nlabels = { disk = \"a b\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("workers[0].labels"), "{err}");
    }

    #[test]
    fn an_export_reads_back_the_same() {
        let inv = parse(&format!(
            "[defaults]\nsite = \"a\"\npublic_host = \"localhost\"\n\
             [[workers]]\nname = \"w1\"\nhost = \"h1\"\nport = 22\nlabels = {{ gpu = \"a100\" }}\n\
             host_key = \"{KEY}\"\n\
             [[workers]]\nname = \"w2\"\nhost = \"h2\"\nport = 2222\nsite = \"b\"\n\
             instances_join = \"c2\"\napp_host = \"c2\"\n"
        ))
        .unwrap();
        assert_eq!(parse(&inv.to_toml()).unwrap(), inv);
    }

    fn known(inv: &Inventory) -> Vec<Known> {
        inv.workers
            .iter()
            .map(|spec| Known {
                spec: spec.clone(),
                retired: false,
                occupied: spec.name == "w1",
            })
            .collect()
    }

    #[test]
    fn the_diff_adds_changes_and_retires_and_says_which_tenant_moves() {
        let held = parse(
            "[[workers]]\nname = \"w1\"\nhost = \"h1\"\nport = 22\n\
                          [[workers]]\nname = \"w2\"\nhost = \"h2\"\nport = 22\n",
        )
        .unwrap();
        let wanted = held
            .without("w1")
            .unwrap()
            .with_worker(
                "w2",
                &WorkerFields {
                    site: Some("b".into()),
                    ..WorkerFields::default()
                },
                Edit::Change,
            )
            .unwrap()
            .with_worker(
                "w3",
                &WorkerFields {
                    host: Some("h3".into()),
                    port: Some(22),
                    ..WorkerFields::default()
                },
                Edit::Add,
            )
            .unwrap();
        let lines: Vec<String> = diff(&known(&held), &wanted)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "~ w2: site default -> b",
                "+ w3: added, h3:22 site default",
                "- w1: retired (its rental moves to another worker first)",
            ]
        );
        assert!(
            diff(&known(&held), &held).is_empty(),
            "the same inventory changes nothing"
        );
    }

    #[test]
    fn api_edits_are_checked_as_the_file_is() {
        let held = parse("[[workers]]\nname = \"w1\"\nhost = \"h1\"\nport = 22\n").unwrap();
        let add = |name: &str, fields: WorkerFields| held.with_worker(name, &fields, Edit::Add);
        let same_address = add(
            "w2",
            WorkerFields {
                host: Some("h1".into()),
                port: Some(22),
                ..WorkerFields::default()
            },
        );
        assert!(
            matches!(&same_address, Err(EditError::Invalid(i)) if i.field == "port"),
            "{same_address:?}"
        );
        assert!(matches!(
            add("w1", WorkerFields::default()),
            Err(EditError::Exists(_))
        ));
        let no_host = add("w2", WorkerFields::default());
        assert!(matches!(&no_host, Err(EditError::Invalid(i)) if i.field == "host"));
        let bad_name = add("w 2", WorkerFields::default());
        assert!(matches!(&bad_name, Err(EditError::Invalid(i)) if i.field == "name"));
        assert!(matches!(held.without("nope"), Err(EditError::Missing(_))));
        // The public address follows the SSH address unless it was set apart.
        let moved = held
            .with_worker(
                "w1",
                &WorkerFields {
                    port: Some(2200),
                    ..WorkerFields::default()
                },
                Edit::Change,
            )
            .unwrap();
        assert_eq!(moved.workers[0].public_port, 2200);
    }

    #[test]
    fn the_shipped_inventories_are_valid() {
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/inventory")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let inv = Inventory::load(&path).unwrap();
                assert!(!inv.workers.is_empty(), "{} has no workers", path.display());
            }
        }
    }
}
