//! The name registry, without I/O: well-known names, their primary owners and their queues
//! of waiting owners, with D-Bus's ownership rules (the `RequestName` / `ReleaseName`
//! tables of the D-Bus specification).
//!
//! Each name has a queue whose head is the *primary owner*; the others wait, in order.
//! A request carries three flags:
//!
//! - `ALLOW_REPLACEMENT` (1): whoever later asks with `REPLACE_EXISTING` may take the name.
//! - `REPLACE_EXISTING` (2): take the name if its owner allowed replacement.
//! - `DO_NOT_QUEUE` (4): fail rather than wait in the queue; and, when replaced, leave
//!   rather than move back into the queue.
//!
//! | situation | what happens | reply |
//! | --- | --- | --- |
//! | nobody owns the name | the caller owns it | `PrimaryOwner` |
//! | the caller owns it already | its flags are updated | `AlreadyOwner` |
//! | owner allowed replacement, caller asks to replace | the caller owns it; the old owner goes to the head of the queue, or leaves if it had `DO_NOT_QUEUE` | `PrimaryOwner` |
//! | otherwise, with `DO_NOT_QUEUE` | the caller is not queued (and leaves the queue if it was in it) | `Exists` |
//! | otherwise | the caller joins the end of the queue (or, already in it, keeps its place with new flags) | `InQueue` |
//!
//! Every change is reported as [`NameEvent`]s in the order the bus sends them: `Lost` to the
//! old owner, then `OwnerChanged` to everyone who listens, then `Acquired` to the new owner.
//! Who may own a name (the [`super::broker::Authorizer`]) is asked by the caller of
//! [`Registry::request`], before the registry is changed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Who owns names: a connection, as the broker numbers them.
pub type Owner = u64;

/// `RequestName` flag: others may replace this owner.
pub const ALLOW_REPLACEMENT: u32 = 1;
/// `RequestName` flag: replace the owner if it allowed it.
pub const REPLACE_EXISTING: u32 = 2;
/// `RequestName` flag: do not wait in the queue.
pub const DO_NOT_QUEUE: u32 = 4;

/// The answer to `RequestName` (numbered as on D-Bus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestReply {
    /// The caller now owns the name.
    PrimaryOwner = 1,
    /// The caller waits in the name's queue.
    InQueue = 2,
    /// Someone else owns it and the caller asked not to be queued.
    Exists = 3,
    /// The caller owned it already.
    AlreadyOwner = 4,
}

/// The answer to `ReleaseName` (numbered as on D-Bus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReply {
    /// The caller owned the name or waited for it, and no longer does.
    Released = 1,
    /// Nobody owns the name.
    NonExistent = 2,
    /// The name is owned, but neither by the caller nor with the caller in its queue.
    NotOwner = 3,
}

/// A change of ownership, to be told to the parties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameEvent {
    /// `NameLost` to a connection that owned `name` and no longer does.
    Lost {
        /// The former owner.
        owner: Owner,
        /// The name.
        name: Arc<str>,
    },
    /// `NameOwnerChanged(name, old, new)` to everyone who listens.
    OwnerChanged {
        /// The name.
        name: Arc<str>,
        /// The former owner, if any.
        old: Option<Owner>,
        /// The new owner, if any.
        new: Option<Owner>,
    },
    /// `NameAcquired` to the new owner.
    Acquired {
        /// The new owner.
        owner: Owner,
        /// The name.
        name: Arc<str>,
    },
}

/// Why a name may not be requested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a valid well-known bus name.
    #[error("{0:?} is not a valid bus name (two or more dot-separated elements of [A-Za-z0-9_-], not starting with a digit, at most 255 bytes)")]
    Invalid(String),
    /// Unique names (`:1.5`) and the bus's own name belong to the bus.
    #[error("{0:?} belongs to the bus and cannot be owned")]
    Reserved(String),
    /// The connection owns or waits for too many names.
    #[error("a connection may own or wait for at most {0} names")]
    TooMany(usize),
}

