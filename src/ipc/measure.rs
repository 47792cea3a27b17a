//! The one measuring loop, for any mechanism: round trips (ping-pong) or one-way streaming,
//! on the measuring side; and the peer's loop that verifies, echoes or acknowledges.
//!
//! Nothing is timed that was not checked: a round trip is recorded only after the echo
//! verified, and a stream's time ends only when the peer acknowledged the exact count of
//! verified messages.

use super::channel::End;
use super::message::{self, Outgoing, Received, Verifier, CREDIT, END, SYNC};
use anyhow::{anyhow, bail, Context as _};
use hdrhistogram::Histogram;
use std::io;
use std::time::{Duration, Instant};

/// Round trips or one-way throughput.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ping-pong: the round-trip time of each message, as HDR percentiles.
    Rtt,
    /// One way, as fast as the receiver takes them: MB/s and messages/s.
    Stream,
}

/// When the measured part ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many measured messages.
    Count(u64),
    /// After this long.
    Time(Duration),
}

/// A fault injected on the sending side (test-only: `--fault corrupt@5`), to show the
/// verifier catches it end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What goes wrong.
    pub kind: FaultKind,
    /// At which message (counting the warm-up).
    pub at: u64,
}

/// The faults [`Fault`] can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// One payload (or, at size 0, header) byte flipped after the checksum was written.
    Corrupt,
    /// The message is never sent.
    Drop,
    /// The previous message is sent again in its place.
    Duplicate,
    /// It swaps places with the next one.
    Reorder,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        let (kind, at) = s
            .split_once('@')
            .ok_or_else(|| format!("invalid fault {s:?} (KIND@N, e.g. corrupt@5)"))?;
        let kind = match kind {
            "corrupt" => FaultKind::Corrupt,
            "drop" => FaultKind::Drop,
            "duplicate" => FaultKind::Duplicate,
            "reorder" => FaultKind::Reorder,
            _ => {
                return Err(format!(
                    "unknown fault {kind:?}: corrupt, drop, duplicate, reorder"
                ))
            }
        };
        let at: u64 = at
            .parse()
            .map_err(|_| format!("invalid message number in {s:?}"))?;
        if kind == FaultKind::Duplicate && at == 0 {
            return Err("duplicate@0 has no earlier message to repeat".into());
        }
        Ok(Fault { kind, at })
    }
}

impl Fault {
    /// The sequence number message `i` carries under this fault.
    fn seq(fault: Option<Fault>, i: u64) -> u64 {
        match fault {
            Some(Fault {
                kind: FaultKind::Drop,
                at,
            }) if i >= at => i + 1,
            Some(Fault {
                kind: FaultKind::Duplicate,
                at,
            }) if i == at => i - 1,
            Some(Fault {
                kind: FaultKind::Reorder,
                at,
            }) if i == at => i + 1,
            Some(Fault {
                kind: FaultKind::Reorder,
                at,
            }) if i == at + 1 => i - 1,
            _ => i,
        }
    }

    fn corrupts(fault: Option<Fault>, i: u64) -> bool {
        matches!(fault, Some(Fault { kind: FaultKind::Corrupt, at }) if at == i)
    }
}

/// What both loops need to know.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Round trips or stream.
    pub mode: Mode,
    /// Payload bytes.
    pub size: usize,
    /// Messages before the measured part.
    pub warmup: u64,
    /// When the measured part ends.
    pub stop: Stop,
    /// Credit window (mechanisms that drop), in messages.
    pub window: Option<usize>,
    /// Test-only fault injection.
    pub fault: Option<Fault>,
}

/// CPU time and context switches of one thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// User CPU time, microseconds.
    pub user_us: u64,
    /// System CPU time, microseconds.
    pub sys_us: u64,
    /// Voluntary context switches (the thread slept).
    pub voluntary: u64,
    /// Involuntary context switches (the thread was preempted).
    pub involuntary: u64,
}

impl Usage {
    /// The calling thread's usage so far (`getrusage(RUSAGE_THREAD)`).
    pub fn now() -> Usage {
        use nix::sys::resource::{getrusage, UsageWho};
        match getrusage(UsageWho::RUSAGE_THREAD) {
            Ok(u) => {
                let us = |t: nix::sys::time::TimeVal| {
                    (t.tv_sec() as u64) * 1_000_000 + t.tv_usec() as u64
                };
                Usage {
                    user_us: us(u.user_time()),
                    sys_us: us(u.system_time()),
                    voluntary: u.voluntary_context_switches() as u64,
                    involuntary: u.involuntary_context_switches() as u64,
                }
            }
            Err(_) => Usage::default(),
        }
    }

    /// What was used since `earlier`.
    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            user_us: self.user_us.saturating_sub(earlier.user_us),
            sys_us: self.sys_us.saturating_sub(earlier.sys_us),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }
}

/// What the measuring side saw.
#[derive(Debug)]
pub struct Measured {
    /// Messages in the measured part.
    pub messages: u64,
    /// Its duration.
    pub elapsed: Duration,
    /// Round-trip times in nanoseconds (rtt mode).
    pub rtt_ns: Option<Histogram<u64>>,
    /// The measuring thread's usage during the measured part.
    pub usage: Usage,
    /// Messages verified on this side (echoes in rtt mode; the ack count in stream mode).
    pub verified: u64,
}

