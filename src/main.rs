//! The `socklab` binary: parse the command line, hand over to the library.
//!
//! Run `socklab --help` for the subcommands.

fn main() -> std::process::ExitCode {
    socklab::cli::main()
}
