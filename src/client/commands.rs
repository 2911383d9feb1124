//! The client commands (`orion rent`, `rentals`, `workers`, `drain`, `events`…): one
//! request each, and what it prints, a table or the API's JSON (`--json`). Answers are
//! read as the API's own types ([`crate::api::views`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::tables::{cell, event_line, table};
use super::{Client, ClientError};
use crate::api::views::{FleetWorkerView, RentalView};
use crate::store::Event;

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

/// A table column: its header, and its cell for one item.
type Column<T> = (&'static str, fn(&T) -> String);

const RENTAL_COLUMNS: [Column<RentalView>; 7] = [
    ("id", |r| cell(&r.id)),
    ("tenant", |r| cell(&r.tenant)),
    ("username", |r| cell(&r.username)),
    ("status", |r| cell(&r.status)),
    ("worker", |r| cell(&r.worker)),
    ("host", |r| cell(&r.host)),
    ("port", |r| cell(&r.port)),
];

const WORKER_COLUMNS: [Column<FleetWorkerView>; 8] = [
    ("name", |w| cell(&w.worker.worker.name)),
    ("site", |w| cell(&w.worker.worker.site)),
    ("status", |w| cell(&w.worker.worker.status)),
    ("allocated", |w| cell(&w.worker.allocated)),
    ("drained", |w| cell(&w.worker.worker.drained)),
    ("latency_ms", |w| cell(&w.worker.worker.probe_latency_ms)),
    ("last_checked", |w| cell(&w.worker.worker.last_checked)),
    ("quarantine", |w| cell(&w.worker.worker.quarantine_reason)),
];

/// Runs one command and prints its result: a table (or a line), or with `json` the
/// API's JSON.
pub async fn run(client: &Client, command: Command, json: bool) -> Result<(), ClientError> {
    match command {
        Command::Rent { key, username } => {
            let rented = client.rent(key.as_deref(), username.as_deref()).await?;
            if json {
                print_json(&rented);
            } else {
                let r = &rented.rental;
                println!("rental {} on {}", r.id, cell(&r.worker));
                println!("ssh -p {} {}@{}", cell(&r.port), r.username, cell(&r.host));
                if let Some(p) = &rented.password {
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
    }
    Ok(())
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
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}",
        resp.status()
    );
    Ok(())
}
