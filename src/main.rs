//! The `orion` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use orion::client::{Client, ClientError, Endpoint, cell, event_line, table};
use orion::config::Config;
use orion::inventory::Inventory;
use orion::playbook::Playbooks;
use orion::startup::{Application, shutdown_signal};
use orion::store::Store;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "orion",
    version,
    about = "Rent workers over SSH from a static inventory"
)]
struct Cli {
    /// Configuration file (TOML); `ORION_*` environment variables override it.
    #[arg(
        long,
        short,
        global = true,
        env = "ORION_CONFIG",
        default_value = "orion.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API and the scheduler (probe, migration, cleanup loops) in one process.
    Serve,
    /// Apply the database schema and exit.
    Migrate,
    /// Validate the configuration, the inventory and the playbooks, and exit.
    Check,
    /// Ask the local `orion serve` for its health; exit 0 if healthy (container checks).
    Healthcheck,
    /// Rent a worker; prints how to log in (the password too, once, if no key is given).
    Rent {
        /// Public key file to log in with (e.g. ~/.ssh/id_ed25519.pub).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Login name wanted on the worker.
        #[arg(long)]
        username: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Release a rental: its account is removed and its worker freed.
    Release {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the rentals that are not over.
    Rentals {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the workers (admin token).
    Workers {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Put a worker in maintenance: no new rentals, its tenants moved away (admin token).
    Drain {
        worker: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Put a drained worker back in service (admin token).
    Undrain {
        worker: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show the events log; `--follow` streams new events as they happen (admin token).
    Events {
        #[arg(long, short)]
        follow: bool,
        /// How many of the latest events to show first.
        #[arg(long, default_value_t = 20)]
        last: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// How client commands reach the API.
#[derive(clap::Args)]
struct ApiArgs {
    /// API base URL (through Caddy: https://localhost).
    #[arg(long, env = "ORION_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token (admin or tenant).
    #[arg(long, env = "ORION_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM root certificate to trust (Caddy's internal CA).
    #[arg(long, env = "ORION_CACERT")]
    cacert: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("failed to start the tokio runtime");
    match cli.command {
        Command::Serve | Command::Migrate | Command::Check | Command::Healthcheck => {
            server_command(cli.command, &cli.config, &runtime)
        }
        client_command => match runtime.block_on(run_client(client_command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("orion: {e}");
                ExitCode::from(e.exit_code())
            }
        },
    }
}

fn server_command(
    command: Command,
    path: &std::path::Path,
    runtime: &tokio::runtime::Runtime,
) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("orion: {e}");
            return ExitCode::from(2);
        }
    };
    orion::telemetry::init(&config.log);
    let result = runtime.block_on(async move {
        match command {
            Command::Serve => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::Check => check(&config).await,
            Command::Healthcheck => healthcheck(&config).await,
            _ => unreachable!("client commands are handled apart"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orion: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_client(command: Command) -> Result<(), ClientError> {
    let api = match &command {
        Command::Rent { api, .. }
        | Command::Release { api, .. }
        | Command::Rentals { api }
        | Command::Workers { api }
        | Command::Drain { api, .. }
        | Command::Undrain { api, .. }
        | Command::Events { api, .. } => api,
        _ => unreachable!("server commands are handled apart"),
    };
    let json_out = api.json;
    let client = Client::new(Endpoint {
        url: api.url.clone(),
        token: api.token.clone(),
        cacert: api.cacert.clone(),
    })?;
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
    match &command {
        Command::Rent { key, username, .. } => {
            let r = client.rent(key.as_deref(), username.as_deref()).await?;
            if json_out {
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
        Command::Release { id, .. } => {
            client.release(id).await?;
            if !json_out {
                println!("released {id}");
            }
        }
        Command::Rentals { .. } => {
            let r = client.rentals().await?;
            if json_out {
                print_json(&r);
            } else {
                let rows: Vec<Vec<String>> = r["rentals"]
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|x| {
                        [
                            "id", "tenant", "username", "status", "worker", "host", "port",
                        ]
                        .iter()
                        .map(|k| cell(&x[*k]))
                        .collect()
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &[
                            "id", "tenant", "username", "status", "worker", "host", "port"
                        ],
                        &rows
                    )
                );
            }
        }
        Command::Workers { .. } => {
            let r = client.workers().await?;
            if json_out {
                print_json(&r);
            } else {
                let rows: Vec<Vec<String>> = r["workers"]
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|w| {
                        vec![
                            cell(&w["name"]),
                            cell(&w["site"]),
                            cell(&w["status"]),
                            cell(&w["allocated"]),
                            cell(&w["drained"]),
                            cell(&w["probe_latency_ms"]),
                            cell(&w["last_checked"]),
                            cell(&w["quarantine_reason"]),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &[
                            "name",
                            "site",
                            "status",
                            "allocated",
                            "drained",
                            "latency_ms",
                            "last_checked",
                            "quarantine"
                        ],
                        &rows
                    )
                );
            }
        }
        Command::Drain { worker, .. } | Command::Undrain { worker, .. } => {
            let drained = matches!(command, Command::Drain { .. });
            let w = client.drain(worker, drained).await?;
            if json_out {
                print_json(&w);
            } else {
                println!(
                    "{worker}: {}",
                    if drained {
                        "drained"
                    } else {
                        "back in service"
                    }
                );
            }
        }
        Command::Events { follow, last, .. } => {
            let page = client.latest_events(*last).await?;
            for e in page["events"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
            {
                if json_out {
                    println!("{e}");
                } else {
                    println!("{}", event_line(e));
                }
            }
            if *follow {
                client
                    .follow_events(|e| {
                        if json_out {
                            println!("{e}");
                        } else {
                            println!("{}", event_line(e));
                        }
                    })
                    .await?;
            }
        }
        _ => unreachable!("server commands are handled apart"),
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = Application::build(config).await?;
    let token = CancellationToken::new();
    let signal = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    app.run_until_stopped(token).await
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = Store::connect_lazy(
        &config.database.url,
        config.database.max_connections,
        config.database.acquire_timeout,
    )?;
    store.migrate().await?;
    println!("schema up to date");
    Ok(())
}

async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{}/health", config.listen.port());
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(std::time::Duration::from_secs(2))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}",
        resp.status()
    );
    Ok(())
}

/// Validates config, inventory, playbooks (rendered with sample values) and key, then
/// probes every worker over SSH and prints a table. Exits non-zero if anything fails.
/// Writes nothing anywhere.
async fn check(config: &Config) -> anyhow::Result<()> {
    use orion::playbook::{Playbook, Vars};
    let inventory = Inventory::load(&config.inventory)?;
    let playbooks = Playbooks::load(&config.playbooks)?;
    let sample = Vars {
        username: "sample".into(),
        uid: Some(config.provisioning.uid_min),
        public_key: Some(orion::ssh::host_key_line(
            orion::ssh::generate_ed25519().public_key(),
        )),
        password_hash: Some(orion::model::hash_password("sample")),
    };
    for playbook in Playbook::ALL {
        playbooks.render(playbook, &sample, config.provisioning.uid_min)?;
    }
    let key = std::sync::Arc::new(orion::ssh::load_private_key(&config.ssh.key)?);
    println!(
        "configuration, inventory ({} workers), playbooks and SSH key are valid",
        inventory.workers.len()
    );
    let ssh = orion::ssh::SshClient::with_key(
        key,
        &config.ssh.user,
        config.ssh.connect_timeout,
        config.ssh.command_timeout,
        config.ssh.max_sessions,
    );
    let progress = orion::progress::bar(inventory.workers.len() as u64, "probing workers");
    let probes = inventory.workers.iter().map(|w| {
        let ssh = ssh.clone();
        let progress = progress.clone();
        let target = orion::ssh::Target {
            name: w.name.clone(),
            host: w.ssh_host.clone(),
            port: w.ssh_port,
            host_key: w.host_key.as_deref().and_then(orion::ssh::parse_host_key),
        };
        let timeout = config.health.probe_timeout;
        async move {
            let result = ssh.probe(&target, timeout).await;
            progress.inc(1);
            (target, result)
        }
    });
    let results = futures::future::join_all(probes).await;
    progress.finish_and_clear();
    let mut failed = 0;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(target, result)| match result {
            Ok(probe) => vec![
                target.name.clone(),
                format!("{}:{}", target.host, target.port),
                "ok".into(),
                probe.latency.as_millis().to_string(),
                format!(
                    "{}{}",
                    probe.host_key.fingerprint(russh::keys::HashAlg::Sha256),
                    if target.host_key.is_some() {
                        " (pinned)"
                    } else {
                        ""
                    }
                ),
            ],
            Err(e) => {
                failed += 1;
                vec![
                    target.name.clone(),
                    format!("{}:{}", target.host, target.port),
                    "FAILED".into(),
                    "-".into(),
                    e.to_string(),
                ]
            }
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "worker",
                "address",
                "probe",
                "latency_ms",
                "host key / error"
            ],
            &rows
        )
    );
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} workers failed their probe",
        results.len()
    );
    Ok(())
}
