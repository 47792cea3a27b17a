//! The one timer structure of the event loops: deadlines kept in order, the nearest one
//! becomes the wait timeout (the course's "timeouts kept in a sorted list").
//!
//! Idle timeouts are re-armed lazily: a connection records when it was last active, and only
//! when its queued deadline comes up does the loop check whether it was active since and, if
//! so, queue the new deadline. A busy connection thus costs no timer work per request.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Deadlines ordered by time, each naming what it is for with a key `K`.
#[derive(Debug)]
pub struct Timers<K> {
    set: BTreeSet<(Instant, K)>,
}

impl<K: Ord + Copy> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            set: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Copy> Timers<K> {
    /// No deadlines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue `key` to expire at `at`.
    pub fn insert(&mut self, at: Instant, key: K) {
        self.set.insert((at, key));
    }

    /// Remove the deadline `at` of `key` (if queued).
    pub fn remove(&mut self, at: Instant, key: K) {
        self.set.remove(&(at, key));
    }

    /// How long until the nearest deadline (zero if one has passed), or `None` if none is
    /// queued: the timeout to give `poll`/`epoll_wait`.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.set
            .first()
            .map(|(at, _)| at.saturating_duration_since(now))
    }

    /// Take the earliest deadline that is due at `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        match self.set.first() {
            Some(&(at, _)) if at <= now => self.set.pop_first(),
            _ => None,
        }
    }

    /// Number of queued deadlines.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether no deadline is queued.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_deadline_is_the_timeout_and_pops_in_order() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.insert(t0 + Duration::from_secs(3), 'c');
        t.insert(t0 + Duration::from_secs(1), 'a');
        t.insert(t0 + Duration::from_secs(2), 'b');
        assert_eq!(t.timeout(t0), Some(Duration::from_secs(1)));
        assert_eq!(t.pop_due(t0), None);
        let now = t0 + Duration::from_millis(2500);
        assert_eq!(t.pop_due(now).map(|x| x.1), Some('a'));
        assert_eq!(t.pop_due(now).map(|x| x.1), Some('b'));
        assert_eq!(t.pop_due(now), None);
        assert_eq!(t.timeout(now), Some(Duration::from_millis(500)));
        t.remove(t0 + Duration::from_secs(3), 'c');
        assert!(t.is_empty());
        assert_eq!(t.timeout(now), None);
    }

    #[test]
    fn past_deadline_gives_zero_timeout() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.insert(t0, 1u32);
        assert_eq!(t.timeout(t0 + Duration::from_secs(1)), Some(Duration::ZERO));
        assert_eq!(t.len(), 1);
    }
}
