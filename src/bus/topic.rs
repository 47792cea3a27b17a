//! Topic filters in a trie: one node per topic level, with `+` and `#` as their own
//! branches, so matching a topic costs its number of levels (times the wildcards met), not
//! the number of subscriptions.
//!
//! Rules (MQTT 4.7): `+` matches exactly one level, `#` the rest including none
//! (`a/#` matches `a`), and a topic starting with `$` is never matched by a filter whose
//! first level is a wildcard (so `#` does not see `$SYS/...`). A shared subscription
//! `$share/GROUP/FILTER` lives at FILTER's node, in its group: each matching message goes to
//! one member of each group, in turn.

use std::collections::HashMap;
use std::sync::Arc;

/// The index of a client in the broker's client table.
pub type ClientIx = usize;

/// One subscription's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOpts {
    /// Maximum QoS granted.
    pub qos: u8,
    /// 5.0 no local: never deliver the client's own publications back to it.
    pub no_local: bool,
    /// 5.0 retain as published: keep the RETAIN flag on forwarded messages.
    pub retain_as_published: bool,
    /// 5.0 retain handling: 0 send retained at subscribe, 1 only if new, 2 never.
    pub retain_handling: u8,
    /// 5.0 subscription identifier.
    pub id: Option<u32>,
}

#[derive(Debug, Default)]
struct Group {
    members: Vec<(ClientIx, SubOpts)>,
    next: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscriptions whose filter ends here.
    here: Vec<(ClientIx, SubOpts)>,
    /// Subscriptions whose filter ends here with `/#` (or is `#` at the root).
    hash: Vec<(ClientIx, SubOpts)>,
    shared_here: HashMap<Arc<str>, Group>,
    shared_hash: HashMap<Arc<str>, Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
            && self.shared_here.is_empty()
            && self.shared_hash.is_empty()
    }
}

/// A parsed filter: its group if shared, and its plain filter text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter<'a> {
    /// `$share/GROUP/...`: the group.
    pub group: Option<&'a str>,
    /// The filter matched against topics.
    pub filter: &'a str,
}

/// Split `$share/GROUP/FILTER`, or take a plain filter as it is.
pub fn parse_filter(text: &str) -> Option<Filter<'_>> {
    if let Some(rest) = text.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/')?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return None;
        }
        Some(Filter {
            group: Some(group),
            filter,
        })
    } else {
        Some(Filter {
            group: None,
            filter: text,
        })
    }
}

/// Whether `filter` (plain, not `$share`) matches `topic`, by the same rules as the trie
/// (used for retained messages and in tests).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What matched a topic: plain subscriptions, and one member chosen from each shared group.
#[derive(Debug, Default)]
pub struct Matches {
    /// Every matching plain subscription (a client may appear more than once, once per
    /// overlapping filter).
    pub subs: Vec<(ClientIx, SubOpts)>,
    /// One member per matching shared group.
    pub shared: Vec<(ClientIx, SubOpts)>,
}

/// The subscription trie.
#[derive(Debug, Default)]
pub struct Trie {
    root: Node,
    count: usize,
}

impl Trie {
    /// An empty trie.
    pub fn new() -> Trie {
        Trie::default()
    }

    /// Number of subscriptions held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no subscription is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn node_mut(&mut self, filter: &str) -> (&mut Node, bool) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                return (node, true);
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        (node, false)
    }

    /// Add or replace `client`'s subscription to `filter` (already validated).
    pub fn insert(&mut self, filter: &Filter<'_>, client: ClientIx, opts: SubOpts) {
        let (node, hash) = self.node_mut(filter.filter);
        let list = match (filter.group, hash) {
            (None, false) => &mut node.here,
            (None, true) => &mut node.hash,
            (Some(g), false) => &mut node.shared_here.entry(g.into()).or_default().members,
            (Some(g), true) => &mut node.shared_hash.entry(g.into()).or_default().members,
        };
        if let Some(e) = list.iter_mut().find(|(c, _)| *c == client) {
            e.1 = opts;
        } else {
            list.push((client, opts));
            self.count += 1;
        }
    }

    /// Remove `client`'s subscription to `filter`; whether it existed.
    pub fn remove(&mut self, filter: &Filter<'_>, client: ClientIx) -> bool {
        let levels: Vec<&str> = filter.filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, filter.group, client);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Everything matching `topic`. Shared groups advance their turn.
    pub fn matches(&mut self, topic: &str, out: &mut Matches) {
        out.subs.clear();
        out.shared.clear();
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        collect(&mut self.root, &levels, 0, dollar, out);
    }
}

fn take_turn(groups: &mut HashMap<Arc<str>, Group>, out: &mut Vec<(ClientIx, SubOpts)>) {
    for g in groups.values_mut() {
        if !g.members.is_empty() {
            let i = g.next % g.members.len();
            g.next = g.next.wrapping_add(1);
            out.push(g.members[i]);
        }
    }
}

