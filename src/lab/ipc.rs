//! Local IPC channels: a socketpair against a pipe.

use super::{Outcome, Timeline};
use nix::errno::Errno;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{pipe, read, write};
use std::os::fd::OwnedFd;

/// Write `msg` on `from` and read it back on `to`, recording both calls.
fn pass(
    tl: &Timeline,
    actor: &str,
    from: (&OwnedFd, &str),
    to: (&OwnedFd, &str),
    msg: &str,
) -> bool {
    let w = write(from.0, msg.as_bytes());
    tl.bytes(actor, &format!("write({}, \"{msg}\")", from.1), &w);
    let mut buf = [0u8; 16];
    let r = read(to.0, &mut buf);
    tl.call(actor, &format!("read({})", to.1), &r, |&n| {
        format!("= {n} \"{}\"", String::from_utf8_lossy(&buf[..n]))
    });
    matches!(r, Ok(n) if &buf[..n] == msg.as_bytes())
}

/// A socketpair carries data both ways; a pipe only from its write end to its read end.
pub fn socketpair_vs_pipe(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::empty(),
    )?;
    tl.log("P", "socketpair(AF_UNIX, SOCK_STREAM)", "sv[0], sv[1]");
    let forth = pass(tl, "P", (&a, "sv[0]"), (&b, "sv[1]"), "ping");
    let back = pass(tl, "P", (&b, "sv[1]"), (&a, "sv[0]"), "pong");

    let (r, w) = pipe()?;
    tl.log("P", "pipe(fd)", "fd[0] read end, fd[1] write end");
    let one_way = pass(tl, "P", (&w, "fd[1]"), (&r, "fd[0]"), "ping");
    let wrong_write = write(&r, b"pong");
    tl.bytes("P", "write(fd[0], \"pong\")", &wrong_write);
    let mut buf = [0u8; 16];
    let wrong_read = read(&w, &mut buf);
    tl.bytes("P", "read(fd[1])", &wrong_read);

    let ebadf = wrong_write == Err(Errno::EBADF) && wrong_read == Err(Errno::EBADF);
    let ok = forth && back && one_way && ebadf;
    Ok(Outcome::new(
        ok,
        format!(
            "the socketpair carried data {}; the pipe carried fd[1]→fd[0], and using it backwards {}",
            if forth && back { "both ways" } else { "NOT both ways" },
            if ebadf { "failed EBADF" } else { "did NOT fail EBADF" }
        ),
    ))
}