/// Called when a send or receive was interrupted by a signal: it returns an error if the
/// other side failed or died, `Ok` to go on.
pub type OnInterrupt<'a> = &'a mut dyn FnMut() -> anyhow::Result<()>;

fn send(end: &mut dyn End, msg: &[u8], on_int: OnInterrupt<'_>) -> anyhow::Result<()> {
    loop {
        match end.send(msg) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => on_int()?,
            Err(e) => return Err(e).context("send"),
        }
    }
}

fn recv(end: &mut dyn End, buf: &mut [u8], on_int: OnInterrupt<'_>) -> anyhow::Result<usize> {
    loop {
        match end.recv(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => on_int()?,
            Err(e) => return Err(e).context("receive"),
        }
    }
}

/// A receive buffer for the run: the largest message plus one byte (so a merged message
/// shows as too long).
pub fn recv_buffer(size: usize) -> Vec<u8> {
    vec![0u8; size + message::HEADER + 1]
}

/// A verification failure, naming the message.
#[derive(Debug, thiserror::Error)]
#[error("{side} verifying message #{index}: {error}")]
pub struct Mismatch {
    /// Which side found it.
    pub side: &'static str,
    /// The message's position.
    pub index: u64,
    /// What is wrong.
    pub error: message::VerifyError,
}

/// The measuring side's loop.
///
/// # Errors
/// A verification failure ([`Mismatch`]), a failed system call, or whatever `on_int`
/// returns (the peer failed or died).
pub fn measure(
    end: &mut dyn End,
    plan: &Plan,
    on_int: OnInterrupt<'_>,
) -> anyhow::Result<Measured> {
    match plan.mode {
        Mode::Rtt => rtt(end, plan, on_int),
        Mode::Stream => stream(end, plan, on_int),
    }
}

fn done(plan: &Plan, measured: u64, start: Instant) -> bool {
    match plan.stop {
        Stop::Count(n) => measured >= n,
        Stop::Time(d) => start.elapsed() >= d,
    }
}

fn stamp(out: &mut Outgoing, plan: &Plan, i: u64) -> Vec<u8> {
    let msg = out.stamp(Fault::seq(plan.fault, i));
    if Fault::corrupts(plan.fault, i) {
        let last = msg.len() - 1;
        msg[last] ^= 0x5a;
    }
    msg.to_vec()
}

fn rtt(end: &mut dyn End, plan: &Plan, on_int: OnInterrupt<'_>) -> anyhow::Result<Measured> {
    let mut out = Outgoing::new(plan.size);
    let mut buf = recv_buffer(plan.size);
    let mut echoes = Verifier::new(plan.size);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
    let faulty = plan.fault.is_some();
    let mut start = Instant::now();
    let mut usage0 = Usage::now();
    let mut i = 0u64;
    loop {
        if i == plan.warmup {
            usage0 = Usage::now();
            start = Instant::now();
        }
        if i >= plan.warmup && done(plan, i - plan.warmup, start) {
            break;
        }
        let t0;
        if faulty {
            let msg = stamp(&mut out, plan, i);
            t0 = Instant::now();
            send(end, &msg, on_int)?;
        } else {
            let msg = out.stamp(i);
            t0 = Instant::now();
            send(end, msg, on_int)?;
        }
        let n = recv(end, &mut buf, on_int)?;
        let t1 = Instant::now();
        match echoes.check(&buf[..n]) {
            Ok(Received::Data(_)) => {}
            Ok(other) => bail!("the peer answered message #{i} with {other:?}"),
            Err(error) => {
                return Err(Mismatch {
                    side: "measurer",
                    index: i,
                    error,
                }
                .into())
            }
        }
        if i >= plan.warmup {
            hist.record((t1 - t0).as_nanos().max(1) as u64)?;
        }
        i += 1;
    }
    let elapsed = start.elapsed();
    let usage = Usage::now().since(usage0);
    send(end, &message::control(END), on_int)?;
    let n = recv(end, &mut buf, on_int)?;
    if message::decode(&buf[..n]).map(|(s, _)| s) != Ok(END) {
        bail!("the peer did not answer the end of the run");
    }
    Ok(Measured {
        messages: i - plan.warmup,
        elapsed,
        rtt_ns: Some(hist),
        usage,
        verified: echoes.count(),
    })
}

/// Sending side of stream mode with credits: messages sent and credits received.
struct Flow {
    window: Option<u64>,
    sent: u64,
    credits: u64,
}

impl Flow {
    /// Before sending the next message: wait for credit if two windows are in flight.
    fn before_send(
        &mut self,
        end: &mut dyn End,
        buf: &mut [u8],
        on_int: OnInterrupt<'_>,
    ) -> anyhow::Result<()> {
        let Some(w) = self.window else { return Ok(()) };
        while self.sent >= (self.credits + 2) * w {
            let n = recv(end, buf, on_int)?;
            match message::decode(&buf[..n]) {
                Ok((CREDIT, 0)) => self.credits += 1,
                other => bail!("expected a credit from the peer, got {other:?}"),
            }
        }
        Ok(())
    }

