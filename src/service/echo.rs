//! Echo (RFC 862): whatever arrives is sent back, unchanged and in order.

use crate::output::Outbox;
use crate::service::ProtocolError;

/// Echo has no state: each read is queued for sending as it is.
#[derive(Debug, Default)]
pub struct Echo;

impl Echo {
    /// Queue `input` to be sent back.
    pub fn receive(&mut self, input: &[u8], out: &mut Outbox) -> Result<(), ProtocolError> {
        out.push_bytes(input);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::service::{assert_split_invariant, ServiceConfig, ServiceKind};

    #[test]
    fn echoes_every_split() {
        let cfg = ServiceConfig::new(ServiceKind::Echo);
        let input = b"hello\r\nworld\0\xff";
        assert_eq!(assert_split_invariant(&cfg, input), input);
    }

    #[test]
    fn datagram_is_echoed() {
        let cfg = ServiceConfig::new(ServiceKind::Echo);
        let mut reply = Vec::new();
        assert!(cfg.datagram(b"ping", &mut reply));
        assert_eq!(reply, b"ping");
    }
}
