//! The client commands (`orion rent`, `rentals`, `workers`, `drain`, `events`…): one
//! request each, and what it prints, a table or the API's JSON (`--json`). Answers are
//! read as the API's own types ([`crate::api::views`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::tables::{cell, event_line, table};
use super::{Client, ClientError};
use crate::api::apps::{AppBody, AppPatch, AppView, InstanceView};
use crate::api::views::{FleetWorkerView, RentalView};
use crate::store::Event;

/// A client command, as parsed from the command line.
#[derive(Debug, Clone)]
pub enum Command {
    Rent {
        key: Option<PathBuf>,
        username: Option<String>,
        site: Option<String>,
        prefer_site: Option<String>,
        /// `KEY=VALUE` each.
        labels: Vec<String>,
    },
    /// The inventory as a file, on standard output.
    InventoryExport,
    /// Applies an inventory file (`dry_run`: shows the difference only).
    InventoryApply {
        file: PathBuf,
        dry_run: bool,
    },
    Release {
        id: String,
    },
    Rentals,
    /// The host CA's `known_hosts` line.
    KnownHosts,
    Workers,
    /// `drained: false` puts the worker back in service.
    Drain {
        worker: String,
        drained: bool,
    },
    /// Return a quarantined worker to service (optionally trusting its new host key).
    Restore {
        worker: String,
        forget_host_key: bool,
    },
    Events {
        follow: bool,
        last: u32,
    },
    Apps,
    AppCreate {
        name: String,
        image: String,
        replicas: u32,
        port: Option<u32>,
        /// `NAME=value` each.
        env: Vec<String>,
        command: Vec<String>,
    },
    AppShow {
        name: String,
    },
    AppChange {
        name: String,
        replicas: Option<u32>,
        image: Option<String>,
    },
    AppDelete {
        name: String,
    },
    AppLogs {
        name: String,
        instance: Option<u64>,
        lines: u32,
    },
}

const APP_COLUMNS: [Column<AppView>; 6] = [
    ("name", |a| cell(&a.name)),
    ("tenant", |a| cell(&a.tenant)),
    ("image", |a| cell(&a.image)),
    ("replicas", |a| cell(&a.replicas)),
    ("ready", |a| cell(&a.ready)),
    ("port", |a| cell(&a.port)),
];

const INSTANCE_COLUMNS: [Column<InstanceView>; 8] = [
    ("id", |i| cell(&i.id)),
    ("worker", |i| cell(&i.worker)),
    ("status", |i| cell(&i.status)),
    ("host", |i| cell(&i.host)),
    ("port", |i| cell(&i.port)),
    ("restarts", |i| cell(&i.restarts)),
    ("exit_code", |i| cell(&i.exit_code)),
    ("started_at", |i| cell(&i.started_at)),
];

/// A table column: its header, and its cell for one item.
type Column<T> = (&'static str, fn(&T) -> String);

const RENTAL_COLUMNS: [Column<RentalView>; 9] = [
    ("id", |r| cell(&r.id)),
    ("tenant", |r| cell(&r.tenant)),
    ("username", |r| cell(&r.username)),
    ("status", |r| cell(&r.status)),
    ("worker", |r| cell(&r.worker)),
    ("host", |r| cell(&r.host)),
    ("port", |r| cell(&r.port)),
    ("endpoint", |r| {
        cell(
            &r.endpoint
                .as_ref()
                .map(|e| format!("{}:{}", e.host, e.port)),
        )
    }),
    ("last_snapshot", |r| cell(&r.last_snapshot_at)),
];

const WORKER_COLUMNS: [Column<FleetWorkerView>; 9] = [
    ("name", |w| cell(&w.worker.worker.name)),
    ("site", |w| cell(&w.worker.worker.site)),
    ("status", |w| cell(&w.worker.worker.status)),
    ("allocated", |w| cell(&w.worker.allocated)),
    ("drained", |w| cell(&w.worker.worker.drained)),
    ("latency_ms", |w| cell(&w.worker.worker.probe_latency_ms)),
    ("last_checked", |w| cell(&w.worker.worker.last_checked)),
    ("quarantine", |w| cell(&w.worker.worker.quarantine_reason)),
    ("quarantined_at", |w| cell(&w.worker.worker.quarantined_at)),
];

/// `NAME=value` arguments of `flag` as a map.
fn pairs(
    args: &[String],
    flag: &str,
) -> Result<std::collections::BTreeMap<String, String>, ClientError> {
    args.iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ClientError::Usage(format!("{flag} `{pair}` is not NAME=value")))
        })
        .collect()
}

