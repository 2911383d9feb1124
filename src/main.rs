//! The `orion` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use orion::config::Config;
use orion::inventory::Inventory;
use orion::playbook::Playbooks;
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
    /// Run the API and the scheduler (probe and cleanup loops) in one process.
    Serve,
    /// Apply the database schema and exit.
    Migrate,
    /// Validate the configuration, the inventory and the playbooks, and exit.
    Check,
    /// Ask the local `orion serve` for its health; exit 0 if healthy (container checks).
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("orion: {e}");
            return ExitCode::from(2);
        }
    };
    orion::telemetry::init(&config.log);
    let runtime = tokio::runtime::Runtime::new().expect("failed to start the tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::Check => check(&config),
            Command::Healthcheck => healthcheck(&config).await,
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

fn check(config: &Config) -> anyhow::Result<()> {
    let inventory = Inventory::load(&config.inventory)?;
    Playbooks::load(&config.playbooks)?;
    orion::ssh::load_private_key(&config.ssh.key)?;
    println!(
        "configuration, inventory ({} workers), playbooks and SSH key are valid",
        inventory.workers.len()
    );
    Ok(())
}