/// Whether `name` is a valid well-known bus name (D-Bus's rules: at most 255 bytes, two or
/// more elements separated by `.`, each non-empty, of `[A-Za-z0-9_-]`, not starting with a
/// digit).
pub fn valid_well_known(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 || name.starts_with(':') {
        return false;
    }
    let mut elements = 0;
    for e in name.split('.') {
        elements += 1;
        let Some(first) = e.bytes().next() else {
            return false;
        };
        if first.is_ascii_digit() {
            return false;
        }
        if !e
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return false;
        }
    }
    elements >= 2
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    owner: Owner,
    flags: u32,
}

/// Every well-known name with its primary owner and queue.
#[derive(Debug, Default)]
pub struct Registry {
    names: HashMap<Arc<str>, VecDeque<Entry>>,
    by_owner: HashMap<Owner, HashSet<Arc<str>>>,
    max_per_owner: usize,
}

impl Registry {
    /// An empty registry; a connection may own or wait for `max_per_owner` names.
    pub fn new(max_per_owner: usize) -> Registry {
        Registry {
            max_per_owner,
            ..Default::default()
        }
    }

    /// `RequestName(name, flags)` by `caller`; the events of the change go to `events`.
    ///
    /// # Errors
    /// An invalid or reserved name, or too many names for this caller (nothing changes).
    pub fn request(
        &mut self,
        name: &str,
        caller: Owner,
        flags: u32,
        events: &mut Vec<NameEvent>,
    ) -> Result<RequestReply, NameError> {
        if name == super::dbus::DRIVER || name.starts_with(':') {
            return Err(NameError::Reserved(name.into()));
        }
        if !valid_well_known(name) {
            return Err(NameError::Invalid(name.into()));
        }
        let held = self.by_owner.get(&caller);
        let already = held.is_some_and(|h| h.contains(name));
        if !already && held.map_or(0, |h| h.len()) >= self.max_per_owner {
            return Err(NameError::TooMany(self.max_per_owner));
        }
        let flags = flags & (ALLOW_REPLACEMENT | REPLACE_EXISTING | DO_NOT_QUEUE);
        let Some((key, queue)) = self.names.get_key_value(name) else {
            let key: Arc<str> = name.into();
            self.names.insert(
                key.clone(),
                VecDeque::from([Entry {
                    owner: caller,
                    flags,
                }]),
            );
            self.by_owner.entry(caller).or_default().insert(key.clone());
            events.push(NameEvent::OwnerChanged {
                name: key.clone(),
                old: None,
                new: Some(caller),
            });
            events.push(NameEvent::Acquired {
                owner: caller,
                name: key,
            });
            return Ok(RequestReply::PrimaryOwner);
        };
        let key = key.clone();
        let primary = queue[0];
        if primary.owner == caller {
            self.names.get_mut(name).expect("present")[0].flags = flags;
            return Ok(RequestReply::AlreadyOwner);
        }
        let queue = self.names.get_mut(name).expect("present");
        let queued_at = queue.iter().position(|e| e.owner == caller);
        if flags & REPLACE_EXISTING != 0 && primary.flags & ALLOW_REPLACEMENT != 0 {
            if let Some(i) = queued_at {
                queue.remove(i);
            }
            queue.pop_front();
            if primary.flags & DO_NOT_QUEUE == 0 {
                queue.push_front(primary);
            } else {
                Self::forget(&mut self.by_owner, primary.owner, &key);
            }
            queue.push_front(Entry {
                owner: caller,
                flags,
            });
            self.by_owner.entry(caller).or_default().insert(key.clone());
            events.push(NameEvent::Lost {
                owner: primary.owner,
                name: key.clone(),
            });
            events.push(NameEvent::OwnerChanged {
                name: key.clone(),
                old: Some(primary.owner),
                new: Some(caller),
            });
            events.push(NameEvent::Acquired {
                owner: caller,
                name: key,
            });
            return Ok(RequestReply::PrimaryOwner);
        }
        if flags & DO_NOT_QUEUE != 0 {
            if let Some(i) = queued_at {
                queue.remove(i);
                Self::forget(&mut self.by_owner, caller, &key);
            }
            return Ok(RequestReply::Exists);
        }
        match queued_at {
            Some(i) => queue[i].flags = flags,
            None => {
                queue.push_back(Entry {
                    owner: caller,
                    flags,
                });
                self.by_owner.entry(caller).or_default().insert(key);
            }
        }
        Ok(RequestReply::InQueue)
    }

