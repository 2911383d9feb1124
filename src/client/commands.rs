//! The client commands (`orion rent`, `rentals`, `workers`, `drain`, `events`…): their
//! command line (declared here only, for `clap`), one request each, and what it prints,
//! a table or the API's JSON (`--json`). Answers are read as the API's own types
//! ([`crate::api::views`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args as _;
use serde::Serialize;

use super::tables::{cell, event_line, table};
use super::{Client, ClientError, Endpoint};
use crate::api::apps::{AppBody, AppPatch, AppView, InstanceView};
use crate::api::views::{FleetWorkerView, RentalView};
use crate::store::Event;

/// A client command, declared for `clap` as the command line spells it (each doc is the
/// command's help). Every one also takes the API's flags, added by [`Invocation`].
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Rent a worker; prints how to log in (the password too, once, if no key is given).
    Rent {
        /// Public key file to log in with (e.g. ~/.ssh/id_ed25519.pub).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Login name wanted on the worker.
        #[arg(long)]
        username: Option<String>,
        /// Only on a worker of this site.
        #[arg(long)]
        site: Option<String>,
        /// Only on a worker of this site if one is free, else anywhere.
        #[arg(long)]
        prefer_site: Option<String>,
        /// Only on a worker carrying this label, `KEY=VALUE` (repeat for more).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Show, export or apply the inventory, live (admin token).
    Inventory {
        #[command(subcommand)]
        action: InventoryAction,
    },
    /// Release a rental: its account is removed and its worker freed.
    Release { id: String },
    /// List the rentals that are not over.
    Rentals,
    /// Print the `known_hosts` line that makes ssh trust every worker through Orion's
    /// host CA (append it to ~/.ssh/known_hosts once).
    KnownHosts,
    /// List the workers (admin token).
    Workers,
    /// Put a worker in maintenance: no new rentals, its tenants moved away (admin token).
    Drain { worker: String },
    /// Put a drained worker back in service (admin token).
    Undrain { worker: String },
    /// Return a quarantined worker to service: `orion workers` shows why and since when
    /// it was quarantined (admin token).
    Restore {
        worker: String,
        /// Trust the host key it presents at the next probe (it was rebuilt on purpose).
        #[arg(long)]
        forget_host_key: bool,
    },
    /// List apps and how many of their instances are ready.
    Apps,
    /// Create, show, scale, roll, delete an app, or read an instance's log.
    App {
        #[command(subcommand)]
        action: AppAction,
    },
    /// Show the events log; `--follow` streams new events as they happen (admin token).
    Events {
        #[arg(long, short)]
        follow: bool,
        /// How many of the latest events to show first.
        #[arg(long, default_value_t = 20)]
        last: u32,
    },
}

/// `orion inventory …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum InventoryAction {
    /// Print the inventory Orion holds, as a file `apply` takes back.
    Export,
    /// Make the inventory FILE's: print the difference, then apply it (workers left out
    /// are retired, their tenants moved first).
    Apply {
        file: PathBuf,
        /// Print the difference only.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `orion app …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AppAction {
    /// Create an app: IMAGE run as REPLICAS instances, each on a worker of its own.
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// The port the app listens on.
        #[arg(long)]
        port: Option<u32>,
        /// An environment variable, `NAME=value` (repeat for more).
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// The program and its arguments, instead of the image's own (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Show an app and its instances.
    Show { name: String },
    /// Scale an app to REPLICAS instances.
    Scale { name: String, replicas: u32 },
    /// Roll an app to another image, one instance at a time.
    Roll { name: String, image: String },
    /// Delete an app: every instance is removed from its worker.
    Delete { name: String },
    /// Print the last lines of an instance's log (default: the app's first instance).
    Logs {
        name: String,
        #[arg(long)]
        instance: Option<u64>,
        #[arg(long, default_value_t = 100)]
        lines: u32,
    },
}

/// A client command as given on the command line: what to do, which API to ask and how
/// to print its answer. For `clap` it is [`Command`]'s subcommands with `--url`,
/// `--token`, `--cacert` and `--json` added to each command that runs (`app create`, not
/// `app`): the flags are declared once, and the server commands do not take them.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub endpoint: Endpoint,
    /// The API's JSON instead of a table.
    pub json: bool,
}

