//! What applying an inventory over the one Orion holds changes: workers added,
//! restored, updated and retired, each said in words for the events and the logs.

use std::fmt;

use super::{Inventory, WorkerSpec, show_labels};

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::inventory::{Edit, InventoryError, WorkerFields};

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("inventory/test.toml"))
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
}
