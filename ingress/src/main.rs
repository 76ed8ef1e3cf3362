use clap::Parser;
use herald_ingress::config::{Cli, Command, TokenCommand};
use herald_ingress::{Application, hash_password, users};
use herald_shared::{admin, shutdown, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::HashPassword) => {
            return match hash_password::from_stdin() {
                Ok(phc) => {
                    println!("{phc}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald-ingress hash-password: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Token(TokenCommand::New { user, name })) => {
            return match users::new_token_entry(&user, name.as_deref()) {
                Ok((token, entry)) => {
                    eprintln!("the token, shown once (give it to the client): {token}");
                    eprintln!("add this to the users file, which reloads by itself:");
                    print!("{entry}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald-ingress token new: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Healthcheck { admin_listen }) => return admin::run_healthcheck("herald-ingress", admin_listen),
        None => {}
    }
    telemetry::init();
    telemetry::install_crypto_provider();
    let result = async { Application::build(cli.config).await?.run_until(shutdown::signal()).await }.await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "herald-ingress stopped");
            ExitCode::FAILURE
        }
    }
}