    /// Receive the answer to a SYNC or END, skipping credits.
    fn answer(
        &mut self,
        end: &mut dyn End,
        buf: &mut [u8],
        on_int: OnInterrupt<'_>,
    ) -> anyhow::Result<u64> {
        loop {
            let n = recv(end, buf, on_int)?;
            match message::decode(&buf[..n]) {
                Ok((CREDIT, 0)) if self.window.is_some() => self.credits += 1,
                Ok((seq, 0)) => return Ok(seq),
                other => bail!("expected an answer from the peer, got {other:?}"),
            }
        }
    }
}

fn stream(end: &mut dyn End, plan: &Plan, on_int: OnInterrupt<'_>) -> anyhow::Result<Measured> {
    let mut out = Outgoing::new(plan.size);
    let mut buf = recv_buffer(plan.size);
    let mut flow = Flow {
        window: plan.window.map(|w| w as u64),
        sent: 0,
        credits: 0,
    };
    let faulty = plan.fault.is_some();
    let mut i = 0u64;
    let mut send_one = |end: &mut dyn End,
                        flow: &mut Flow,
                        buf: &mut [u8],
                        i: u64,
                        on_int: OnInterrupt<'_>|
     -> anyhow::Result<()> {
        flow.before_send(end, buf, on_int)?;
        if faulty {
            let msg = stamp(&mut out, plan, i);
            send(end, &msg, on_int)?;
        } else {
            send(end, out.stamp(i), on_int)?;
        }
        flow.sent += 1;
        Ok(())
    };
    while i < plan.warmup {
        send_one(end, &mut flow, &mut buf, i, on_int)?;
        i += 1;
    }
    send(end, &message::control(SYNC), on_int)?;
    if flow.answer(end, &mut buf, on_int)? != SYNC {
        bail!("the peer did not answer the warm-up's SYNC");
    }
    let usage0 = Usage::now();
    let start = Instant::now();
    let mut measured = 0u64;
    loop {
        // Looking at the clock costs about as much as a message through the ring: every 64.
        if measured.is_multiple_of(64) && done(plan, measured, start) {
            break;
        }
        if let Stop::Count(n) = plan.stop {
            if measured >= n {
                break;
            }
        }
        send_one(end, &mut flow, &mut buf, i, on_int)?;
        i += 1;
        measured += 1;
    }
    send(end, &message::control(END), on_int)?;
    let acked = flow.answer(end, &mut buf, on_int)?;
    let elapsed = start.elapsed();
    let usage = Usage::now().since(usage0);
    if acked != i {
        return Err(anyhow!(
            "the peer verified {acked} messages, {i} were sent: {} lost",
            i.abs_diff(acked)
        ));
    }
    Ok(Measured {
        messages: measured,
        elapsed,
        rtt_ns: None,
        usage,
        verified: acked,
    })
}

/// What the peer reports back.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerResult {
    /// Its thread's usage during the measured part.
    pub usage: Usage,
    /// Messages it verified.
    pub verified: u64,
}

/// The peer's loop: verify every message; echo it (rtt), grant credits (stream with a
/// window), answer SYNC and END. `Ok(None)` if told to stop because the measuring side failed.
///
/// # Errors
/// A verification failure ([`Mismatch`]) or a failed system call.
pub fn peer(end: &mut dyn End, plan: &Plan, on_int: OnInterrupt<'_>) -> anyhow::Result<PeerResult> {
    let mut buf = recv_buffer(plan.size);
    let mut v = Verifier::new(plan.size);
    let mut usage0 = None;
    let window = plan.window.map(|w| w as u64);
    loop {
        if usage0.is_none() && v.count() == plan.warmup {
            usage0 = Some(Usage::now());
        }
        let n = recv(end, &mut buf, on_int)?;
        match v.check(&buf[..n]) {
            Ok(Received::Data(seq)) => match plan.mode {
                Mode::Rtt => send(end, &buf[..n], on_int)?,
                Mode::Stream => {
                    if window.is_some_and(|w| (seq + 1) % w == 0) {
                        send(end, &message::control(CREDIT), on_int)?;
                    }
                }
            },
            Ok(Received::Sync) => {
                usage0 = Some(Usage::now());
                send(end, &message::control(SYNC), on_int)?;
            }
            Ok(Received::End) => {
                let usage = Usage::now().since(usage0.unwrap_or_default());
                let answer = match plan.mode {
                    Mode::Rtt => message::control(END),
                    Mode::Stream => message::control(v.count()),
                };
                send(end, &answer, on_int)?;
                return Ok(PeerResult {
                    usage,
                    verified: v.count(),
                });
            }
            Ok(Received::Credit) => bail!("the measuring side sent a credit"),
            Err(error) => {
                return Err(Mismatch {
                    side: "peer",
                    index: v.count(),
                    error,
                }
                .into())
            }
        }
    }
}
