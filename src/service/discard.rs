//! Discard (RFC 863): whatever arrives is read and dropped; nothing is ever sent.

/// Discard has no state.
#[derive(Debug, Default)]
pub struct Discard;

#[cfg(test)]
mod tests {
    use crate::service::{assert_split_invariant, ServiceConfig, ServiceKind};

    #[test]
    fn answers_nothing() {
        let cfg = ServiceConfig::new(ServiceKind::Discard);
        assert!(assert_split_invariant(&cfg, b"anything at all").is_empty());
        let mut reply = vec![1];
        assert!(!cfg.datagram(b"x", &mut reply));
    }
}
