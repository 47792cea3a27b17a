//! `socklab ipc`: every IPC mechanism of the course, measured side by side and checked to the
//! byte.
//!
//! - `socklab ipc MECHANISM [--size 64] [--mode rtt|stream] [--between processes|threads]
//!   [--pin cross|same|none] [-n N | -d 5s] [--warmup 1000] [--json]`: one mechanism.
//! - `socklab ipc --compare [--sizes 64,4k,64k,1M] [--mechanisms a,b] [--quick]
//!   [--chart socklab-ipc.svg] [--json]`: all of them, one table and a chart.
//! - `socklab ipc producer-consumer --impl condvar|semaphore|channel|pipe|mq [-P 4 -C 4]`: the
//!   bounded buffer, the course's ways.
//!
//! Layout: [`channel`] (the [`channel::End`] trait every mechanism implements, the framing
//! and the cleanup they share), [`mech`] (one file per mechanism), [`shm`] (the shared-memory
//! ring and one file per wake-up), [`message`] (the header and the verifier, sans-IO),
//! [`measure`] (the one loop for rtt and stream, and the peer's), [`side`] (fork/thread
//! plumbing, pinning, failure signalling), [`report`], [`compare`] and [`chart`], [`pc`]
//! (producer/consumer), [`sys`] (the module's `unsafe` calls).

#[deny(unsafe_code)]
pub mod channel;
#[deny(unsafe_code)]
pub mod chart;
#[deny(unsafe_code)]
pub mod compare;
#[deny(unsafe_code)]
pub mod measure;
#[deny(unsafe_code)]
pub mod mech;
#[deny(unsafe_code)]
pub mod message;
#[deny(unsafe_code)]
pub mod pc;
#[deny(unsafe_code)]
pub mod report;
#[deny(unsafe_code)]
pub mod shm;
#[deny(unsafe_code)]
pub mod side;
pub mod sys;

use crate::client::UsageError;
use crate::units::{parse_duration, parse_size};
use channel::{Between, LimitError, Setup};
use measure::{Fault, Mode, Plan, Stop};
use mech::Mechanism;
use side::Pin;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `socklab ipc`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct IpcArgs {
    /// `producer-consumer`: the bounded buffer.
    #[command(subcommand)]
    pub task: Option<IpcTask>,
    /// The mechanism to measure (not with --compare).
    pub mechanism: Option<Mechanism>,
    /// Payload bytes per message (every message adds a 16-byte header).
    #[arg(long, value_parser = parse_size, default_value = "64")]
    pub size: usize,
    /// Round trips (ping-pong) or a one-way stream.
    #[arg(long, value_enum, default_value_t = Mode::Rtt)]
    pub mode: Mode,
    /// Two processes (fork) or two threads.
    #[arg(long, value_enum, default_value_t = Between::Processes)]
    pub between: Between,
    /// CPU placement [default: cross where two CPUs exist, else same].
    #[arg(long, value_enum)]
    pub pin: Option<Pin>,
    /// Measure this many messages (after the warm-up).
    #[arg(short = 'n', long = "count", conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Measure for this long [default: 5s].
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Messages before the measured part.
    #[arg(long, default_value_t = 1000)]
    pub warmup: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Measure every mechanism at every size: one table, JSON, a chart.
    #[arg(long)]
    pub compare: bool,
    /// With --compare: payload sizes, comma-separated [default: 64,4k,64k,1M].
    #[arg(long, value_delimiter = ',', value_parser = parse_size, requires = "compare")]
    pub sizes: Vec<usize>,
    /// With --compare: the mechanisms, comma-separated [default: all for --between].
    #[arg(long, value_delimiter = ',', requires = "compare")]
    pub mechanisms: Vec<Mechanism>,
    /// With --compare: a short run (under a minute).
    #[arg(long, requires = "compare")]
    pub quick: bool,
    /// With --compare: where to write the SVG chart.
    #[arg(long, default_value = "socklab-ipc.svg", requires = "compare")]
    pub chart: PathBuf,
    /// Test only: inject a fault on the sending side (corrupt|drop|duplicate|reorder@N).
    #[arg(long, hide = true)]
    pub fault: Option<Fault>,
}

/// The subcommands of `socklab ipc`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum IpcTask {
    /// The bounded buffer with P producers and C consumers, solved the course's ways.
    ///
    /// Example: `socklab ipc producer-consumer --impl condvar --producers 4 --consumers 4`
    ProducerConsumer(pc::PcArgs),
}

/// Run `socklab ipc`.
///
/// # Errors
/// Usage and limit errors (exit 2), a verification failure naming the message, a failed
/// system call.
pub fn run(args: &IpcArgs) -> anyhow::Result<()> {
    sys::install_handlers()?;
    let result = match &args.task {
        Some(IpcTask::ProducerConsumer(pc_args)) => pc::run(pc_args),
        None if args.compare => {
            if args.mechanism.is_some() {
                return Err(UsageError(
                    "--compare measures every mechanism: give no MECHANISM (use --mechanisms a,b)"
                        .into(),
                )
                .into());
            }
            compare::run(args)
        }
        None => single(args),
    };
    // A size a mechanism cannot carry is the user's to change: exit 2.
    result.map_err(|e| match e.downcast_ref::<LimitError>() {
        Some(l) => UsageError(l.0.clone()).into(),
        None => e,
    })
}

/// The largest payload: each side holds a few buffers of this size.
pub const MAX_SIZE: usize = 256 << 20;

fn single(args: &IpcArgs) -> anyhow::Result<()> {
    let Some(mechanism) = args.mechanism else {
        return Err(UsageError(
            "name a MECHANISM (pipe, fifo, socketpair, ..., see `socklab ipc --help`), or --compare, or producer-consumer".into(),
        )
        .into());
    };
    let setup = Setup {
        size: args.size,
        between: args.between,
    };
    let plan = Plan {
        mode: args.mode,
        size: args.size,
        warmup: args.warmup,
        stop: match (args.count, args.duration) {
            (Some(n), _) => Stop::Count(n),
            (None, Some(d)) => Stop::Time(d),
            (None, None) => Stop::Time(Duration::from_secs(5)),
        },
        window: None,
        fault: args.fault,
    };
    if args.size > MAX_SIZE {
        return Err(UsageError(format!("--size is at most {} MiB", MAX_SIZE >> 20)).into());
    }
    let result = side::run(mechanism, &setup, &plan, args.pin)?;
    let report = report::Report::new(
        mechanism,
        args.between,
        args.mode,
        args.size,
        args.warmup,
        &result,
        &report::Machine::here(),
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
