//! `socklab ipc producer-consumer`: the bounded buffer of seeds 003 and 004, built the ways
//! the course shows, with P producers and C consumers (threads):
//!
//! - [`condvar`]: a mutex and two condition variables, the `while` re-check, and broadcast
//!   wake-ups as on the slide; it counts how often a woken consumer found the buffer empty
//!   (another consumer "sneaked in" first: why the loop must be a `while`).
//! - [`semaphore`]: three POSIX semaphores, `emptySlots`, `fullSlots` and `mutex`.
//! - [`channel`]: message passing, "no semaphores needed" (`crossbeam_channel::bounded`, a
//!   channel with many receivers).
//! - [`pipe`]: a pipe as the buffer; each item is one 16-byte `write`, atomic below `PIPE_BUF`.
//! - [`mq`]: a POSIX message queue holding K messages.
//!
//! Every item names its producer and its number. Each consumer checks that a producer's items
//! reach it in increasing order, and marks each item in a table; at the end every item must be
//! marked exactly once. After the producers finish, C "stop" items end the consumers.

pub mod channel;
pub mod condvar;
pub mod mq;
pub mod pipe;
pub mod semaphore;

use super::measure::Usage;
use crate::client::UsageError;
use anyhow::{bail, Context as _};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

/// Arguments of `socklab ipc producer-consumer`.
#[derive(Debug, Clone, clap::Args)]
pub struct PcArgs {
    /// How the buffer is built.
    #[arg(long = "impl", value_enum)]
    pub implementation: Impl,
    /// Producer threads.
    #[arg(short = 'P', long, default_value_t = 4)]
    pub producers: usize,
    /// Consumer threads.
    #[arg(short = 'C', long, default_value_t = 4)]
    pub consumers: usize,
    /// Items the buffer holds (a pipe holds at least a page: 256 items).
    #[arg(long, default_value_t = 8)]
    pub capacity: usize,
    /// Items in all, shared among the producers.
    #[arg(short = 'n', long, default_value_t = 200_000)]
    pub items: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Impl {
    /// Mutex + condition variables.
    Condvar,
    /// Three semaphores.
    Semaphore,
    /// A bounded channel.
    Channel,
    /// A pipe.
    Pipe,
    /// A POSIX message queue.
    Mq,
}

/// One item: producer and sequence number; [`Item::STOP`] ends a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Which producer made it.
    pub producer: u32,
    /// Its number among that producer's items.
    pub seq: u64,
}

impl Item {
    /// The item that tells a consumer to stop.
    pub const STOP: Item = Item {
        producer: u32::MAX,
        seq: u64::MAX,
    };

    /// As 16 bytes: producer, its complement (a check), sequence number.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.producer.to_le_bytes());
        b[4..8].copy_from_slice(&(!self.producer).to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// From 16 bytes.
    ///
    /// # Errors
    /// A wrong length or a check that does not match.
    pub fn from_bytes(b: &[u8]) -> anyhow::Result<Item> {
        if b.len() != 16 {
            bail!("an item of {} bytes (16 expected)", b.len());
        }
        let producer = u32::from_le_bytes(b[0..4].try_into()?);
        let check = u32::from_le_bytes(b[4..8].try_into()?);
        if check != !producer {
            bail!("a damaged item (its producer check does not match)");
        }
        Ok(Item {
            producer,
            seq: u64::from_le_bytes(b[8..16].try_into()?),
        })
    }
}

/// A bounded buffer shared by the producers and consumers.
pub trait Buffer: Sync {
    /// Put one item, waiting while the buffer is full.
    ///
    /// # Errors
    /// The system call's error.
    fn put(&self, item: Item) -> anyhow::Result<()>;
    /// Take one item, waiting while the buffer is empty.
    ///
    /// # Errors
    /// The system call's error, or a damaged item.
    fn take(&self) -> anyhow::Result<Item>;
    /// The capacity it really has, in items.
    fn capacity(&self) -> usize;
    /// For the condvar buffer: (waits, wake-ups that found the buffer empty).
    fn wakeups(&self) -> Option<(u64, u64)> {
        None
    }
}

/// The result, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct PcReport {
    /// The implementation.
    pub implementation: Impl,
    /// Producer threads.
    pub producers: usize,
    /// Consumer threads.
    pub consumers: usize,
    /// The buffer's capacity in items (asked for, and what it really holds).
    pub capacity: usize,
    /// What the buffer really holds.
    pub real_capacity: usize,
    /// Items produced and consumed.
    pub items: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Items per second.
    pub items_per_s: f64,
    /// Every item consumed exactly once (checked).
    pub exactly_once: bool,
    /// Every consumer saw each producer's items in increasing order (checked).
    pub in_order: bool,
    /// Voluntary context switches of the whole process.
    pub voluntary_switches: u64,
    /// Involuntary context switches of the whole process.
    pub involuntary_switches: u64,
    /// Condvar only: times a consumer or producer waited.
    pub waits: Option<u64>,
    /// Condvar only: times a consumer woke up and found the buffer already empty.
    pub woken_empty: Option<u64>,
}

fn process_usage() -> Usage {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| Usage {
            user_us: 0,
            sys_us: 0,
            voluntary: u.voluntary_context_switches() as u64,
            involuntary: u.involuntary_context_switches() as u64,
        })
        .unwrap_or_default()
}

