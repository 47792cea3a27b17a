//! The command line: `socklab serve|client|lab|bench`.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// socklab: socket and IPC programming made real and measurable.
#[derive(Debug, Parser)]
#[command(name = "socklab", version, about)]
pub struct Cli {
    /// Show connection-level detail in the log (stderr).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the course's socket experiments against the live kernel: `socklab lab --list`,
    /// `socklab lab backlog`, `socklab lab all [--json]`.
    Lab(crate::lab::LabArgs),
}

/// Parse the command line, run, and map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    match cli.command {
        Command::Lab(args) => ExitCode::from(crate::lab::run(&args, verbose)),
    }
}
