use clap::Parser;
use herald_relay::allocator;
use herald_relay::config::{Cli, Command, DeadCommand};
use herald_relay::{Application, broker::dead};
use herald_shared::{admin, shutdown, telemetry};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator {};

fn main() -> ExitCode {
    allocator::no_huge_pages();
    let cli = Cli::parse();
    telemetry::init();
    telemetry::install_crypto_provider();
    // Every task on this one thread: a job crosses several tasks (consumer,
    // job, session, stream, ack flusher), and on a multi-threaded runtime
    // each hand-off between workers is a futex wake-up. One thread cost 38
    // µs of CPU per delivered job against 56 and drained a backlog 25 %
    // faster (docs/performance.md, "The relay on one thread"). 38 µs a job
    // is a core's worth at about 26,000 jobs a second, well above what an
    // XMPP server takes (about 10,000 a second there); more throughput
    // comes from more replicas.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "herald-relay could not start its runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
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