/// Build the buffer for `args`.
///
/// # Errors
/// A limit or usage error, or the setup's system call error.
pub fn buffer(args: &PcArgs) -> anyhow::Result<Box<dyn Buffer>> {
    Ok(match args.implementation {
        Impl::Condvar => Box::new(condvar::CondvarBuffer::new(args.capacity)),
        Impl::Semaphore => Box::new(semaphore::SemBuffer::new(args.capacity)?),
        Impl::Channel => Box::new(channel::ChannelBuffer::new(args.capacity)),
        Impl::Pipe => Box::new(pipe::PipeBuffer::new(args.capacity)?),
        Impl::Mq => Box::new(mq::MqBuffer::new(args.capacity)?),
    })
}

/// Run the producers and consumers over `buf` and check every item.
///
/// # Errors
/// A lost, repeated or out-of-order item, or a buffer error.
pub fn solve(args: &PcArgs, buf: &dyn Buffer) -> anyhow::Result<PcReport> {
    let (p, c, n) = (args.producers, args.consumers, args.items);
    // Producer k makes items [start[k], start[k+1]) of the table.
    let start: Vec<u64> = (0..=p as u64)
        .map(|k| k * (n / p as u64) + k.min(n % p as u64))
        .collect();
    let seen: Vec<AtomicU8> = (0..n).map(|_| AtomicU8::new(0)).collect();
    let out_of_order = AtomicU64::new(0);
    let usage0 = process_usage();
    let t0 = Instant::now();
    let result: anyhow::Result<()> = std::thread::scope(|s| {
        let consumers: Vec<_> = (0..c)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    let mut last = vec![None::<u64>; p];
                    loop {
                        let item = buf.take()?;
                        if item == Item::STOP {
                            return Ok(());
                        }
                        let k = item.producer as usize;
                        if k >= p || item.seq >= start[k + 1] - start[k] {
                            bail!("an item that was never produced: {item:?}");
                        }
                        if last[k].is_some_and(|l| l >= item.seq) {
                            out_of_order.fetch_add(1, Ordering::Relaxed);
                        }
                        last[k] = Some(item.seq);
                        seen[(start[k] + item.seq) as usize].fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let producers: Vec<_> = (0..p)
            .map(|k| {
                let count = start[k + 1] - start[k];
                s.spawn(move || -> anyhow::Result<()> {
                    for seq in 0..count {
                        buf.put(Item {
                            producer: k as u32,
                            seq,
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut first_err = None;
        for h in producers {
            if let Err(e) = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a producer panicked")))
            {
                first_err.get_or_insert(e);
            }
        }
        for _ in 0..c {
            buf.put(Item::STOP)?;
        }
        for h in consumers {
            if let Err(e) = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a consumer panicked")))
            {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    });
    result?;
    let secs = t0.elapsed().as_secs_f64();
    let usage = process_usage().since(usage0);
    let missing = seen
        .iter()
        .filter(|x| x.load(Ordering::Relaxed) == 0)
        .count();
    let repeated = seen
        .iter()
        .filter(|x| x.load(Ordering::Relaxed) > 1)
        .count();
    let disorder = out_of_order.load(Ordering::Relaxed);
    if missing > 0 || repeated > 0 || disorder > 0 {
        bail!(
            "{:?}: {missing} items never consumed, {repeated} consumed more than once, {disorder} out of their producer's order",
            args.implementation
        );
    }
    let (waits, woken_empty) = buf.wakeups().unzip();
    Ok(PcReport {
        implementation: args.implementation,
        producers: p,
        consumers: c,
        capacity: args.capacity,
        real_capacity: buf.capacity(),
        items: n,
        seconds: secs,
        items_per_s: n as f64 / secs.max(1e-9),
        exactly_once: true,
        in_order: true,
        voluntary_switches: usage.voluntary,
        involuntary_switches: usage.involuntary,
        waits,
        woken_empty,
    })
}

/// Run `socklab ipc producer-consumer`.
///
/// # Errors
/// Usage errors, or a failed check (an item lost, repeated or out of order).
pub fn run(args: &PcArgs) -> anyhow::Result<()> {
    if args.producers == 0 || args.consumers == 0 || args.capacity == 0 {
        bail!(UsageError(
            "--producers, --consumers and --capacity must be at least 1".into()
        ));
    }
    if args.producers > 1024 || args.consumers > 1024 {
        bail!(UsageError(
            "at most 1024 producers and 1024 consumers".into()
        ));
    }
    if args.items > 1 << 30 {
        bail!(UsageError(
            "at most 2^30 items (the check keeps a byte per item)".into()
        ));
    }
    let buf = buffer(args)?;
    let report = solve(args, buf.as_ref()).context("producer-consumer")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

/// The report as text.
pub fn text(r: &PcReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "producer-consumer, {:?}: {} producers × {} consumers, buffer of {} items{}",
        r.implementation,
        r.producers,
        r.consumers,
        r.real_capacity,
        if r.real_capacity != r.capacity {
            format!(" ({} asked)", r.capacity)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "{} items in {:.3} s: {} items/s; each consumed exactly once, each producer's in order",
        r.items,
        r.seconds,
        super::report::count(r.items_per_s)
    );
    let _ = writeln!(
        s,
        "context switches: {} voluntary, {} involuntary ({:.2} per item)",
        r.voluntary_switches,
        r.involuntary_switches,
        (r.voluntary_switches + r.involuntary_switches) as f64 / r.items.max(1) as f64
    );
    if let (Some(w), Some(e)) = (r.waits, r.woken_empty) {
        let _ = writeln!(
            s,
            "condition waits: {w}; a consumer woke to an empty buffer {e} times — why the wait sits in a `while` loop"
        );
    }
    s
}
