use clap::Parser;
use herald_relay::config::{Cli, Command, DeadCommand};
use herald_relay::{Application, broker::dead};
use herald_shared::{admin, shutdown, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    telemetry::install_crypto_provider();
    let result = match cli.command {
        Some(Command::Healthcheck { admin_listen }) => return admin::run_healthcheck("herald-relay", admin_listen),
        Some(Command::Dead(DeadCommand::List { broker, limit })) => {
            dead::list(&broker, limit, &mut std::io::stdout()).await.map(|n| eprintln!("{n} parked job(s) listed"))
        }
        Some(Command::Dead(DeadCommand::Replay { broker, ids })) => {
            dead::replay(&broker, &ids).await.map(|n| eprintln!("{n} job(s) replayed into the work queue"))
        }
        None => async { Application::build(cli.config).await?.run_until(shutdown::signal()).await }.await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "herald-relay stopped");
            ExitCode::FAILURE
        }
    }
}
