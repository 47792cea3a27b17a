//! Access control lists, without I/O: a parser for mosquitto-style ACL files, extended with
//! D-Bus-style rules for bus names, and the matcher every decision goes through.
//!
//! ```text
//! # lines before the first `user` apply to anonymous clients
//! topic read public/#
//!
//! user alice
//! topic readwrite sensors/#        # access: read | write | readwrite | deny (default readwrite)
//! topic deny sensors/secret
//! own org.example.Thermo           # may own this bus name
//! own org.example.Tools.*          # ... this one and every name below it (D-Bus own_prefix)
//! call org.example.Thermo          # may call any method on it
//! call org.example.Store org.example.Store1 Get   # only this interface and member
//! call deny org.example.Store org.example.Store1 Wipe
//!
//! # `pattern` lines apply to every client; %u is the user name, %c the client id
//! pattern readwrite users/%u/#
//! pattern own org.socklab.user.%u
//! ```
//!
//! Decisions, for one client (its user name, or none, and its client id):
//!
//! - The rules that apply are those of its section (the `user` section of its name, or the
//!   anonymous section) and every `pattern` rule. In a `pattern` topic rule and in any
//!   `own`/`call` rule, `%u` and `%c` stand for the user name and the client id; a rule
//!   whose `%u` a client without a user name would fill, or whose value holds a character
//!   that would change the pattern's shape (`/`, `+`, `#` in topics; `*` in names), does not
//!   apply to it.
//! - **A `deny` rule wins**, wherever it stands; otherwise a granting rule must match.
//!   Nothing is granted by default: once an ACL file is given, what it does not grant is
//!   refused (topics, names and calls alike).
//! - Topics follow MQTT's matching (`+` one level, `#` the rest including the parent, and a
//!   first-level wildcard never matches a topic starting with `$`, so `#` does not grant
//!   `$SYS/...`).
//! - A subscription is granted when one read rule *covers* its filter (every topic the
//!   filter can match is matched by the rule) and no deny rule covers it. If a deny rule
//!   only *overlaps* the filter (read `a/#`, deny `a/secret`, subscribe `a/#`), the
//!   subscription is granted and each message is checked as it is delivered
//!   ([`SubAccess::Filtered`]).
//! - A call rule names a destination pattern and optionally an interface and a member (`*`
//!   for any). A call sent without an interface is matched by a deny rule that names one
//!   (so leaving the interface out cannot dodge a deny), but not by a granting rule that
//!   names one.

use std::collections::HashMap;
use std::fmt;

/// What a topic rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe and receive.
    Read,
    /// Publish.
    Write,
    /// Both.
    ReadWrite,
    /// Neither, whatever else grants it.
    Deny,
}

impl Access {
    fn grants(self, want: Want) -> bool {
        matches!(
            (self, want),
            (Access::ReadWrite, _) | (Access::Read, Want::Read) | (Access::Write, Want::Write)
        )
    }
}

/// The two directions a topic is used in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Receiving (subscribing, deliveries, retained messages).
    Read,
    /// Publishing (and wills).
    Write,
}

/// The answer to a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubAccess {
    /// Refused.
    Denied,
    /// Granted; every topic it can match may be read.
    Granted,
    /// Granted, but a deny rule overlaps it: check each message's topic on delivery.
    Filtered,
}

/// Who asks.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The authenticated user name, if any.
    pub user: Option<&'a str>,
    /// The client identifier.
    pub client_id: &'a str,
}

/// A mistake in an ACL file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A piece of a pattern: literal text, or a substitution.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    User,
    Client,
}

/// Text with `%u` / `%c` in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Part>);