    fn forget(by_owner: &mut HashMap<Owner, HashSet<Arc<str>>>, owner: Owner, name: &str) {
        if let Some(h) = by_owner.get_mut(&owner) {
            h.remove(name);
            if h.is_empty() {
                by_owner.remove(&owner);
            }
        }
    }

    /// Take `owner` out of `name`'s queue; if it was the primary owner, the next in the queue
    /// takes over (`lost` says whether to tell the old owner: not when it has gone).
    fn leave(&mut self, name: &str, owner: Owner, lost: bool, events: &mut Vec<NameEvent>) {
        let Some((key, queue)) = self.names.get_key_value(name) else {
            return;
        };
        let key = key.clone();
        let Some(i) = queue.iter().position(|e| e.owner == owner) else {
            return;
        };
        let queue = self.names.get_mut(name).expect("present");
        queue.remove(i);
        Self::forget(&mut self.by_owner, owner, &key);
        if i != 0 {
            return;
        }
        let next = queue.front().map(|e| e.owner);
        if next.is_none() {
            self.names.remove(name);
        }
        if lost {
            events.push(NameEvent::Lost {
                owner,
                name: key.clone(),
            });
        }
        events.push(NameEvent::OwnerChanged {
            name: key.clone(),
            old: Some(owner),
            new: next,
        });
        if let Some(n) = next {
            events.push(NameEvent::Acquired {
                owner: n,
                name: key,
            });
        }
    }

    /// `ReleaseName(name)` by `caller`.
    pub fn release(
        &mut self,
        name: &str,
        caller: Owner,
        events: &mut Vec<NameEvent>,
    ) -> ReleaseReply {
        let Some(queue) = self.names.get(name) else {
            return ReleaseReply::NonExistent;
        };
        if !queue.iter().any(|e| e.owner == caller) {
            return ReleaseReply::NotOwner;
        }
        self.leave(name, caller, true, events);
        ReleaseReply::Released
    }

    /// `owner` disconnected: it leaves every queue; names it owned pass to the next waiting.
    pub fn remove_owner(&mut self, owner: Owner, events: &mut Vec<NameEvent>) {
        let Some(names) = self.by_owner.get(&owner) else {
            return;
        };
        let mut names: Vec<Arc<str>> = names.iter().cloned().collect();
        // A stable order for the events: by name.
        names.sort();
        for n in names {
            self.leave(&n, owner, false, events);
        }
    }

    /// The primary owner of `name`.
    pub fn owner(&self, name: &str) -> Option<Owner> {
        self.names
            .get(name)
            .and_then(|q| q.front())
            .map(|e| e.owner)
    }

    /// The primary owner of `name` then those waiting, in order (empty if nobody owns it).
    pub fn queue(&self, name: &str) -> Vec<Owner> {
        self.names
            .get(name)
            .map(|q| q.iter().map(|e| e.owner).collect())
            .unwrap_or_default()
    }

    /// Every owned name, sorted.
    pub fn names(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self.names.keys().cloned().collect();
        v.sort();
        v
    }

    /// Names `owner` owns or waits for, sorted.
    pub fn held_by(&self, owner: Owner) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self
            .by_owner
            .get(&owner)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Number of owned names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no name is owned.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NameEvent::*;
    use RequestReply::*;

    const N: &str = "com.example.Svc";

