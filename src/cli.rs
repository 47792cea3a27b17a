//! The command line: `socklab serve|client`, and the mapping of outcomes to exit codes:
//! 0 success, 1 failure at run time, 2 a user mistake (bad arguments, bad or busy address).

use crate::client::{ClientArgs, UsageError};
use crate::net::NetError;
use crate::server::ServeArgs;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// socklab: socket and IPC programming made real and measurable.
#[derive(Debug, Parser)]
#[command(name = "socklab", version, about)]
pub struct Cli {
    /// Show connection-level detail in the log (stderr); twice for more.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a service (echo, discard, daytime, reverse, http) under a server design.
    ///
    /// Example: `socklab serve reverse --model epoll --listen 127.0.0.1:0`,
    /// `socklab serve http --root ./public --send sendfile`
    Serve(ServeArgs),
    /// Talk to a service: `reverse ADDR FILE...`, `echo ADDR`, `daytime ADDR`.
    ///
    /// Example: `socklab client reverse 127.0.0.1:7000 notes.txt`
    Client(ClientArgs),
    /// Run the course's socket experiments against the live kernel: `socklab lab --list`,
    /// `socklab lab backlog`, `socklab lab all [--json]`.
    Lab(crate::lab::LabArgs),
    /// Drive a server with load, or compare every server design side by side.
    ///
    /// Example: `socklab bench --compare --quick`, `socklab bench 127.0.0.1:7000 -c 64 -d 10s`
    Bench(crate::bench::BenchArgs),
    /// The software bus: an MQTT 3.1.1/5.0 broker, its clients and load generator.
    ///
    /// Example: `socklab bus serve --listen 127.0.0.1:0`, `socklab bus sub 'sensors/#'`
    Bus(crate::bus::BusArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "socklab=info",
        1 => "socklab=debug",
        _ => "socklab=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Whether an error is the user's to fix (exit 2) rather than a failure (exit 1).
fn is_user_error(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.is::<NetError>() || e.is::<UsageError>())
}

/// Parse the command line, run, and map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(match &cli.command {
        Command::Bus(args) => crate::bus::log_verbosity(args, cli.verbose),
        _ => cli.verbose,
    });
    let result = match &cli.command {
        Command::Serve(args) => crate::server::run(args),
        Command::Client(args) => crate::client::run(args),
        Command::Bench(args) => crate::bench::run(args),
        Command::Bus(args) => crate::bus::run(args, cli.verbose),
        // The lab has its own exit codes: 0 as the course says, 1 the kernel differed,
        // 2 the experiment could not run.
        Command::Lab(args) => return ExitCode::from(crate::lab::run(args, cli.verbose)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socklab: error: {e:#}");
            if is_user_error(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
