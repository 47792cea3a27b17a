//! Daytime (RFC 867): on connect the server sends the date and time as one line of text and
//! closes; over UDP any datagram is answered with that line. The RFC leaves the format open;
//! socklab uses the `ctime(3)` layout the classic inetd daytime sends, with the UTC offset.

use crate::output::Outbox;

/// The local date and time as a daytime line, e.g. `Sun Nov 22 15:30:29 2026 +0000\r\n`.
pub fn local_now() -> String {
    chrono::Local::now()
        .format("%a %b %e %H:%M:%S %Y %z\r\n")
        .to_string()
}

/// A daytime session: its line is queued when the connection opens; input is ignored.
#[derive(Debug)]
pub struct Daytime;

impl Daytime {
    /// Open a session: queue `line` for sending.
    pub fn open(line: String, out: &mut Outbox) -> Daytime {
        out.push_vec(line.into_bytes());
        Daytime
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{ServiceConfig, ServiceKind};

    fn fixed() -> String {
        "Sun Nov 22 15:30:29 2026 +0000\r\n".to_string()
    }

    #[test]
    fn sends_the_line_on_open_and_is_done() {
        let mut cfg = ServiceConfig::new(ServiceKind::Daytime);
        cfg.clock = fixed;
        let mut out = Outbox::new();
        let mut s = cfg.open(&mut out);
        s.receive(b"ignored", &mut out).unwrap();
        assert!(s.done());
        assert_eq!(out.take_bytes(), fixed().as_bytes());
        let mut reply = Vec::new();
        assert!(cfg.datagram(b"", &mut reply));
        assert_eq!(reply, fixed().as_bytes());
    }

    #[test]
    fn local_clock_has_the_ctime_shape() {
        let line = local_now();
        assert!(line.ends_with("\r\n"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 6, "{line:?}");
        assert_eq!(fields[3].len(), 8, "HH:MM:SS in {line:?}");
    }
}