/// The flags every client command takes: where the API is, who calls, how to print.
#[derive(clap::Args)]
struct ApiFlags {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl Invocation {
    /// Runs the command: its answer on standard output, or its error on standard error
    /// and the exit code scripts rely on ([`ClientError::exit_code`]).
    pub async fn run(self) -> ExitCode {
        let result = match Client::new(self.endpoint) {
            Ok(client) => run(&client, self.command, self.json).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("orion: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    }
}

impl clap::Subcommand for Invocation {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        with_api_flags(Command::augment_subcommands(cmd), Command::has_subcommand)
    }

    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        with_api_flags(
            Command::augment_subcommands_for_update(cmd),
            Command::has_subcommand,
        )
    }

    fn has_subcommand(name: &str) -> bool {
        Command::has_subcommand(name)
    }
}

impl clap::FromArgMatches for Invocation {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        // The flags are the leaf's: `orion app create …`'s, not `orion app`'s.
        let mut leaf = matches;
        while let Some((_, sub)) = leaf.subcommand() {
            leaf = sub;
        }
        let ApiFlags { endpoint, json } = ApiFlags::from_arg_matches(leaf)?;
        let command = Command::from_arg_matches(matches)?;
        Ok(Self {
            command,
            endpoint,
            json,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// `cmd` with [`ApiFlags`] on each of its subcommands named `ours`, on their leaves.
fn with_api_flags(cmd: clap::Command, ours: fn(&str) -> bool) -> clap::Command {
    if !cmd.has_subcommands() {
        // Copied from a command of their own: `augment_args` would also set the command's
        // help (to `Endpoint`'s doc), and the copies come after the command's own flags.
        let flags = ApiFlags::augment_args(clap::Command::new("api").next_display_order(None));
        return cmd.args(flags.get_arguments().cloned());
    }
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .filter(|name| ours(name))
        .collect();
    names.iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |sub| with_api_flags(sub, |_| true))
    })
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
        Command::Inventory { action } => inventory(client, action, json).await?,
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
        Command::Drain { worker } => drain(client, &worker, true, json).await?,
        Command::Undrain { worker } => drain(client, &worker, false, json).await?,
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
        Command::App { action } => app(client, action, json).await?,
    }
    Ok(())
}

/// `orion inventory export` and `orion inventory apply`.
async fn inventory(
    client: &Client,
    action: InventoryAction,
    json: bool,
) -> Result<(), ClientError> {
    match action {
        InventoryAction::Export => print!("{}", client.inventory().await?),
        InventoryAction::Apply { file, dry_run } => {
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
    }
    Ok(())
}

/// `orion drain` (`drained`) and `orion undrain`.
async fn drain(
    client: &Client,
    worker: &str,
    drained: bool,
    json: bool,
) -> Result<(), ClientError> {
    let w = client.drain(worker, drained).await?;
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
    Ok(())
}

/// `orion app …`
async fn app(client: &Client, action: AppAction, json: bool) -> Result<(), ClientError> {
    match action {
        AppAction::Create {
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
        AppAction::Show { name } => show_app(&client.app(&name).await?, json),
        AppAction::Scale { name, replicas } => {
            let patch = AppPatch {
                replicas: Some(replicas),
                image: None,
            };
            show_app(&client.change_app(&name, &patch).await?, json);
        }
        AppAction::Roll { name, image } => {
            let patch = AppPatch {
                replicas: None,
                image: Some(image),
            };
            show_app(&client.change_app(&name, &patch).await?, json);
        }
        AppAction::Delete { name } => {
            client.delete_app(&name).await?;
            if !json {
                println!("deleted {name}: its instances are being removed");
            }
        }
        AppAction::Logs {
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

#[cfg(test)]
mod tests {
    use clap::{FromArgMatches as _, Subcommand as _};

    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, clap::Error> {
        let orion = Invocation::augment_subcommands(clap::Command::new("orion"));
        Invocation::from_arg_matches(&orion.try_get_matches_from(args)?)
    }

    #[test]
    fn the_api_flags_go_on_the_command_that_runs() {
        let app = parse(&["orion", "app", "show", "x", "--url", "http://x", "--json"]).unwrap();
        assert_eq!(app.endpoint.url, "http://x");
        assert!(app.json);
        assert!(matches!(
            app.command,
            Command::App { action: AppAction::Show { name } } if name == "x"
        ));
        assert!(parse(&["orion", "app", "--url", "http://x", "show", "x"]).is_err());

        let drain = parse(&[
            "orion", "undrain", "w", "--token", "t", "--cacert", "ca.pem",
        ]);
        let drain = drain.unwrap();
        assert_eq!(drain.endpoint.token.as_deref(), Some("t"));
        assert_eq!(drain.endpoint.cacert, Some(PathBuf::from("ca.pem")));
        assert!(!drain.json);
        assert!(matches!(drain.command, Command::Undrain { worker } if worker == "w"));
    }
}