    fn n() -> Arc<str> {
        N.into()
    }

    #[track_caller]
    fn req(r: &mut Registry, who: Owner, flags: u32) -> (RequestReply, Vec<NameEvent>) {
        let mut ev = Vec::new();
        let rep = r.request(N, who, flags, &mut ev).unwrap();
        (rep, ev)
    }

    fn acquired(owner: Owner, old: Option<Owner>) -> Vec<NameEvent> {
        vec![
            OwnerChanged {
                name: n(),
                old,
                new: Some(owner),
            },
            Acquired { owner, name: n() },
        ]
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a.b", "com.example.Svc", "a-b.c_d", "org._1"] {
            assert!(valid_well_known(ok), "{ok}");
        }
        let long = format!("a.{}", "b".repeat(254));
        for bad in [
            "a", "", ".a", "a.", "a..b", "1a.b", "a.1b", "a.b/c", ":1.2", &long,
        ] {
            assert!(!valid_well_known(bad), "{bad}");
        }
        let mut r = Registry::new(10);
        let mut ev = Vec::new();
        assert!(matches!(
            r.request("org.freedesktop.DBus", 1, 0, &mut ev),
            Err(NameError::Reserved(_))
        ));
        assert!(matches!(
            r.request(":1.1", 1, 0, &mut ev),
            Err(NameError::Reserved(_))
        ));
        assert!(matches!(
            r.request("nodots", 1, 0, &mut ev),
            Err(NameError::Invalid(_))
        ));
        assert!(ev.is_empty());
    }

    /// Every combination of the owner's flags and the second caller's flags, against the
    /// table in the module documentation.
    #[test]
    fn all_flag_combinations_for_a_second_caller() {
        for first in 0..8u32 {
            for second in 0..8u32 {
                let mut r = Registry::new(10);
                assert_eq!(req(&mut r, 1, first), (PrimaryOwner, acquired(1, None)));
                let (rep, ev) = req(&mut r, 2, second);
                let replaces = second & REPLACE_EXISTING != 0 && first & ALLOW_REPLACEMENT != 0;
                let ctx = format!("owner flags {first}, caller flags {second}");
                if replaces {
                    assert_eq!(rep, PrimaryOwner, "{ctx}");
                    let mut want = vec![Lost {
                        owner: 1,
                        name: n(),
                    }];
                    want.extend(acquired(2, Some(1)));
                    assert_eq!(ev, want, "{ctx}");
                    let q = if first & DO_NOT_QUEUE != 0 {
                        vec![2]
                    } else {
                        vec![2, 1]
                    };
                    assert_eq!(r.queue(N), q, "{ctx}");
                } else if second & DO_NOT_QUEUE != 0 {
                    assert_eq!((rep, ev.len()), (Exists, 0), "{ctx}");
                    assert_eq!(r.queue(N), vec![1], "{ctx}");
                } else {
                    assert_eq!((rep, ev.len()), (InQueue, 0), "{ctx}");
                    assert_eq!(r.queue(N), vec![1, 2], "{ctx}");
                }
                // The owner asking again is told it owns the name, whatever the flags.
                let owner = r.owner(N).unwrap();
                assert_eq!(req(&mut r, owner, second), (AlreadyOwner, vec![]), "{ctx}");
            }
        }
    }

    #[test]
    fn already_owner_updates_the_flags() {
        let mut r = Registry::new(10);
        req(&mut r, 1, 0);
        assert_eq!(req(&mut r, 2, REPLACE_EXISTING).0, InQueue);
        assert_eq!(req(&mut r, 1, ALLOW_REPLACEMENT).0, AlreadyOwner);
        assert_eq!(req(&mut r, 2, REPLACE_EXISTING).0, PrimaryOwner);
        // Replacing from inside the queue: 2 left its place, 1 is at the head of the queue.
        assert_eq!(r.queue(N), vec![2, 1]);
    }

    #[test]
    fn queued_caller_with_do_not_queue_leaves_the_queue() {
        let mut r = Registry::new(10);
        req(&mut r, 1, 0);
        assert_eq!(req(&mut r, 2, 0).0, InQueue);
        assert_eq!(req(&mut r, 3, 0).0, InQueue);
        assert_eq!(req(&mut r, 2, DO_NOT_QUEUE).0, Exists);
        assert_eq!(r.queue(N), vec![1, 3]);
        // Asking again while queued keeps the place.
        assert_eq!(req(&mut r, 3, ALLOW_REPLACEMENT).0, InQueue);
        assert_eq!(r.queue(N), vec![1, 3]);
        assert!(r.held_by(2).is_empty());
    }

    #[test]
    fn replaced_owner_goes_to_the_head_of_the_queue() {
        let mut r = Registry::new(10);
        req(&mut r, 1, ALLOW_REPLACEMENT);
        req(&mut r, 2, 0);
        req(&mut r, 3, REPLACE_EXISTING);
        assert_eq!(r.queue(N), vec![3, 1, 2]);
    }

    #[test]
    fn release_hands_over_in_queue_order() {
        let mut r = Registry::new(10);
        let mut ev = Vec::new();
        assert_eq!(r.release(N, 1, &mut ev), ReleaseReply::NonExistent);
        req(&mut r, 1, 0);
        req(&mut r, 2, 0);
        req(&mut r, 3, 0);
        assert_eq!(r.release(N, 4, &mut ev), ReleaseReply::NotOwner);
        // A waiting owner leaves quietly.
        assert_eq!(r.release(N, 3, &mut ev), ReleaseReply::Released);
        assert!(ev.is_empty());
        assert_eq!(r.release(N, 1, &mut ev), ReleaseReply::Released);
        let mut want = vec![Lost {
            owner: 1,
            name: n(),
        }];
        want.extend(acquired(2, Some(1)));
        assert_eq!(ev, want);
        ev.clear();
        assert_eq!(r.release(N, 2, &mut ev), ReleaseReply::Released);
        assert_eq!(
            ev,
            vec![
                Lost {
                    owner: 2,
                    name: n()
                },
                OwnerChanged {
                    name: n(),
                    old: Some(2),
                    new: None
                }
            ]
        );
        assert!(r.is_empty() && r.owner(N).is_none());
    }

    #[test]
    fn disconnect_hands_every_name_over_without_name_lost() {
        let mut r = Registry::new(10);
        let mut ev = Vec::new();
        r.request("b.name", 1, 0, &mut ev).unwrap();
        r.request("a.name", 1, 0, &mut ev).unwrap();
        r.request("a.name", 2, 0, &mut ev).unwrap();
        r.request("c.name", 2, 0, &mut ev).unwrap();
        r.request("c.name", 1, 0, &mut ev).unwrap();
        ev.clear();
        r.remove_owner(1, &mut ev);
        assert_eq!(
            ev,
            vec![
                OwnerChanged {
                    name: "a.name".into(),
                    old: Some(1),
                    new: Some(2)
                },
                Acquired {
                    owner: 2,
                    name: "a.name".into()
                },
                OwnerChanged {
                    name: "b.name".into(),
                    old: Some(1),
                    new: None
                },
            ],
            "c.name: 1 only waited"
        );
        assert_eq!(r.queue("c.name"), vec![2]);
        assert!(r.held_by(1).is_empty());
        assert_eq!(r.names().len(), 2);
    }

    #[test]
    fn a_connection_holds_a_bounded_number_of_names() {
        let mut r = Registry::new(2);
        let mut ev = Vec::new();
        r.request("a.a", 1, 0, &mut ev).unwrap();
        r.request("a.b", 1, 0, &mut ev).unwrap();
        assert_eq!(r.request("a.c", 1, 0, &mut ev), Err(NameError::TooMany(2)));
        assert_eq!(r.request("a.b", 1, 0, &mut ev), Ok(AlreadyOwner));
    }
}