impl Template {
    fn parse(s: &str, substitute: bool) -> Template {
        if !substitute || !s.contains('%') {
            return Template(vec![Part::Lit(s.to_string())]);
        }
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('%', Some('u')) | ('%', Some('c')) => {
                    let p = if chars.next() == Some('u') {
                        Part::User
                    } else {
                        Part::Client
                    };
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(p);
                }
                _ => lit.push(c),
            }
        }
        if !lit.is_empty() || parts.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Template(parts)
    }

    fn uses_user(&self) -> bool {
        self.0.contains(&Part::User)
    }

    fn uses_client(&self) -> bool {
        self.0.contains(&Part::Client)
    }

    fn pieces<'s>(&'s self, who: &'s Who<'_>) -> impl Iterator<Item = &'s str> {
        self.0.iter().map(|p| match p {
            Part::Lit(s) => s.as_str(),
            Part::User => who.user.unwrap_or(""),
            Part::Client => who.client_id,
        })
    }

    /// What is left of `text` after the filled-in template, if `text` starts with it.
    fn strip<'t>(&self, text: &'t str, who: &Who<'_>) -> Option<&'t str> {
        let mut rest = text;
        for piece in self.pieces(who) {
            rest = rest.strip_prefix(piece)?;
        }
        Some(rest)
    }

    /// Whether the template, filled in for `who`, equals `text` (no allocation).
    fn eq(&self, text: &str, who: &Who<'_>) -> bool {
        self.strip(text, who) == Some("")
    }

    /// Whether the template, filled in for `who`, starts with `$`.
    fn starts_with_dollar(&self, who: &Who<'_>) -> bool {
        self.pieces(who)
            .find(|s| !s.is_empty())
            .is_some_and(|s| s.starts_with('$'))
    }

    /// Whether `text` is the filled template or a name below it (`PREFIX.*` name rules).
    fn is_prefix_of_name(&self, text: &str, who: &Who<'_>) -> bool {
        match self.strip(text, who) {
            Some("") => true,
            Some(rest) => rest.len() > 1 && rest.starts_with('.'),
            None => false,
        }
    }
}

/// One level of a topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Hash,
    Plus,
    Text(Template),
}

impl Level {
    fn is_wild(&self) -> bool {
        matches!(self, Level::Hash | Level::Plus)
    }
}

/// A topic rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TopicRule {
    access: Access,
    levels: Vec<Level>,
    user: bool,
    client: bool,
}

/// A name pattern: any name, one name, or a name and everything below it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePat {
    Any,
    Exact(Template),
    Prefix(Template),
}

impl NamePat {
    fn parse(s: &str) -> NamePat {
        if s == "*" {
            NamePat::Any
        } else if let Some(p) = s.strip_suffix(".*") {
            NamePat::Prefix(Template::parse(p, true))
        } else {
            NamePat::Exact(Template::parse(s, true))
        }
    }

    fn template(&self) -> Option<&Template> {
        match self {
            NamePat::Any => None,
            NamePat::Exact(t) | NamePat::Prefix(t) => Some(t),
        }
    }

    fn matches(&self, name: &str, who: &Who<'_>) -> bool {
        match self {
            NamePat::Any => true,
            NamePat::Exact(t) => t.eq(name, who),
            NamePat::Prefix(t) => t.is_prefix_of_name(name, who),
        }
    }
}

/// `*` or one exact word (interfaces and members).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Any,
    Exact(String),
}

