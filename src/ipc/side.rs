//! The fork/thread plumbing, written once: set up the pair, put the peer in a child process
//! (or a thread), pin both sides, run the two loops, and always clean up — reap the child,
//! remove named resources, restore the CPU mask — whether the run succeeded, failed or was
//! interrupted.
//!
//! The two sides share a small control page (a `MAP_SHARED` mapping). A side that fails
//! writes its error there and signals the other (SIGUSR2, repeated until acknowledged, since
//! a signal sent just before the other side blocks would be missed); blocking calls return
//! `EINTR` (the handlers have no `SA_RESTART`), the side reads the page and stops. A child
//! that dies (SIGCHLD) interrupts the parent the same way.

use super::channel::{Between, Pair, Setup};
use super::measure::{self, Measured, PeerResult, Plan, Usage};
use super::mech::Mechanism;
use super::sys::{self, Region};
use crate::client::UsageError;
use anyhow::{anyhow, bail, Context as _};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How the two sides are placed on CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pin {
    /// Two different CPUs (a wake-up crosses CPUs).
    Cross,
    /// Both on one CPU (a wake-up is a context switch on that CPU).
    Same,
    /// Not pinned: the scheduler decides.
    None,
}

/// The CPUs this process may use.
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Resolve `--pin` (default: cross where there are two CPUs, else same) to the measuring
/// side's and the peer's CPU.
///
/// # Errors
/// A [`UsageError`] for `cross` on a machine (or mask) with a single CPU.
pub fn placement(pin: Option<Pin>) -> anyhow::Result<(Pin, Option<(usize, usize)>)> {
    let cpus = allowed_cpus();
    let pin = pin.unwrap_or(if cpus.len() >= 2 {
        Pin::Cross
    } else {
        Pin::Same
    });
    Ok(match pin {
        Pin::Cross if cpus.len() < 2 => {
            bail!(UsageError(format!(
                "--pin cross needs two CPUs; this process may use {}",
                cpus.len()
            )))
        }
        Pin::Cross => (pin, Some((cpus[0], cpus[1]))),
        Pin::Same => (pin, cpus.first().map(|&c| (c, c))),
        Pin::None => (pin, None),
    })
}

