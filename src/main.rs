//! The `orion` binary: parses the command line and hands over to the library. The server
//! commands are declared here, the client's in [`orion::client::Command`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use orion::client::{self, Invocation};
use orion::config::Config;
use orion::startup::{Application, shutdown_signal};
use orion::store::Store;
use tokio_util::sync::CancellationToken;

/// Rent workers over SSH from a static inventory
#[derive(Parser)]
#[command(name = "orion", version)]
struct Cli {
    /// Configuration file (TOML) of serve, migrate, check and healthcheck; `ORION_*`
    /// environment variables override it.
    #[arg(long, short, env = "ORION_CONFIG", default_value = "orion.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Server(ServerCommand),
    #[command(flatten)]
    Client(Invocation),
}

/// The commands that read the configuration file.
#[derive(Subcommand)]
enum ServerCommand {
    /// Run the API and the scheduler (probe, migration, cleanup loops) in one process.
    Serve(ConfigFile),
    /// Apply the database schema and exit.
    Migrate(ConfigFile),
    /// Validate the configuration, the inventory and the playbooks, and exit.
    Check(ConfigFile),
    /// Ask the local `orion serve` for its health; exit 0 if healthy (container checks).
    Healthcheck(ConfigFile),
}

/// `--config` after the command's name too (`orion serve --config FILE`).
#[derive(Args)]
struct ConfigFile {
    /// Configuration file (TOML), if not given before the command (`orion --config FILE
    /// serve`) nor by ORION_CONFIG (else orion.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("failed to start the tokio runtime");
    match cli.command {
        Command::Server(command) => command.run(cli.config, &runtime),
        Command::Client(invocation) => runtime.block_on(invocation.run()),
    }
}

impl ServerCommand {
    /// Reads the configuration (else exit 2), then runs the command (exit 1 if it fails).
    fn run(self, config: PathBuf, runtime: &tokio::runtime::Runtime) -> ExitCode {
        let config = match Config::load(&self.config_file(config)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("orion: {e}");
                return ExitCode::from(2);
            }
        };
        orion::telemetry::init(&config.log);
        let result = runtime.block_on(async move {
            match self {
                Self::Serve(_) => serve(config).await,
                Self::Migrate(_) => migrate(config).await,
                Self::Check(_) => orion::check::run(&config).await,
                Self::Healthcheck(_) => client::healthcheck(config.listen.port()).await,
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

    /// The file named after the command, else `before` (`orion --config FILE …`, or
    /// ORION_CONFIG, or the default).
    fn config_file(&self, before: PathBuf) -> PathBuf {
        let (Self::Serve(file) | Self::Migrate(file) | Self::Check(file) | Self::Healthcheck(file)) =
            self;
        file.config.clone().unwrap_or(before)
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_holds_together_and_config_goes_before_or_after_a_server_command() {
        Cli::command().debug_assert();
        let config = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let Command::Server(command) = cli.command else {
                panic!("not a server command: {args:?}")
            };
            command.config_file(cli.config).display().to_string()
        };
        assert_eq!(config(&["orion", "-c", "a", "check"]), "a");
        assert_eq!(config(&["orion", "serve", "--config", "b"]), "b");
        assert_eq!(config(&["orion", "-c", "a", "migrate", "-c", "c"]), "c");
        assert!(Cli::try_parse_from(["orion", "rentals", "--config", "a"]).is_err());
        assert!(Cli::try_parse_from(["orion", "serve", "--url", "http://x"]).is_err());
    }
}
