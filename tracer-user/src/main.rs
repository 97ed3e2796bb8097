use std::io::IsTerminal as _;

use clap::Parser as _;
use tracer_user::cli::{Cli, Command, check, events, run, top};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,aya=warn,aya_obj=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Events(args) => events::events(args).await,
        Command::Top(args) => top::top(args).await,
        Command::Check(args) => check::check(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tracer: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
