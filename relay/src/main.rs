use clap::Parser;
use herald_relay::config::Cli;
use herald_relay::Application;
use herald_shared::{shutdown, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    telemetry::install_crypto_provider();
    let result = async { Application::build(cli.config).await?.run_until(shutdown::signal()).await }.await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "herald-relay stopped");
            ExitCode::FAILURE
        }
    }
}
