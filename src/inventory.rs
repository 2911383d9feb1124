//! The static inventory: the workers Orion may rent out, known in advance.
//!
//! One TOML file, `[[workers]]` tables with a name, the address Orion reaches the worker
//! at, the address a client is told, a site and an optional pinned host key. It is read
//! and validated once at start; any mistake stops `orion` with the file, line and field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use russh::keys::PublicKey;
use serde::Deserialize;
use toml::Spanned;

/// One worker as the rest of Orion sees it: validated, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSpec {
    /// Stable identity of the worker, used in the API, the database and the logs.
    pub name: String,
    /// Site (room, zone, data centre) the worker lives in.
    pub site: String,
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
            check_label(site, "defaults.site").map_err(|m| at(site.span(), "defaults.site", m))?;
        }
        let default_public_host = raw.defaults.public_host.as_ref();
        if let Some(host) = default_public_host {
            check_host(host.get_ref()).map_err(|m| at(host.span(), "defaults.public_host", m))?;
        }

        let mut names: HashMap<String, usize> = HashMap::new();
        let mut addresses: HashMap<(String, u16), String> = HashMap::new();
        let mut workers = Vec::with_capacity(raw.workers.len());
        for (i, w) in raw.workers.iter().enumerate() {
            let field = |f: &str| format!("workers[{i}].{f}");
            check_label(&w.name, "name").map_err(|m| at(w.name.span(), &field("name"), m))?;
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
                    check_label(s, "site").map_err(|m| at(s.span(), &field("site"), m))?;
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
            if let Some(h) = &w.app_host {
                check_host(h.get_ref()).map_err(|m| at(h.span(), &field("app_host"), m))?;
            }
            if let Some(j) = &w.instances_join {
                check_label(j, "instances_join")
                    .map_err(|m| at(j.span(), &field("instances_join"), m))?;
            }
            workers.push(WorkerSpec {
                name,
                site,
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

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Names and sites: short, printable, safe in logs, URLs and container names.
fn check_label(value: &Spanned<String>, what: &str) -> Result<(), String> {
    let v = value.get_ref();
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
