//! The `orion` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use orion::client::{self, Client, ClientError, Endpoint};
use orion::config::Config;
use orion::startup::{Application, shutdown_signal};
use orion::store::Store;
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
        /// Only on a worker of this site.
        #[arg(long)]
        site: Option<String>,
        /// Only on a worker of this site if one is free, else anywhere.
        #[arg(long)]
        prefer_site: Option<String>,
        /// Only on a worker carrying this label, `KEY=VALUE` (repeat for more).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show, export or apply the inventory, live (admin token).
    Inventory {
        #[command(subcommand)]
        action: InventoryAction,
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
    /// Print the `known_hosts` line that makes ssh trust every worker through Orion's
    /// host CA (append it to ~/.ssh/known_hosts once).
    KnownHosts {
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
    /// Return a quarantined worker to service: `orion workers` shows why and since when
    /// it was quarantined (admin token).
    Restore {
        worker: String,
        /// Trust the host key it presents at the next probe (it was rebuilt on purpose).
        #[arg(long)]
        forget_host_key: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List apps and how many of their instances are ready.
    Apps {
        #[command(flatten)]
        api: ApiArgs,
    },
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
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum InventoryAction {
    /// Print the inventory Orion holds, as a file `apply` takes back.
    Export {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make the inventory FILE's: print the difference, then apply it (workers left out
    /// are retired, their tenants moved first).
    Apply {
        file: PathBuf,
        /// Print the difference only.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum AppAction {
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
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show an app and its instances.
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Scale an app to REPLICAS instances.
    Scale {
        name: String,
        replicas: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Roll an app to another image, one instance at a time.
    Roll {
        name: String,
        image: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete an app: every instance is removed from its worker.
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the last lines of an instance's log (default: the app's first instance).
    Logs {
        name: String,
        #[arg(long)]
        instance: Option<u64>,
        #[arg(long, default_value_t = 100)]
        lines: u32,
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
    let (api, request) = match cli.command {
        Command::Serve | Command::Migrate | Command::Check | Command::Healthcheck => {
            return server_command(cli.command, &cli.config, &runtime);
        }
        Command::Rent {
            key,
            username,
            site,
            prefer_site,
            labels,
            api,
        } => (
            api,
            client::Command::Rent {
                key,
                username,
                site,
                prefer_site,
                labels,
            },
        ),
        Command::Inventory { action } => match action {
            InventoryAction::Export { api } => (api, client::Command::InventoryExport),
            InventoryAction::Apply { file, dry_run, api } => {
                (api, client::Command::InventoryApply { file, dry_run })
            }
        },
        Command::Release { id, api } => (api, client::Command::Release { id }),
        Command::Rentals { api } => (api, client::Command::Rentals),
        Command::KnownHosts { api } => (api, client::Command::KnownHosts),
        Command::Workers { api } => (api, client::Command::Workers),
        Command::Drain { worker, api } => (
            api,
            client::Command::Drain {
                worker,
                drained: true,
            },
        ),
        Command::Undrain { worker, api } => (
            api,
            client::Command::Drain {
                worker,
                drained: false,
            },
        ),
        Command::Restore {
            worker,
            forget_host_key,
            api,
        } => (
            api,
            client::Command::Restore {
                worker,
                forget_host_key,
            },
        ),
        Command::Events { follow, last, api } => (api, client::Command::Events { follow, last }),
        Command::Apps { api } => (api, client::Command::Apps),
        Command::App { action } => match action {
            AppAction::Create {
                name,
                image,
                replicas,
                port,
                env,
                command,
                api,
            } => (
                api,
                client::Command::AppCreate {
                    name,
                    image,
                    replicas,
                    port,
                    env,
                    command,
                },
            ),
            AppAction::Show { name, api } => (api, client::Command::AppShow { name }),
            AppAction::Scale {
                name,
                replicas,
                api,
            } => (
                api,
                client::Command::AppChange {
                    name,
                    replicas: Some(replicas),
                    image: None,
                },
            ),
            AppAction::Roll { name, image, api } => (
                api,
                client::Command::AppChange {
                    name,
                    replicas: None,
                    image: Some(image),
                },
            ),
            AppAction::Delete { name, api } => (api, client::Command::AppDelete { name }),
            AppAction::Logs {
                name,
                instance,
                lines,
                api,
            } => (
                api,
                client::Command::AppLogs {
                    name,
                    instance,
                    lines,
                },
            ),
        },
    };
    match runtime.block_on(run_client(api, request)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orion: {e}");
            ExitCode::from(e.exit_code())
        }
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
            Command::Check => orion::check::run(&config).await,
            Command::Healthcheck => client::healthcheck(config.listen.port()).await,
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

async fn run_client(api: ApiArgs, command: client::Command) -> Result<(), ClientError> {
    let client = Client::new(Endpoint {
        url: api.url,
        token: api.token,
        cacert: api.cacert,
    })?;
    client::run(&client, command, api.json).await
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