fn collect(node: &mut Node, levels: &[&str], i: usize, dollar: bool, out: &mut Matches) {
    let wild_ok = !(i == 0 && dollar);
    if wild_ok {
        out.subs.extend_from_slice(&node.hash);
        take_turn(&mut node.shared_hash, &mut out.shared);
    }
    if i == levels.len() {
        out.subs.extend_from_slice(&node.here);
        take_turn(&mut node.shared_here, &mut out.shared);
        return;
    }
    if let Some(child) = node.children.get_mut(levels[i]) {
        collect(child, levels, i + 1, dollar, out);
    }
    if wild_ok {
        if let Some(plus) = node.plus.as_deref_mut() {
            collect(plus, levels, i + 1, dollar, out);
        }
    }
}

fn remove_from(list: &mut Vec<(ClientIx, SubOpts)>, client: ClientIx) -> bool {
    let before = list.len();
    list.retain(|(c, _)| *c != client);
    list.len() != before
}

fn remove_group(groups: &mut HashMap<Arc<str>, Group>, group: &str, client: ClientIx) -> bool {
    let Some(g) = groups.get_mut(group) else {
        return false;
    };
    let removed = remove_from(&mut g.members, client);
    if g.members.is_empty() {
        groups.remove(group);
    }
    removed
}

fn remove_at(node: &mut Node, levels: &[&str], group: Option<&str>, client: ClientIx) -> bool {
    match levels {
        [] => match group {
            None => remove_from(&mut node.here, client),
            Some(g) => remove_group(&mut node.shared_here, g, client),
        },
        ["#"] => match group {
            None => remove_from(&mut node.hash, client),
            Some(g) => remove_group(&mut node.shared_hash, g, client),
        },
        [first, rest @ ..] => {
            if *first == "+" {
                let Some(plus) = node.plus.as_deref_mut() else {
                    return false;
                };
                let removed = remove_at(plus, rest, group, client);
                if plus.is_empty() {
                    node.plus = None;
                }
                removed
            } else {
                let Some(child) = node.children.get_mut(*first) else {
                    return false;
                };
                let removed = remove_at(child, rest, group, client);
                if child.is_empty() {
                    node.children.remove(*first);
                }
                removed
            }
        }
    }
}

/// Retained messages (or anything kept per topic) in a tree of topic levels: a new
/// subscription finds what its filter matches by walking the filter down the tree, so its
/// cost is what matches (times the wildcards' fan-out), not the number of retained topics.
#[derive(Debug)]
pub struct ByTopic<T> {
    root: TopicNode<T>,
    len: usize,
    /// How many of them are `$` topics (`$SYS/...`).
    dollar: usize,
}

#[derive(Debug)]
struct TopicNode<T> {
    children: HashMap<Box<str>, TopicNode<T>>,
    value: Option<T>,
}

impl<T> Default for TopicNode<T> {
    fn default() -> Self {
        TopicNode {
            children: HashMap::new(),
            value: None,
        }
    }
}

impl<T> Default for ByTopic<T> {
    fn default() -> Self {
        ByTopic {
            root: TopicNode::default(),
            len: 0,
            dollar: 0,
        }
    }
}

impl<T> ByTopic<T> {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of topics holding a value.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Number of topics holding a value, `$` topics left out.
    pub fn len_without_dollar(&self) -> usize {
        self.len - self.dollar
    }

    /// Whether no topic holds a value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set the value of `topic`, returning the one it replaces.
    pub fn insert(&mut self, topic: &str, value: T) -> Option<T> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let old = node.value.replace(value);
        if old.is_none() {
            self.len += 1;
            self.dollar += topic.starts_with('$') as usize;
        }
        old
    }

    /// Take the value of `topic` out (and the nodes left empty).
    pub fn remove(&mut self, topic: &str) -> Option<T> {
        let levels: Vec<&str> = topic.split('/').collect();
        let old = remove_topic(&mut self.root, &levels);
        if old.is_some() {
            self.len -= 1;
            self.dollar -= topic.starts_with('$') as usize;
        }
        old
    }

    /// The value of exactly `topic`.
    pub fn get(&self, topic: &str) -> Option<&T> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    /// Every value whose topic `filter` (plain, validated) matches, by the rules of
    /// [`matches`].
    pub fn matching<'a>(&'a self, filter: &str, out: &mut Vec<&'a T>) {
        let levels: Vec<&str> = filter.split('/').collect();
        walk(&self.root, &levels, 0, out);
    }
}

fn remove_topic<T>(node: &mut TopicNode<T>, levels: &[&str]) -> Option<T> {
    match levels {
        [] => node.value.take(),
        [first, rest @ ..] => {
            let child = node.children.get_mut(*first)?;
            let old = remove_topic(child, rest);
            if child.value.is_none() && child.children.is_empty() {
                node.children.remove(*first);
            }
            old
        }
    }
}