impl Word {
    fn parse(s: Option<&str>) -> Word {
        match s {
            None | Some("*") => Word::Any,
            Some(w) => Word::Exact(w.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnRule {
    deny: bool,
    name: NamePat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CallRule {
    deny: bool,
    dest: NamePat,
    interface: Word,
    member: Word,
}

/// The rules of one section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Rules {
    topics: Vec<TopicRule>,
    own: Vec<OwnRule>,
    call: Vec<CallRule>,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    anonymous: Rules,
    users: HashMap<String, Rules>,
    patterns: Rules,
}

fn section_mut<'a>(acl: &'a mut Acl, current: &Option<String>) -> &'a mut Rules {
    match current {
        Some(u) => acl.users.entry(u.clone()).or_default(),
        None => &mut acl.anonymous,
    }
}

fn parse_access(word: &str) -> Option<Access> {
    Some(match word {
        "read" => Access::Read,
        "write" => Access::Write,
        "readwrite" => Access::ReadWrite,
        "deny" => Access::Deny,
        _ => return None,
    })
}

/// Split `rest` into an optional access word and the topic (the rest of the line, which may
/// hold spaces, as in mosquitto).
fn access_and_topic(rest: &str) -> (Access, &str) {
    let (first, after) = match rest.split_once(char::is_whitespace) {
        Some((a, b)) => (a, b.trim_start()),
        None => (rest, ""),
    };
    match parse_access(first) {
        Some(a) if !after.is_empty() => (a, after),
        _ => (Access::ReadWrite, rest),
    }
}

fn topic_rule(access: Access, topic: &str, substitute: bool) -> Result<TopicRule, String> {
    if topic.is_empty() {
        return Err("missing topic".into());
    }
    let parts: Vec<&str> = topic.split('/').collect();
    let mut levels = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        levels.push(match *p {
            "#" if i + 1 == parts.len() => Level::Hash,
            "#" => return Err(format!("'#' must be the last level in {topic:?}")),
            "+" => Level::Plus,
            p if p.contains(['+', '#']) => {
                return Err(format!("'+' and '#' must fill a whole level in {topic:?}"))
            }
            p => Level::Text(Template::parse(p, substitute)),
        });
    }
    let user = levels
        .iter()
        .any(|l| matches!(l, Level::Text(t) if t.uses_user()));
    let client = levels
        .iter()
        .any(|l| matches!(l, Level::Text(t) if t.uses_client()));
    Ok(TopicRule {
        access,
        levels,
        user,
        client,
    })
}

fn valid_name_pattern(s: &str) -> Result<(), String> {
    let base = s.strip_suffix(".*").unwrap_or(s);
    if s == "*" {
        return Ok(());
    }
    if base.is_empty() || base.contains('*') {
        return Err(format!("bad name pattern {s:?} (a name, NAME.* or *)"));
    }
    if base
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '%')))
    {
        return Err(format!("bad character in name pattern {s:?}"));
    }
    Ok(())
}

fn own_rule(rest: &str) -> Result<OwnRule, String> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    let (deny, words) = match words.first() {
        Some(&"deny") => (true, &words[1..]),
        _ => (false, &words[..]),
    };
    match words {
        [name] => {
            valid_name_pattern(name)?;
            Ok(OwnRule {
                deny,
                name: NamePat::parse(name),
            })
        }
        [] => Err("missing name after 'own'".into()),
        _ => Err("'own' takes one name pattern".into()),
    }
}

fn call_rule(rest: &str) -> Result<CallRule, String> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    let (deny, words) = match words.first() {
        Some(&"deny") => (true, &words[1..]),
        _ => (false, &words[..]),
    };
    if words.is_empty() {
        return Err("missing destination after 'call'".into());
    }
    if words.len() > 3 {
        return Err("'call' takes DESTINATION [INTERFACE [MEMBER]]".into());
    }
    valid_name_pattern(words[0])?;
    Ok(CallRule {
        deny,
        dest: NamePat::parse(words[0]),
        interface: Word::parse(words.get(1).copied()),
        member: Word::parse(words.get(2).copied()),
    })
}