/// Runs one command and prints its result: a table (or a line), or with `json` the
/// API's JSON.
pub async fn run(client: &Client, command: Command, json: bool) -> Result<(), ClientError> {
    match command {
        Command::InventoryExport => print!("{}", client.inventory().await?),
        Command::InventoryApply { file, dry_run } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", file.display())))?;
            // Checked here first, so that a mistake names this file.
            crate::inventory::Inventory::parse(&text, &file)
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            // The difference first, always; then the change itself.
            let preview = client.apply_inventory(&text, true).await?;
            let shown = if dry_run || preview.changes.is_empty() {
                preview
            } else {
                for line in &preview.changes {
                    println!("{line}");
                }
                client.apply_inventory(&text, false).await?
            };
            if json {
                print_json(&shown);
            } else {
                if dry_run || shown.changes.is_empty() {
                    for line in &shown.changes {
                        println!("{line}");
                    }
                }
                match (shown.changes.len(), shown.applied) {
                    (0, _) => println!("no change: the inventory is already this file's"),
                    (n, true) => println!("{n} change(s) applied"),
                    (n, false) => println!("{n} change(s) (dry run: nothing applied)"),
                }
            }
        }
        Command::Rent {
            key,
            username,
            site,
            prefer_site,
            labels,
        } => {
            let labels = pairs(&labels, "--label")?;
            let body = crate::api::views::RentBody {
                username,
                site,
                prefer_site,
                labels: (!labels.is_empty()).then_some(labels),
                ..Default::default()
            };
            let rented = client.rent(key.as_deref(), body).await?;
            if json {
                print_json(&rented);
            } else {
                let r = &rented.rental;
                println!("rental {} on {}", r.id, cell(&r.worker));
                match &r.endpoint {
                    // The endpoint stays the same when the rental moves.
                    Some(endpoint) => {
                        println!("{}", endpoint.ssh_command(&r.username));
                        println!(
                            "(trust its workers once: orion known-hosts >> ~/.ssh/known_hosts)"
                        );
                    }
                    None => println!("ssh -p {} {}@{}", cell(&r.port), r.username, cell(&r.host)),
                }
                if let Some(p) = &rented.password {
                    println!("password: {p}   (shown once)");
                }
            }
        }
        Command::KnownHosts => print!("{}", client.known_hosts().await?),
        Command::Release { id } => {
            client.release(&id).await?;
            if !json {
                println!("released {id}");
            }
        }
        Command::Rentals => {
            let r = client.rentals().await?;
            if json {
                print_json(&r);
            } else {
                print_table(&RENTAL_COLUMNS, &r.rentals);
            }
        }
        Command::Workers => {
            let r = client.workers().await?;
            if json {
                print_json(&r);
            } else {
                print_table(&WORKER_COLUMNS, &r.workers);
            }
        }
        Command::Restore {
            worker,
            forget_host_key,
        } => {
            let w = client.restore(&worker, forget_host_key).await?;
            if json {
                print_json(&w);
            } else {
                println!("{worker}: back in service (status {})", w.worker.status);
            }
        }
        Command::Drain { worker, drained } => {
            let w = client.drain(&worker, drained).await?;
            if json {
                print_json(&w);
            } else {
                let state = if drained {
                    "drained"
                } else {
                    "back in service"
                };
                println!("{worker}: {state}");
            }
        }
        Command::Events { follow, last } => {
            // One line per event: `--json` prints each compact, as the stream sends it.
            let print = |e: &Event| {
                if json {
                    println!("{}", serde_json::to_string(e).expect("an event serialises"));
                } else {
                    println!("{}", event_line(e));
                }
            };
            client
                .latest_events(last)
                .await?
                .events
                .iter()
                .for_each(print);
            if follow {
                client.follow_events(print).await?;
            }
        }
        Command::Apps => {
            let list = client.apps().await?;
            if json {
                print_json(&list);
            } else {
                print_table(&APP_COLUMNS, &list.apps);
            }
        }
        Command::AppCreate {
            name,
            image,
            replicas,
            port,
            env,
            command,
        } => {
            let env = pairs(&env, "--env")?;
            let body = AppBody {
                name: Some(name),
                image: Some(image),
                replicas: Some(replicas),
                command: (!command.is_empty()).then_some(command),
                env: Some(env),
                port,
                health_path: None,
            };
            show_app(&client.create_app(&body).await?, json);
        }
        Command::AppShow { name } => show_app(&client.app(&name).await?, json),
        Command::AppChange {
            name,
            replicas,
            image,
        } => {
            let patch = AppPatch { replicas, image };
            show_app(&client.change_app(&name, &patch).await?, json);
        }
        Command::AppDelete { name } => {
            client.delete_app(&name).await?;
            if !json {
                println!("deleted {name}: its instances are being removed");
            }
        }
        Command::AppLogs {
            name,
            instance,
            lines,
        } => print!("{}", client.app_logs(&name, instance, lines).await?),
    }
    Ok(())
}

/// An app: a line about it, then its instances as a table.
fn show_app(app: &AppView, json: bool) {
    if json {
        print_json(app);
        return;
    }
    println!(
        "{}: {} × {}, {} ready{}",
        app.name,
        app.replicas,
        app.image,
        app.ready,
        app.port.map(|p| format!(", port {p}")).unwrap_or_default()
    );
    if !app.instances.is_empty() {
        print_table(&INSTANCE_COLUMNS, &app.instances);
    }
}

fn print_json(answer: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(answer).expect("an answer serialises")
    );
}

/// Prints `items` as a table of `columns`.
fn print_table<T>(columns: &[Column<T>], items: &[T]) {
    let headers: Vec<&str> = columns.iter().map(|(header, _)| *header).collect();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|(_, cell)| cell(item)).collect())
        .collect();
    println!("{}", table(&headers, &rows));
}

/// `orion healthcheck`: asks the local `orion serve` (on `port`) for its health.
pub async fn healthcheck(port: u16) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/health");
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(2))
        .send()
        .await?;
    let status = resp.status();
    // The answer (which instance, whether it leads, with which epoch) is printed: Docker
    // keeps it in the container's health log, and `docker exec … orion healthcheck`
    // asks one replica of several.
    println!("{}", resp.text().await.unwrap_or_default());
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(())
}