/// Everything below `node` (itself included).
fn all<'a, T>(node: &'a TopicNode<T>, root: bool, out: &mut Vec<&'a T>) {
    out.extend(node.value.as_ref());
    for (name, child) in &node.children {
        // A wildcard in the first level never matches a topic starting with `$`.
        if !(root && name.starts_with('$')) {
            all(child, false, out);
        }
    }
}

fn walk<'a, T>(node: &'a TopicNode<T>, levels: &[&str], i: usize, out: &mut Vec<&'a T>) {
    let Some(&level) = levels.get(i) else {
        out.extend(node.value.as_ref());
        return;
    };
    match level {
        // `#` also matches the parent level (`a/#` matches `a`); at the root there is none.
        "#" => all(node, i == 0, out),
        "+" => {
            for (name, child) in &node.children {
                if !(i == 0 && name.starts_with('$')) {
                    walk(child, levels, i + 1, out);
                }
            }
        }
        _ => {
            if let Some(child) = node.children.get(level) {
                walk(child, levels, i + 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SubOpts {
        SubOpts {
            qos: 0,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: None,
        }
    }

    fn hit(t: &mut Trie, topic: &str) -> Vec<ClientIx> {
        let mut m = Matches::default();
        t.matches(topic, &mut m);
        let mut v: Vec<_> = m.subs.iter().chain(&m.shared).map(|x| x.0).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_follow_the_specification() {
        let cases = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            ("sport/#", "sport", true),
            ("#", "anything/at/all", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("#", "$SYS/uptime", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ];
        for (f, topic, want) in cases {
            assert_eq!(matches(f, topic), want, "{f} vs {topic}");
            let mut t = Trie::new();
            t.insert(&parse_filter(f).unwrap(), 1, opts());
            assert_eq!(!hit(&mut t, topic).is_empty(), want, "trie: {f} vs {topic}");
        }
    }

    #[test]
    fn overlapping_filters_each_match_and_remove_cleans_up() {
        let mut t = Trie::new();
        for (c, f) in [(1, "a/b"), (1, "a/+"), (2, "a/#"), (3, "b")] {
            t.insert(&parse_filter(f).unwrap(), c, opts());
        }
        assert_eq!(t.len(), 4);
        assert_eq!(hit(&mut t, "a/b"), vec![1, 1, 2]);
        assert!(t.remove(&parse_filter("a/+").unwrap(), 1));
        assert!(!t.remove(&parse_filter("a/+").unwrap(), 1));
        assert_eq!(hit(&mut t, "a/b"), vec![1, 2]);
        for (c, f) in [(1, "a/b"), (2, "a/#"), (3, "b")] {
            assert!(t.remove(&parse_filter(f).unwrap(), c));
        }
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "no empty nodes left behind");
    }

    #[test]
    fn shared_groups_take_turns() {
        let mut t = Trie::new();
        for c in 0..3 {
            t.insert(&parse_filter("$share/g/job/#").unwrap(), c, opts());
        }
        t.insert(&parse_filter("$share/h/job/+").unwrap(), 9, opts());
        let mut got = Vec::new();
        for _ in 0..6 {
            let mut m = Matches::default();
            t.matches("job/1", &mut m);
            assert_eq!(m.shared.len(), 2, "one per group");
            got.extend(m.shared.iter().map(|x| x.0).filter(|&c| c != 9));
        }
        got.sort();
        assert_eq!(got, vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(parse_filter("$share//x"), None);
        assert_eq!(parse_filter("$share/g"), None);
    }

    #[test]
    fn retained_tree_matches_as_the_rules_say() {
        let topics = [
            "sport",
            "sport/",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "/finance",
            "a//b",
            "$SYS/broker/uptime",
            "$SYS",
        ];
        let filters = [
            "#",
            "+",
            "+/+",
            "/+",
            "sport/#",
            "sport/+",
            "sport/tennis/+",
            "sport/tennis/player1/#",
            "a/+/b",
            "a//b",
            "$SYS/#",
            "$SYS/+/uptime",
            "+/broker/uptime",
            "nothing/#",
        ];
        let mut t = ByTopic::new();
        for topic in topics {
            assert!(t.insert(topic, topic).is_none());
        }
        assert_eq!(t.len(), topics.len());
        assert_eq!(t.len_without_dollar(), topics.len() - 2);
        for f in filters {
            let mut got = Vec::new();
            t.matching(f, &mut got);
            let mut got: Vec<&str> = got.into_iter().copied().collect();
            got.sort_unstable();
            let mut want: Vec<&str> = topics.iter().copied().filter(|t| matches(f, t)).collect();
            want.sort_unstable();
            assert_eq!(got, want, "filter {f}");
        }
        assert_eq!(t.insert("sport", "again"), Some("sport"));
        assert_eq!(t.get("sport"), Some(&"again"));
        for topic in topics {
            assert!(t.remove(topic).is_some(), "{topic}");
        }
        assert!(
            t.is_empty() && t.root.children.is_empty(),
            "no empty nodes left"
        );
        assert_eq!(t.remove("sport"), None);
    }
}
