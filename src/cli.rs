//! The command line: `socklab serve|client|bench|lab|completions|man`, and the mapping of
//! outcomes to exit codes: 0 success, 1 failure at run time, 2 a user mistake (bad arguments,
//! bad or busy address, missing file), and the codes a command chooses itself ([`Exit`]:
//! `bench` and `lab`). Every error is one line on stderr, `socklab: error: ...`, its cause
//! said once.

use crate::client::{ClientArgs, UsageError};
use crate::net::NetError;
use crate::server::ServeArgs;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
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
    /// Measure every IPC mechanism of the course, every message verified; or the
    /// producer/consumer problem.
    ///
    /// Example: `socklab ipc pipe`, `socklab ipc --compare --quick`,
    /// `socklab ipc producer-consumer --impl condvar`
    Ipc(crate::ipc::IpcArgs),
    /// The software bus: an MQTT 3.1.1/5.0 broker, its clients and load generator.
    ///
    /// Example: `socklab bus serve --listen 127.0.0.1:0`, `socklab bus sub 'sensors/#'`
    Bus(crate::bus::BusArgs),
    /// Print a shell completion script: `socklab completions bash > /etc/bash_completion.d/socklab`
    /// (zsh: into a directory of `$fpath` as `_socklab`; fish: `~/.config/fish/completions/socklab.fish`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `socklab man > socklab.1 && man -l socklab.1`.
    Man,
}

/// A command's own exit status, with the line to print first (after `socklab: `; empty for
/// none): `bench` exits 3 when some requests failed, 4 when none passed, 130 on SIGINT.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The process exit status.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

/// The command line definition, with every value list matched in any case (`--model Epoll`).
pub fn command() -> clap::Command {
    fn any_case(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            if a.get_possible_values().is_empty() {
                a
            } else {
                a.ignore_case(true)
            }
        })
        .mut_subcommands(any_case)
    }
    any_case(Cli::command())
}

/// A clap error as one line: what is wrong and, where clap has them, the accepted values or
/// a suggestion, without the usage block.
fn clap_one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts: Vec<String> = Vec::new();
    for para in text.split("\n\n") {
        let para = para.trim();
        if para.is_empty() || para.starts_with("Usage:") || para.starts_with("For more information")
        {
            continue;
        }
        let joined: Vec<&str> = para
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        parts.push(joined.join(" "));
    }
    let line = parts.join("; ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    format!("{line} (see --help)")
}

/// An error chain as one line, each cause said once: a message that already ends with the
/// text of its cause (as `NetError` does) is not followed by the cause again.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || out.ends_with(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
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
    let matches = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return clap_exit(&e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return clap_exit(&e),
    };
    init_logging(match &cli.command {
        Command::Bus(args) => crate::bus::log_verbosity(args, cli.verbose),
        _ => cli.verbose,
    });
    let result = match &cli.command {
        Command::Serve(args) => crate::server::run(args),
        Command::Client(args) => crate::client::run(args),
        Command::Bench(args) => crate::bench::run(args),
        Command::Ipc(args) => crate::ipc::run(args),
        Command::Bus(args) => crate::bus::run(args, cli.verbose),
        // The lab has its own exit codes: 0 as the course says, 1 the kernel differed,
        // 2 the experiment could not run.
        Command::Lab(args) => return ExitCode::from(crate::lab::run(args, cli.verbose)),
        Command::Completions { shell } => print_completions(*shell),
        Command::Man => print_man(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(exit) = e.chain().find_map(|c| c.downcast_ref::<Exit>()) {
                if !exit.message.is_empty() {
                    eprintln!("socklab: {}", exit.message);
                }
                return ExitCode::from(exit.code);
            }
            eprintln!("socklab: error: {}", one_line(&e));
            if is_user_error(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Help and version go out as clap prints them (exit 0); a mistake is one line, exit 2.
fn clap_exit(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
        _ => {
            eprintln!("socklab: error: {}", clap_one_line(e));
            ExitCode::from(2)
        }
    }
}

fn print_completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "socklab", &mut out);
    Ok(())
}

fn print_man() -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    clap_mangen::Man::new(command()).render(&mut out)?;
    Ok(())
}
