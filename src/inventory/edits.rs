//! Edits of the inventory through the admin API: a whole inventory in place of the one
//! held, or one worker added, changed or removed, each validated as the file is.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::checks::{check_host, check_host_key, check_label, check_labels};
use super::{DEFAULT_SITE, Inventory, Labels, WorkerSpec};
use crate::model::InvalidInput;

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::inventory::InventoryError;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("inventory/test.toml"))
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
}
