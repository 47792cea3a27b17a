//! Failed logins, limited per source so that guessing passwords is slow, in bounded memory.
//!
//! Each source (an IPv4 address, an IPv6 /64, or a Unix-socket peer's uid) has a bucket of
//! `burst` attempts that refills one attempt per `interval` (a token bucket kept as one
//! instant, the time at which the bucket is full again -- the "generic cell rate
//! algorithm"). A password check takes an attempt right *before* it runs (on a verifier
//! thread: checks run a few at a time, so a thousand guesses sent at once cannot all be
//! checked before the first failures count); a check that succeeds gives its attempt back,
//! so many clients of one host logging in at once with the right passwords are not slowed.
//! A source with no attempt left is refused without its password being looked at (MQTT 5.0
//! reason 0x9F, connection rate exceeded; 3.1.1 return code 3, server unavailable) -- both
//! when its CONNECT arrives ([`LoginLimiter::allows`]) and when its turn to be checked
//! comes.
//!
//! Memory: at most `capacity` sources are tracked. A full bucket carries no information, so
//! such entries are dropped whenever room is needed (at most once per `interval`, so that a
//! flood of new sources does not cost a scan each); if the table is still full, new sources
//! share one extra bucket -- they are limited together rather than not at all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Where a login comes from, as far as limiting goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IP address (IPv6 cut to its /64: one host usually has the whole prefix).
    Ip(IpAddr),
    /// A Unix-socket peer, by uid.
    Uid(u32),
    /// Anything else (a Unix-socket peer whose credentials are unknown).
    Local,
}

impl Source {
    /// The source of a connection from `peer` (as the server prints it: `ADDR:PORT` or a
    /// path) with the Unix peer's uid, if known.
    pub fn of(peer: &str, uid: Option<u32>) -> Source {
        if let Some(u) = uid {
            return Source::Uid(u);
        }
        match peer.parse::<SocketAddr>() {
            Ok(a) => Source::ip(a.ip()),
            Err(_) => Source::Local,
        }
    }

    fn ip(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::Ip(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::Ip(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Source::Ip(IpAddr::V6(std::net::Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

/// How failed logins are limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    /// Attempts a source may make at once before it is slowed.
    pub burst: u32,
    /// One more attempt per this interval after that.
    pub interval: Duration,
    /// Sources tracked at most.
    pub capacity: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            burst: 10,
            interval: Duration::from_secs(1),
            capacity: 10_000,
        }
    }
}

/// The limiter.
#[derive(Debug)]
pub struct LoginLimiter {
    cfg: LimitConfig,
    /// Per source: when its bucket is full again.
    full_at: HashMap<Source, Instant>,
    /// The bucket shared by sources that found the table full.
    overflow: Option<Instant>,
    last_prune: Option<Instant>,
    refused: u64,
}

impl LoginLimiter {
    /// A limiter with no history.
    pub fn new(cfg: LimitConfig) -> LoginLimiter {
        LoginLimiter {
            cfg: LimitConfig {
                burst: cfg.burst.max(1),
                ..cfg
            },
            full_at: HashMap::new(),
            overflow: None,
            last_prune: None,
            refused: 0,
        }
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.full_at.len()
    }

    /// Attempts refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    fn window(&self) -> Duration {
        self.cfg.interval.saturating_mul(self.cfg.burst)
    }

    /// Whether `source` has an attempt left (nothing is taken).
    pub fn allows(&self, source: Source, now: Instant) -> bool {
        let full_at = match self.full_at.get(&source) {
            Some(f) => *f,
            None if self.full_at.len() < self.cfg.capacity => return true,
            None => self.overflow.unwrap_or(now),
        };
        full_at.max(now) + self.cfg.interval <= now + self.window()
    }

    /// Take one attempt from `source`'s bucket: `true` if it had one (the password may be
    /// checked), `false` if the source must wait.
    pub fn begin(&mut self, source: Source, now: Instant) -> bool {
        let window = self.window();
        let interval = self.cfg.interval;
        let take = |full_at: &mut Instant| {
            let start = (*full_at).max(now);
            // Empty when full again only after the whole window from now.
            if start + interval > now + window {
                false
            } else {
                *full_at = start + interval;
                true
            }
        };
        if let Some(f) = self.full_at.get_mut(&source) {
            let ok = take(f);
            self.refused += u64::from(!ok);
            return ok;
        }
        if self.full_at.len() >= self.cfg.capacity {
            self.prune(now);
        }
        let ok = if self.full_at.len() < self.cfg.capacity {
            let mut f = now;
            let ok = take(&mut f);
            self.full_at.insert(source, f);
            ok
        } else {
            let mut f = self.overflow.unwrap_or(now);
            let ok = take(&mut f);
            self.overflow = Some(f);
            ok
        };
        self.refused += u64::from(!ok);
        ok
    }

    /// The check that [`begin`](Self::begin) allowed succeeded: give the attempt back.
    pub fn succeeded(&mut self, source: Source) {
        let interval = self.cfg.interval;
        let f = match self.full_at.get_mut(&source) {
            Some(f) => f,
            None => match &mut self.overflow {
                Some(f) => f,
                None => return,
            },
        };
        *f = f.checked_sub(interval).unwrap_or(*f);
    }

    /// Drop the entries whose bucket is full (they say nothing), at most once per interval.
    fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|t| now.duration_since(t) < self.cfg.interval)
        {
            return;
        }
        self.last_prune = Some(now);
        self.full_at.retain(|_, f| *f > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(burst: u32, capacity: usize) -> LimitConfig {
        LimitConfig {
            burst,
            interval: Duration::from_secs(1),
            capacity,
        }
    }

    const A: Source = Source::Uid(1);
    const B: Source = Source::Uid(2);

    #[test]
    fn burst_then_one_per_interval() {
        let mut l = LoginLimiter::new(cfg(3, 10));
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.begin(A, t0)));
        assert!(!l.begin(A, t0));
        assert!(l.begin(B, t0), "another source is not slowed");
        assert!(!l.begin(A, t0 + Duration::from_millis(999)));
        assert!(l.begin(A, t0 + Duration::from_secs(1)));
        assert!(!l.begin(A, t0 + Duration::from_secs(1)));
        // Accepted per second over a long guessing run: one.
        let mut accepted = 0;
        for ms in (0..10_000).step_by(10) {
            accepted += l.begin(A, t0 + Duration::from_secs(2) + Duration::from_millis(ms)) as u32;
        }
        assert!((10..=11).contains(&accepted), "{accepted} in 10 s");
        // Idle long enough, the whole burst is back.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| l.begin(A, later)));
        assert!(!l.begin(A, later));
        assert_eq!(l.refused(), 4 + 990);
    }

