//! The client commands (`orion rent`, `rentals`, `workers`, `drain`, `events`…): one
//! request each, and what it prints, a table or the API's JSON (`--json`).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::tables::{cell, event_line, table};
use super::{Client, ClientError};

/// A client command, as parsed from the command line.
#[derive(Debug, Clone)]
pub enum Command {
    Rent {
        key: Option<PathBuf>,
        username: Option<String>,
    },
    Release {
        id: String,
    },
    Rentals,
    Workers,
    /// `drained: false` puts the worker back in service.
    Drain {
        worker: String,
        drained: bool,
    },
    Events {
        follow: bool,
        last: u32,
    },
}

const RENTAL_COLUMNS: [&str; 7] = [
    "id", "tenant", "username", "status", "worker", "host", "port",
];

/// The worker fields shown, and their column headers.
const WORKER_COLUMNS: [(&str, &str); 8] = [
    ("name", "name"),
    ("site", "site"),
    ("status", "status"),
    ("allocated", "allocated"),
    ("drained", "drained"),
    ("probe_latency_ms", "latency_ms"),
    ("last_checked", "last_checked"),
    ("quarantine_reason", "quarantine"),
];

/// Runs one command and prints its result: a table (or a line), or with `json` the
/// API's JSON.
pub async fn run(client: &Client, command: Command, json: bool) -> Result<(), ClientError> {
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
    match command {
        Command::Rent { key, username } => {
            let r = client.rent(key.as_deref(), username.as_deref()).await?;
            if json {
                print_json(&r);
            } else {
                println!("rental {} on {}", cell(&r["id"]), cell(&r["worker"]));
                println!(
                    "ssh -p {} {}@{}",
                    cell(&r["port"]),
                    cell(&r["username"]),
                    cell(&r["host"])
                );
                if let Some(p) = r["password"].as_str() {
                    println!("password: {p}   (shown once)");
                }
            }
        }
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
                let rows = rows(&r["rentals"], &RENTAL_COLUMNS);
                println!("{}", table(&RENTAL_COLUMNS, &rows));
            }
        }
        Command::Workers => {
            let r = client.workers().await?;
            if json {
                print_json(&r);
            } else {
                let fields = WORKER_COLUMNS.map(|(field, _)| field);
                let headers = WORKER_COLUMNS.map(|(_, header)| header);
                println!("{}", table(&headers, &rows(&r["workers"], &fields)));
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
            let print = |e: &Value| {
                if json {
                    println!("{e}");
                } else {
                    println!("{}", event_line(e));
                }
            };
            let page = client.latest_events(last).await?;
            page["events"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .for_each(print);
            if follow {
                client.follow_events(print).await?;
            }
        }
    }
    Ok(())
}

/// The given fields of each object of a JSON array, as table cells.
fn rows(list: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    list.as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|x| fields.iter().map(|k| cell(&x[*k])).collect())
        .collect()
}

/// `orion healthcheck`: asks the local `orion serve` (on `port`) for its health.
pub async fn healthcheck(port: u16) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/health");
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(2))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}",
        resp.status()
    );
    Ok(())
}