fn pin_to(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// The control page both sides share.
struct Control {
    page: Region,
}

const PEER_FAILED: usize = 0;
const MEASURER_FAILED: usize = 4;
const ACK: usize = 8;
const PEER_USAGE: usize = 64;
const PEER_VERIFIED: usize = 96;
const ERROR_LEN: usize = 1020;
const ERROR: usize = 1024;
const ERROR_MAX: usize = 2048;

impl Control {
    fn new() -> anyhow::Result<Control> {
        Ok(Control {
            page: Region::new(4096)?,
        })
    }

    fn set_error(&self, text: &str) {
        let bytes = &text.as_bytes()[..text.len().min(ERROR_MAX)];
        for (i, b) in bytes.iter().enumerate() {
            self.page.u8_at(ERROR + i).store(*b, Ordering::SeqCst);
        }
        self.page
            .u32_at(ERROR_LEN)
            .store(bytes.len() as u32, Ordering::SeqCst);
    }

    fn error(&self) -> String {
        let n = self.page.u32_at(ERROR_LEN).load(Ordering::SeqCst) as usize;
        let bytes: Vec<u8> = (0..n.min(ERROR_MAX))
            .map(|i| self.page.u8_at(ERROR + i).load(Ordering::SeqCst))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn flag(&self, at: usize) -> bool {
        self.page.u32_at(at).load(Ordering::SeqCst) != 0
    }

    fn raise(&self, at: usize) {
        self.page.u32_at(at).store(1, Ordering::SeqCst);
    }

    fn put_peer(&self, r: &PeerResult) {
        let u = &r.usage;
        for (k, v) in [u.user_us, u.sys_us, u.voluntary, u.involuntary]
            .into_iter()
            .enumerate()
        {
            self.page
                .u64_at(PEER_USAGE + 8 * k)
                .store(v, Ordering::SeqCst);
        }
        self.page
            .u64_at(PEER_VERIFIED)
            .store(r.verified, Ordering::SeqCst);
    }

    fn peer(&self) -> PeerResult {
        let g = |k: usize| self.page.u64_at(PEER_USAGE + 8 * k).load(Ordering::SeqCst);
        PeerResult {
            usage: Usage {
                user_us: g(0),
                sys_us: g(1),
                voluntary: g(2),
                involuntary: g(3),
            },
            verified: self.page.u64_at(PEER_VERIFIED).load(Ordering::SeqCst),
        }
    }

    /// Signal the other side with SIGUSR2 until it acknowledges (or it is gone, or 5 s).
    fn alert_until_acked(&self, send: &dyn Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !self.flag(ACK) && Instant::now() < end {
            if !send() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Everything one measured run produced.
#[derive(Debug)]
pub struct RunResult {
    /// The measuring side's view.
    pub measured: Measured,
    /// The peer's usage and count.
    pub peer: PeerResult,
    /// How the pair was set up.
    pub note: String,
    /// The CPUs used (measuring side, peer), if pinned.
    pub cpus: Option<(usize, usize)>,
    /// The pinning asked for.
    pub pin: Pin,
}

/// Set up `mechanism`, run the plan between processes or threads, clean up.
///
/// # Errors
/// Limit and usage errors from the setup, a verification failure on either side (naming
/// the message), a peer that died, or a failed system call.
pub fn run(
    mechanism: Mechanism,
    setup: &Setup,
    plan: &Plan,
    pin: Option<Pin>,
) -> anyhow::Result<RunResult> {
    let (pin, cpus) = placement(pin)?;
    let mut plan = *plan;
    let pair = mechanism.open(setup)?;
    plan.window = pair.window;
    let original = sched_getaffinity(Pid::from_raw(0)).ok();
    let result = match setup.between {
        Between::Processes => in_processes(pair, &plan, cpus),
        Between::Threads => in_threads(pair, &plan, cpus),
    };
    if let Some(set) = original {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
    let (measured, peer, note) =
        result.with_context(|| format!("{mechanism}, {} B, {:?}", setup.size, plan.mode))?;
    Ok(RunResult {
        measured,
        peer,
        note,
        cpus,
        pin,
    })
}

fn in_processes(
    pair: Pair,
    plan: &Plan,
    cpus: Option<(usize, usize)>,
) -> anyhow::Result<(Measured, PeerResult, String)> {
    let Pair {
        a: mut mine,
        b: theirs,
        mut cleanup,
        note,
        ..
    } = pair;
    let control = Control::new()?;
    let parent = nix::unistd::getpid();
    if let Some((a, _)) = cpus {
        pin_to(a).context("pinning the measuring side")?;
    }
    // The previous run's watchdog thread was joined, but the kernel may still count it for a
    // moment: fork refuses a process with other threads.
    let end = Instant::now() + Duration::from_secs(1);
    while crate::sys::thread_count().unwrap_or(1) > 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_micros(200));
    }
    match crate::sys::fork().context("fork")? {
        crate::sys::Fork::Child => {
            // The child owns nothing named: the parent removes it all.
            std::mem::forget(cleanup);
            drop(mine);
            let code = child(theirs, plan, cpus, &control, parent);
            sys::exit_now(code)
        }
        crate::sys::Fork::Parent(child) => {
            sys::remember_pid(child.as_raw());
            drop(theirs);
            let mut exited: Option<WaitStatus> = None;
            let mut on_int = || -> anyhow::Result<()> {
                if control.flag(PEER_FAILED) {
                    control.raise(ACK);
                    bail!("{}", control.error());
                }
                if exited.is_none() {
                    match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) | Err(_) => {}
                        Ok(st) => exited = Some(st),
                    }
                }
                match exited {
                    // It finished its part (it answers before it exits): go on reading.
                    Some(WaitStatus::Exited(_, 0)) | None => Ok(()),
                    Some(st) => bail!("the peer process ended unexpectedly: {st:?}"),
                }
            };
            // A peer that dies leaves a queue or a ring silent, and its one SIGCHLD may
            // arrive before this side blocks: a watchdog thread waits for the child's end
            // (without reaping it) and interrupts this thread until the measuring is over.
            let finished = std::sync::atomic::AtomicBool::new(false);
            let me = sys::pthread_self();
            let outcome = std::thread::scope(|s| {
                s.spawn(|| {
                    let _ = nix::sys::wait::waitid(
                        nix::sys::wait::Id::Pid(child),
                        WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
                    );
                    while !finished.load(Ordering::SeqCst) {
                        sys::pthread_kill(me, libc::SIGUSR2);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                });
                let outcome = measure::measure(mine.as_mut(), plan, &mut on_int);
                finished.store(true, Ordering::SeqCst);
                if outcome.is_err() {
                    // Wake the watchdog: the child must end now.
                    control.raise(MEASURER_FAILED);
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                }
                outcome
            });
            // The peer raises its flag before it closes its end: an EOF here after a peer
            // failure is reported as the peer's failure.
            let outcome = match outcome {
                Err(e)
                    if control.flag(PEER_FAILED) && !e.to_string().contains(&control.error()) =>
                {
                    control.raise(ACK);
                    Err(anyhow!("{}", control.error()))
                }
                other => other,
            };
            drop(mine);
            if outcome.is_err() {
                control.raise(MEASURER_FAILED);
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            let status = match exited {
                Some(st) => Ok(st),
                None => waitpid(child, None),
            };
            sys::forget_pid(child.as_raw());
            cleanup.release();
            let measured = outcome?;
            match status {
                Ok(WaitStatus::Exited(_, 0)) => {}
                Ok(st) if control.flag(PEER_FAILED) => {
                    bail!("{} ({st:?})", control.error())
                }
                other => bail!("the peer process did not finish cleanly: {other:?}"),
            }
            Ok((measured, control.peer(), note))
        }
    }
}

/// The child's whole life: pin, run the peer loop, report, exit code.
fn child(
    end: Box<dyn super::channel::End>,
    plan: &Plan,
    cpus: Option<(usize, usize)>,
    control: &Control,
    parent: Pid,
) -> i32 {
    if crate::sys::die_with_parent(parent).is_err() {
        return 3;
    }
    // A Ctrl-C reaches the whole process group: the child just dies, the parent cleans up.
    let _ = crate::sys::set_handler(
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::SigHandler::SigDfl,
        nix::sys::signal::SaFlags::empty(),
    );
    if let Some((_, b)) = cpus {
        if pin_to(b).is_err() {
            return 3;
        }
    }
    let alert = || nix::sys::signal::kill(parent, nix::sys::signal::Signal::SIGUSR2).is_ok();
    match peer_side(end, plan, control, &alert) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// The peer's side, in a child process or a thread: run the peer loop; on success leave the
/// usage in the control page; on failure write the error there, close the end (an EOF for
/// the other side where there is one) and `alert` the measuring side until it acknowledges.
/// Told to stop because the measuring side failed, it returns quietly.
fn peer_side(
    mut end: Box<dyn super::channel::End>,
    plan: &Plan,
    control: &Control,
    alert: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let mut on_int = || -> anyhow::Result<()> {
        if control.flag(MEASURER_FAILED) {
            bail!("stopped: the measuring side failed");
        }
        Ok(())
    };
    match measure::peer(end.as_mut(), plan, &mut on_int) {
        Ok(r) => {
            control.put_peer(&r);
            Ok(())
        }
        Err(_) if control.flag(MEASURER_FAILED) => Ok(()),
        Err(e) => {
            control.set_error(&format!("{e:#}"));
            control.raise(PEER_FAILED);
            drop(end);
            control.alert_until_acked(alert);
            Err(e)
        }
    }
}

fn in_threads(
    pair: Pair,
    plan: &Plan,
    cpus: Option<(usize, usize)>,
) -> anyhow::Result<(Measured, PeerResult, String)> {
    let Pair {
        a: mut mine,
        b: theirs,
        mut cleanup,
        note,
        ..
    } = pair;
    let control = Control::new()?;
    if let Some((a, _)) = cpus {
        pin_to(a).context("pinning the measuring side")?;
    }
    let me = sys::pthread_self();
    let peer_thread = std::sync::atomic::AtomicU64::new(0);
    let result: anyhow::Result<Measured> = std::thread::scope(|scope| {
        let control = &control;
        let peer_thread = &peer_thread;
        let handle = scope.spawn(move || -> anyhow::Result<()> {
            peer_thread.store(sys::pthread_self() as u64, Ordering::SeqCst);
            if control.flag(MEASURER_FAILED) {
                return Ok(());
            }
            if let Some((_, b)) = cpus {
                pin_to(b).context("pinning the peer")?;
            }
            let alert = || {
                sys::pthread_kill(me, libc::SIGUSR2);
                true
            };
            peer_side(theirs, plan, control, &alert)
        });
        let mut on_int = || -> anyhow::Result<()> {
            if control.flag(PEER_FAILED) {
                control.raise(ACK);
                bail!("{}", control.error());
            }
            Ok(())
        };
        let outcome = measure::measure(mine.as_mut(), plan, &mut on_int);
        let outcome = match outcome {
            Err(e) if control.flag(PEER_FAILED) && !e.to_string().contains(&control.error()) => {
                control.raise(ACK);
                Err(anyhow!("{}", control.error()))
            }
            other => other,
        };
        drop(mine);
        if outcome.is_err() {
            control.raise(MEASURER_FAILED);
            let end = Instant::now() + Duration::from_secs(5);
            while !handle.is_finished() && Instant::now() < end {
                let t = peer_thread.load(Ordering::SeqCst);
                if t != 0 {
                    sys::pthread_kill(t as libc::pthread_t, libc::SIGUSR2);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let peer = handle
            .join()
            .map_err(|_| anyhow!("the peer thread panicked"))?;
        let measured = outcome?;
        peer?;
        Ok(measured)
    });
    cleanup.release();
    let measured = result?;
    Ok((measured, control.peer(), note))
}