    #[test]
    fn allows_takes_nothing() {
        let mut l = LoginLimiter::new(cfg(2, 10));
        let t0 = Instant::now();
        assert!(l.allows(A, t0) && l.allows(A, t0) && l.allows(A, t0));
        assert!(l.begin(A, t0) && l.begin(A, t0));
        assert!(!l.allows(A, t0));
        assert!(l.allows(A, t0 + Duration::from_secs(1)));
        assert_eq!(l.refused(), 0);
    }

    #[test]
    fn success_gives_the_attempt_back() {
        let mut l = LoginLimiter::new(cfg(2, 10));
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(l.begin(A, t0));
            l.succeeded(A);
        }
        assert!(l.begin(A, t0) && l.begin(A, t0));
        assert!(!l.begin(A, t0));
    }

    #[test]
    fn memory_is_bounded_and_overflow_is_shared() {
        let mut l = LoginLimiter::new(cfg(2, 100));
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            l.begin(Source::Uid(i), t0);
            assert!(l.tracked() <= 100);
        }
        // Everyone past the first 100 shares one bucket of 2.
        assert_eq!(l.refused(), 100_000 - 100 - 2);
        // Once the tracked buckets are full again, room is made for new sources.
        let later = t0 + Duration::from_secs(10);
        assert!(l.begin(Source::Uid(1_000_000), later));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn sources_by_address_uid_and_v6_prefix() {
        assert_eq!(
            Source::of("127.0.0.1:5000", None),
            Source::of("127.0.0.1:6000", None)
        );
        assert_eq!(
            Source::of("[2001:db8:1:2:a::1]:1", None),
            Source::of("[2001:db8:1:2:b::2]:2", None)
        );
        assert_ne!(
            Source::of("[2001:db8:1:2::1]:1", None),
            Source::of("[2001:db8:1:3::1]:1", None)
        );
        assert_eq!(
            Source::of("[::ffff:10.0.0.1]:1", None),
            Source::of("10.0.0.1:2", None)
        );
        assert_eq!(Source::of("/run/bus.sock", Some(1000)), Source::Uid(1000));
        assert_eq!(Source::of("/run/bus.sock", None), Source::Local);
    }
}
