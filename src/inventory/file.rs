//! The inventory file: read and validated as a whole (any mistake names the file, line
//! and field, and changes nothing), and written back out as a file that reads back the
//! same (`orion inventory export`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::checks::{check_host, check_host_key, check_label, check_labels};
use super::{DEFAULT_SITE, Inventory, Labels, WorkerSpec};

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

impl Inventory {
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

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn check_port(port: &Spanned<u16>) -> Result<(), String> {
    if *port.get_ref() == 0 {
        Err("port must be between 1 and 65535".to_owned())
    } else {
        Ok(())
    }
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
