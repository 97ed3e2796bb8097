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
    raise_fd_limit();
    let result = match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Events(args) => events::events(args).await,
        Command::Top(args) => top::top(args).await,
        Command::Check(args) => check::check(&args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tracer: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard one: the default soft limit (1024) is low
/// for an agent that serves HTTP clients beside its maps and programs.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!(
                    "could not raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