impl Acl {
    /// Parse the text of an ACL file.
    ///
    /// # Errors
    /// The first bad line: an unknown keyword, a missing topic or name, a wildcard that does
    /// not fill a level, a `#` before the last level.
    pub fn parse(text: &str) -> Result<Acl, ParseError> {
        let mut acl = Acl::default();
        let mut current: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: String| ParseError {
                line: i + 1,
                message,
            };
            let (key, rest) = match line.split_once(char::is_whitespace) {
                Some((k, r)) => (k, r.trim()),
                None => (line, ""),
            };
            match key {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("missing user name after 'user'".into()));
                    }
                    current = Some(rest.to_string());
                    acl.users.entry(rest.to_string()).or_default();
                }
                "topic" => {
                    let (access, topic) = access_and_topic(rest);
                    let r = topic_rule(access, topic, false).map_err(err)?;
                    section_mut(&mut acl, &current).topics.push(r);
                }
                "own" => {
                    let r = own_rule(rest).map_err(err)?;
                    section_mut(&mut acl, &current).own.push(r);
                }
                "call" => {
                    let r = call_rule(rest).map_err(err)?;
                    section_mut(&mut acl, &current).call.push(r);
                }
                "pattern" => {
                    let (word, after) = match rest.split_once(char::is_whitespace) {
                        Some((w, a)) => (w, a.trim()),
                        None => (rest, ""),
                    };
                    match word {
                        "own" if !after.is_empty() => {
                            acl.patterns.own.push(own_rule(after).map_err(err)?)
                        }
                        "call" if !after.is_empty() => {
                            acl.patterns.call.push(call_rule(after).map_err(err)?)
                        }
                        _ => {
                            let (access, topic) = access_and_topic(rest);
                            acl.patterns
                                .topics
                                .push(topic_rule(access, topic, true).map_err(err)?);
                        }
                    }
                }
                other => {
                    return Err(err(format!(
                        "unknown keyword {other:?} (user, topic, pattern, own, call)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// The user names that have a section.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    fn section(&self, who: &Who<'_>) -> Option<&Rules> {
        match who.user {
            Some(u) => self.users.get(u),
            None => Some(&self.anonymous),
        }
    }

    fn topic_rules<'s>(&'s self, who: &'s Who<'_>) -> impl Iterator<Item = &'s TopicRule> {
        self.section(who)
            .into_iter()
            .flat_map(|r| r.topics.iter())
            .chain(
                self.patterns
                    .topics
                    .iter()
                    .filter(move |r| applies_topic(r, who)),
            )
    }

    /// May `who` read (`Want::Read`) or publish to (`Want::Write`) `topic`?
    pub fn topic(&self, who: &Who<'_>, topic: &str, want: Want) -> bool {
        let mut granted = false;
        for r in self.topic_rules(who) {
            if r.access == Access::Deny {
                if matches_topic(&r.levels, topic, who) {
                    return false;
                }
            } else if !granted && r.access.grants(want) && matches_topic(&r.levels, topic, who) {
                granted = true;
            }
        }
        granted
    }

    /// May `who` subscribe to `filter` (without a `$share/GROUP/` prefix), and must its
    /// deliveries be checked one by one?
    pub fn subscribe(&self, who: &Who<'_>, filter: &str) -> SubAccess {
        let f: Vec<&str> = filter.split('/').collect();
        let mut covered = false;
        let mut overlapped = false;
        for r in self.topic_rules(who) {
            if r.access == Access::Deny {
                if covers(&r.levels, &f, who) {
                    return SubAccess::Denied;
                }
                overlapped |= overlaps(&r.levels, &f, who);
            } else if r.access.grants(Want::Read) && !covered {
                covered = covers(&r.levels, &f, who);
            }
        }
        match (covered, overlapped) {
            (false, _) => SubAccess::Denied,
            (true, false) => SubAccess::Granted,
            (true, true) => SubAccess::Filtered,
        }
    }

    fn name_rules<'s, R: 's>(
        &'s self,
        who: &'s Who<'_>,
        pick: impl Fn(&'s Rules) -> &'s [R] + 's,
        pat: impl Fn(&R) -> &NamePat + 's,
    ) -> impl Iterator<Item = &'s R> + 's {
        let sec = self.section(who).map(&pick).unwrap_or(&[]);
        sec.iter()
            .chain(pick(&self.patterns).iter())
            .filter(move |r| applies_name(pat(r), who))
    }

    /// May `who` own (or queue for) the bus name `name`?
    pub fn own(&self, who: &Who<'_>, name: &str) -> bool {
        let mut granted = false;
        for r in self.name_rules(who, |r| &r.own, |r| &r.name) {
            if r.name.matches(name, who) {
                if r.deny {
                    return false;
                }
                granted = true;
            }
        }
        granted
    }

    /// May `who` call `member` (of `interface`, if given) on `destination`?
    pub fn call(
        &self,
        who: &Who<'_>,
        destination: &str,
        interface: Option<&str>,
        member: &str,
    ) -> bool {
        let mut granted = false;
        for r in self.name_rules(who, |r| &r.call, |r| &r.dest) {
            if !r.dest.matches(destination, who) {
                continue;
            }
            let member_ok = match &r.member {
                Word::Any => true,
                Word::Exact(m) => m == member,
            };
            let iface_ok = match (&r.interface, interface) {
                (Word::Any, _) => true,
                (Word::Exact(want), Some(got)) => want == got,
                // No interface in the call: a deny naming one still applies, a grant does not.
                (Word::Exact(_), None) => r.deny,
            };
            if member_ok && iface_ok {
                if r.deny {
                    return false;
                }
                granted = true;
            }
        }
        granted
    }
}

/// Whether the value filled in for `%u`/`%c` keeps a topic rule's shape.
fn applies_topic(r: &TopicRule, who: &Who<'_>) -> bool {
    let bad = |v: &str| v.is_empty() || v.contains(['/', '+', '#']);
    if r.user && who.user.is_none_or(bad) {
        return false;
    }
    !(r.client && bad(who.client_id))
}

fn applies_name(p: &NamePat, who: &Who<'_>) -> bool {
    let Some(t) = p.template() else {
        return true;
    };
    let bad = |v: &str| v.is_empty() || v.contains('*');
    if t.uses_user() && who.user.is_none_or(bad) {
        return false;
    }
    !(t.uses_client() && bad(who.client_id))
}

fn level_text_eq(l: &Level, text: &str, who: &Who<'_>) -> bool {
    matches!(l, Level::Text(t) if t.eq(text, who))
}

/// Whether the rule's pattern matches a topic (MQTT's rules, `$` included).
fn matches_topic(p: &[Level], topic: &str, who: &Who<'_>) -> bool {
    if topic.starts_with('$') && p.first().is_some_and(Level::is_wild) {
        return false;
    }
    let mut t = topic.split('/');
    let mut i = 0;
    loop {
        match (p.get(i), t.next()) {
            (Some(Level::Hash), _) => return true,
            (Some(Level::Plus), Some(_)) => {}
            (Some(l @ Level::Text(_)), Some(x)) if level_text_eq(l, x, who) => {}
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

/// Whether a filter may match topics starting with `$` (its first level is literal `$...`).
fn dollar_filter(f: &[&str]) -> bool {
    f.first().is_some_and(|l| l.starts_with('$'))
}

/// Whether every topic `f` matches is matched by the pattern `p`.
fn covers(p: &[Level], f: &[&str], who: &Who<'_>) -> bool {
    if dollar_filter(f) && p.first().is_some_and(Level::is_wild) {
        return false;
    }
    let mut i = 0;
    loop {
        match (p.get(i), f.get(i)) {
            (Some(Level::Hash), _) => return true,
            (_, Some(&"#")) => return false,
            (Some(Level::Plus), Some(_)) => {}
            (Some(l @ Level::Text(_)), Some(x)) if *x != "+" && level_text_eq(l, x, who) => {}
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

/// Whether some topic is matched both by the pattern `p` and the filter `f`.
fn overlaps(p: &[Level], f: &[&str], who: &Who<'_>) -> bool {
    // A topic starting with `$` is matched only by a first level naming it.
    let p_wild = p.first().is_some_and(Level::is_wild);
    let f_wild = f.first().is_some_and(|l| *l == "+" || *l == "#");
    let p_dollar = matches!(p.first(), Some(Level::Text(t)) if t.starts_with_dollar(who));
    if (p_wild && dollar_filter(f)) || (f_wild && p_dollar) {
        return false;
    }
    let mut i = 0;
    loop {
        match (p.get(i), f.get(i)) {
            (Some(Level::Hash), _) | (_, Some(&"#")) => return true,
            (Some(Level::Plus), Some(_)) | (Some(Level::Text(_)), Some(&"+")) => {}
            (Some(l @ Level::Text(_)), Some(x)) if level_text_eq(l, x, who) => {}
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
            Access::Deny => "deny",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#
topic write public/inbox

user alice
topic readwrite sensors/#
topic deny sensors/secret
topic read $SYS/broker/clients/#
topic write cmd/+/set
own org.example.Thermo
own org.example.Tools.*
call org.example.Store org.example.Store1 Get
call deny org.example.Store org.example.Store1 Wipe
call org.example.Thermo

user bob
topic read sensors/temp
topic write  topic with spaces

pattern readwrite users/%u/#
pattern read clients/%c/out
pattern write clients/%c/in
pattern own org.socklab.user.%u
pattern call org.socklab.Echo * Ping
";

    fn acl() -> Acl {
        Acl::parse(FILE).unwrap()
    }

    fn who<'a>(user: Option<&'a str>, client_id: &'a str) -> Who<'a> {
        Who { user, client_id }
    }

    const ALICE: Who<'static> = Who {
        user: Some("alice"),
        client_id: "a1",
    };
    const BOB: Who<'static> = Who {
        user: Some("bob"),
        client_id: "b1",
    };
    const ANON: Who<'static> = Who {
        user: None,
        client_id: "x9",
    };

    #[track_caller]
    fn can(acl: &Acl, w: &Who<'_>, topic: &str, read: bool, write: bool) {
        assert_eq!(
            (
                acl.topic(w, topic, Want::Read),
                acl.topic(w, topic, Want::Write)
            ),
            (read, write),
            "{:?} on {topic:?}: (read, write)",
            w.user
        );
    }

    #[test]
    fn exact_rules_by_access() {
        let a = acl();
        can(&a, &BOB, "sensors/temp", true, false);
        can(&a, &BOB, "sensors/hum", false, false);
        can(&a, &BOB, "topic with spaces", false, true);
        can(&a, &ANON, "public/inbox", true, true);
        can(&a, &ANON, "sensors/temp", false, false);
    }

    #[test]
    fn wildcard_rules_and_deny_wins() {
        let a = acl();
        can(&a, &ALICE, "sensors", true, true); // `#` includes the parent level
        can(&a, &ALICE, "sensors/a/b/c", true, true);
        can(&a, &ALICE, "sensors/secret", false, false);
        can(&a, &ALICE, "sensors/secret/sub", true, true); // deny is exact
        can(&a, &ALICE, "cmd/lamp/set", false, true);
        can(&a, &ALICE, "cmd/lamp/x/set", false, false); // `+` is one level
        can(&a, &ALICE, "public/x", false, false); // anonymous rules are not alice's
    }

    #[test]
    fn user_and_client_substitution() {
        let a = acl();
        can(&a, &ALICE, "users/alice/notes", true, true);
        can(&a, &ALICE, "users/bob/notes", false, false);
        can(&a, &BOB, "users/bob", true, true);
        can(&a, &ANON, "users//x", false, false); // no user: %u rules do not apply
        can(&a, &ANON, "clients/x9/out", true, false);
        can(&a, &ANON, "clients/x9/in", false, true);
        can(&a, &ALICE, "clients/a1/out", true, false);
        can(&a, &ALICE, "clients/x9/out", false, false);
        // Names that would change the pattern's shape make it not apply.
        for bad in ["a/b", "+", "#", "x#"] {
            let w = who(Some(bad), bad);
            for t in [
                "users/a/b/x",
                "users/+/x",
                "users/#",
                "users/x#/y",
                "clients/a/b/out",
            ] {
                assert!(!a.topic(&w, t, Want::Read), "{bad:?} reads {t:?}");
            }
        }
    }

    #[test]
    fn dollar_topics_need_a_rule_of_their_own() {
        let a = Acl::parse("topic readwrite #\ntopic read +/x\n").unwrap();
        can(&a, &ANON, "anything/at/all", true, true);
        can(&a, &ANON, "$SYS/broker/uptime", false, false);
        can(&a, &ANON, "$x", false, false);
        assert_eq!(a.subscribe(&ANON, "$SYS/#"), SubAccess::Denied);
        let a = acl();
        can(&a, &ALICE, "$SYS/broker/clients/connected", true, false);
        can(&a, &ALICE, "$SYS/broker/uptime", false, false);
    }

    #[test]
    fn subscriptions_covered_filtered_denied() {
        let a = acl();
        let s = |w: &Who<'_>, f: &str| a.subscribe(w, f);
        assert_eq!(s(&ALICE, "sensors/#"), SubAccess::Filtered, "deny inside");
        assert_eq!(s(&ALICE, "sensors/+/x"), SubAccess::Granted);
        assert_eq!(s(&ALICE, "sensors/+"), SubAccess::Filtered);
        assert_eq!(s(&ALICE, "sensors/temp"), SubAccess::Granted);
        assert_eq!(s(&ALICE, "sensors/secret"), SubAccess::Denied);
        assert_eq!(s(&ALICE, "#"), SubAccess::Denied, "wider than any rule");
        assert_eq!(s(&ALICE, "+/temp"), SubAccess::Denied);
        assert_eq!(s(&ALICE, "cmd/+/set"), SubAccess::Denied, "write only");
        assert_eq!(s(&ALICE, "$SYS/broker/clients/+"), SubAccess::Granted);
        assert_eq!(s(&ALICE, "$SYS/#"), SubAccess::Denied);
        assert_eq!(s(&BOB, "sensors/temp"), SubAccess::Granted);
        assert_eq!(s(&BOB, "sensors/+"), SubAccess::Denied);
        assert_eq!(s(&BOB, "users/bob/#"), SubAccess::Granted);
        assert_eq!(s(&BOB, "users/+/x"), SubAccess::Denied);
        assert_eq!(s(&ANON, "public/+/x"), SubAccess::Granted);
        assert_eq!(s(&ANON, "clients/x9/out"), SubAccess::Granted);
        assert_eq!(s(&ANON, "clients/+/out"), SubAccess::Denied);
    }

    #[test]
    fn cover_and_overlap_by_level() {
        let w = ANON;
        let p = |t: &str| topic_rule(Access::Read, t, true).unwrap().levels;
        let f = |t: &'static str| t.split('/').collect::<Vec<_>>();
        for (pat, filter, c, o) in [
            ("a/#", "a", true, true),
            ("a/#", "a/#", true, true),
            ("a/+", "a/#", false, true),
            ("a/+", "a/+", true, true),
            ("a/+/c", "a/b/+", false, true),
            ("a/b", "a/+", false, true),
            ("a/b", "a/c", false, false),
            ("#", "$SYS/x", false, false),
            ("+/x", "$SYS/x", false, false),
            ("$SYS/#", "#", false, false),
            ("$SYS/#", "$SYS/+", true, true),
            ("a/+/#", "a", false, false),
            ("a", "a/#", false, true),
            ("a/b/c", "a/b", false, false),
        ] {
            assert_eq!(covers(&p(pat), &f(filter), &w), c, "{pat} covers {filter}");
            assert_eq!(
                overlaps(&p(pat), &f(filter), &w),
                o,
                "{pat} overlaps {filter}"
            );
        }
    }

    #[test]
    fn names_own_and_prefix() {
        let a = acl();
        assert!(a.own(&ALICE, "org.example.Thermo"));
        assert!(!a.own(&ALICE, "org.example.Thermo2"));
        assert!(a.own(&ALICE, "org.example.Tools"));
        assert!(a.own(&ALICE, "org.example.Tools.Hammer"));
        assert!(!a.own(&ALICE, "org.example.ToolsX"));
        assert!(!a.own(&BOB, "org.example.Thermo"));
        assert!(a.own(&BOB, "org.socklab.user.bob"));
        assert!(!a.own(&BOB, "org.socklab.user.alice"));
        assert!(!a.own(&ANON, "org.socklab.user."));
        let d = Acl::parse("own *\nown deny org.freedesktop.*\n").unwrap();
        assert!(d.own(&ANON, "com.x.Y"));
        assert!(!d.own(&ANON, "org.freedesktop.DBus"));
        let star = who(Some("*"), "c");
        assert!(!a.own(&star, "org.socklab.user.*"));
    }

    #[test]
    fn calls_by_destination_interface_member() {
        let a = acl();
        let c = |w: &Who<'_>, d: &str, i: Option<&str>, m: &str| a.call(w, d, i, m);
        assert!(c(
            &ALICE,
            "org.example.Store",
            Some("org.example.Store1"),
            "Get"
        ));
        assert!(!c(
            &ALICE,
            "org.example.Store",
            Some("org.example.Store1"),
            "Put"
        ));
        assert!(
            !c(&ALICE, "org.example.Store", None, "Get"),
            "grant names an interface"
        );
        assert!(!c(
            &ALICE,
            "org.example.Store",
            Some("org.example.Store1"),
            "Wipe"
        ));
        assert!(c(&ALICE, "org.example.Thermo", None, "Read"));
        assert!(c(&ALICE, "org.example.Thermo", Some("any.Iface"), "Any"));
        assert!(!c(&BOB, "org.example.Thermo", None, "Read"));
        assert!(c(&BOB, "org.socklab.Echo", Some("x.Y"), "Ping"));
        assert!(c(&ANON, "org.socklab.Echo", None, "Ping"));
        assert!(!c(&ANON, "org.socklab.Echo", None, "Echo"));
        let d = Acl::parse("call *\ncall deny org.x.Admin org.x.Admin1 Wipe\n").unwrap();
        assert!(
            !d.call(&ANON, "org.x.Admin", None, "Wipe"),
            "a deny cannot be dodged"
        );
        assert!(d.call(&ANON, "org.x.Admin", None, "Read"));
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let a = Acl::parse("").unwrap();
        can(&a, &ALICE, "x", false, false);
        assert_eq!(a.subscribe(&ALICE, "x"), SubAccess::Denied);
        assert!(!a.own(&ALICE, "org.x.Y"));
        assert!(!a.call(&ALICE, "org.x.Y", None, "M"));
        // A user without a section gets the patterns only, not the anonymous rules.
        let a = acl();
        let carol = who(Some("carol"), "c");
        can(&a, &carol, "public/x", false, false);
        can(&a, &carol, "users/carol/x", true, true);
    }

    #[test]
    fn topic_access_word_is_optional_and_topics_may_hold_spaces() {
        let a = Acl::parse("topic a b\ntopic read\ntopic deny deny\n").unwrap();
        can(&a, &ANON, "a b", true, true);
        can(&a, &ANON, "read", true, true);
        can(&a, &ANON, "deny", false, false);
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        for (text, line, word) in [
            ("topic read a\nbogus x\n", 2, "unknown keyword"),
            ("user\n", 1, "missing user name"),
            ("topic read a/#/b\n", 1, "last level"),
            ("topic read a/b+\n", 1, "whole level"),
            ("\n\npattern\n", 3, "missing topic"),
            ("own\n", 1, "missing name"),
            ("own a b\n", 1, "one name"),
            ("own org.*.x\n", 1, "bad name pattern"),
            ("call\n", 1, "missing destination"),
            ("call a b c d\n", 1, "DESTINATION"),
            ("own org/x\n", 1, "bad character"),
        ] {
            let e = Acl::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}");
            assert!(e.message.contains(word), "{text:?}: {e}");
        }
    }

    #[test]
    fn mosquitto_example_file_carries_over() {
        // The shape of mosquitto's aclfile.example.
        let a = Acl::parse(
            "topic read $SYS/#\n\nuser roger\ntopic foo/bar\n\npattern write $SYS/broker/connection/%c/state\n",
        )
        .unwrap();
        can(&a, &ANON, "$SYS/broker/uptime", true, false);
        can(&a, &who(Some("roger"), "r"), "foo/bar", true, true);
        can(
            &a,
            &who(Some("roger"), "r"),
            "$SYS/broker/connection/r/state",
            false,
            true,
        );
    }

    proptest::proptest! {
        #[test]
        fn covering_implies_matching(
            pat in "(a|b|\\+)(/(a|b|\\+)){0,3}(/#)?",
            topic in "(a|b|c)(/(a|b|c)){0,4}",
        ) {
            let w = ANON;
            let levels = topic_rule(Access::Read, &pat, false).unwrap().levels;
            let t: Vec<&str> = topic.split('/').collect();
            // A topic is a filter without wildcards: covered exactly when matched.
            proptest::prop_assert_eq!(covers(&levels, &t, &w), matches_topic(&levels, &topic, &w));
            proptest::prop_assert_eq!(overlaps(&levels, &t, &w), matches_topic(&levels, &topic, &w));
            proptest::prop_assert_eq!(
                matches_topic(&levels, &topic, &w),
                crate::bus::topic::matches(&pat, &topic)
            );
        }
    }
}
