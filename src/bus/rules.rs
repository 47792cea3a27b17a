//! Match rules, without I/O: D-Bus's `AddMatch` syntax parsed and applied to a message's
//! header fields.
//!
//! A rule is a comma-separated list of `key='value'` pairs, all of which must hold:
//! `type` (`signal`, `method_call`, `method_return`, `error`), `sender` (a unique name, or a
//! well-known name matched against its current owner), `interface`, `member`, `path`,
//! `path_namespace` (the path itself or anything under it), `destination`, and `argN`
//! (0 ≤ N < 64: the N-th argument is this string). Values are quoted with `'`; inside
//! quotes a backslash is literal, and outside quotes `\'` stands for a quote, as the D-Bus
//! specification says. An empty rule matches everything.

use std::sync::Arc;

/// The kind of bus message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A method call.
    Call,
    /// A method's reply.
    Return,
    /// An error reply.
    Error,
    /// A signal.
    Signal,
}

impl Kind {
    /// The name used in match rules and on the wire (`type` user property).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Call => "method_call",
            Kind::Return => "method_return",
            Kind::Error => "error",
            Kind::Signal => "signal",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "method_call" => Kind::Call,
            "method_return" => Kind::Return,
            "error" => Kind::Error,
            "signal" => Kind::Signal,
            _ => return None,
        })
    }
}

/// A message's fields as rules see them.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// Its kind.
    pub kind: Kind,
    /// The sender's unique name.
    pub sender: &'a str,
    /// Well-known names the sender owns (for `sender='com.example.Name'`).
    pub sender_names: &'a [Arc<str>],
    /// Object path.
    pub path: Option<&'a str>,
    /// Interface.
    pub interface: Option<&'a str>,
    /// Member.
    pub member: Option<&'a str>,
    /// Destination as addressed.
    pub destination: Option<&'a str>,
    /// The arguments (a JSON array), if any: `argN` matches only string arguments.
    pub args: Option<&'a [serde_json::Value]>,
}

/// A parsed match rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// The rule's text as given (`RemoveMatch` compares parsed rules, not text).
    pub text: String,
    kind: Option<Kind>,
    sender: Option<String>,
    interface: Option<String>,
    member: Option<String>,
    path: Option<String>,
    path_namespace: Option<String>,
    destination: Option<String>,
    args: Vec<(u8, String)>,
}

/// Why a rule could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid match rule: {0}")]
pub struct RuleError(pub String);

fn err(s: impl Into<String>) -> RuleError {
    RuleError(s.into())
}

/// Split `key='value',...` into pairs, following D-Bus's quoting.
fn pairs(text: &str) -> Result<Vec<(String, String)>, RuleError> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| err(format!("no '=' in {rest:?}")))?;
        let key = rest[..eq].trim().to_string();
        if key.is_empty() {
            return Err(err("empty key"));
        }
        rest = rest[eq + 1..].trim_start();
        let mut value = String::new();
        // Unquoted white space at the end of a value is not part of it.
        let mut keep = 0;
        let mut quoted = false;
        let mut chars = rest.char_indices().peekable();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            if quoted {
                if c == '\'' {
                    quoted = false;
                } else {
                    value.push(c);
                }
                keep = value.len();
            } else if c == '\'' {
                quoted = true;
            } else if c == '\\' && matches!(chars.peek(), Some((_, '\''))) {
                chars.next();
                value.push('\'');
                keep = value.len();
            } else if c == ',' {
                end = i + 1;
                break;
            } else {
                value.push(c);
                if !c.is_whitespace() {
                    keep = value.len();
                }
            }
        }
        value.truncate(keep);
        if quoted {
            return Err(err(format!("unterminated quote in the value of {key}")));
        }
        out.push((key, value));
        rest = rest[end.min(rest.len())..].trim_start();
    }
    Ok(out)
}

impl Rule {
    /// Parse a rule.
    ///
    /// # Errors
    /// Unknown keys, a key given twice, bad values (a `type` that is not one of the four,
    /// a relative path, `argN` with N ≥ 64), or bad quoting.
    pub fn parse(text: &str) -> Result<Rule, RuleError> {
        if text.len() > 1024 {
            return Err(err("longer than 1024 bytes"));
        }
        let mut r = Rule {
            text: text.to_string(),
            ..Default::default()
        };
        for (k, v) in pairs(text)? {
            let slot = match k.as_str() {
                "type" => {
                    if r.kind.is_some() {
                        return Err(err("type given twice"));
                    }
                    r.kind =
                        Some(Kind::parse(&v).ok_or_else(|| err(format!("unknown type {v:?}")))?);
                    continue;
                }
                "sender" => &mut r.sender,
                "interface" => &mut r.interface,
                "member" => &mut r.member,
                "path" | "path_namespace" => {
                    if !v.starts_with('/') {
                        return Err(err(format!("{k} must be an absolute path, not {v:?}")));
                    }
                    if r.path.is_some() || r.path_namespace.is_some() {
                        return Err(err("path and path_namespace together or twice"));
                    }
                    if k == "path" {
                        &mut r.path
                    } else {
                        &mut r.path_namespace
                    }
                }
                "destination" => &mut r.destination,
                // Accepted for compatibility; monitors see everything anyway.
                "eavesdrop" => continue,
                k if k.starts_with("arg") => {
                    let n: u8 = k[3..]
                        .parse()
                        .ok()
                        .filter(|n| *n < 64)
                        .ok_or_else(|| err(format!("unknown key {k:?} (arg0 to arg63)")))?;
                    if r.args.iter().any(|(i, _)| *i == n) {
                        return Err(err(format!("{k} given twice")));
                    }
                    r.args.push((n, v));
                    continue;
                }
                _ => return Err(err(format!("unknown key {k:?}"))),
            };
            if slot.is_some() {
                return Err(err(format!("{k} given twice")));
            }
            *slot = Some(v);
        }
        r.args.sort();
        Ok(r)
    }

    /// Whether two rules select the same messages (what `RemoveMatch` compares).
    pub fn same(&self, other: &Rule) -> bool {
        Rule {
            text: String::new(),
            ..self.clone()
        } == Rule {
            text: String::new(),
            ..other.clone()
        }
    }

    /// Whether the rule needs the message's arguments (they are decoded only then).
    pub fn needs_args(&self) -> bool {
        !self.args.is_empty()
    }

    /// Whether the message with these fields is selected.
    pub fn matches(&self, f: &Fields<'_>) -> bool {
        if self.kind.is_some_and(|k| k != f.kind) {
            return false;
        }
        if let Some(s) = &self.sender {
            let ok = if s.starts_with(':') || s == super::dbus::DRIVER {
                s == f.sender
            } else {
                f.sender_names.iter().any(|n| **n == **s)
            };
            if !ok {
                return false;
            }
        }
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        if !eq(&self.interface, f.interface)
            || !eq(&self.member, f.member)
            || !eq(&self.path, f.path)
            || !eq(&self.destination, f.destination)
        {
            return false;
        }
        if let Some(ns) = &self.path_namespace {
            let Some(p) = f.path else {
                return false;
            };
            let under = ns == "/"
                || p == ns
                || (p.starts_with(ns.as_str()) && p.as_bytes().get(ns.len()) == Some(&b'/'));
            if !under {
                return false;
            }
        }
        for (n, want) in &self.args {
            let have = f
                .args
                .and_then(|a| a.get(*n as usize))
                .and_then(|v| v.as_str());
            if have != Some(want.as_str()) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signal<'a>(
        sender: &'a str,
        names: &'a [Arc<str>],
        path: &'a str,
        iface: &'a str,
        member: &'a str,
        args: &'a [serde_json::Value],
    ) -> Fields<'a> {
        Fields {
            kind: Kind::Signal,
            sender,
            sender_names: names,
            path: Some(path),
            interface: Some(iface),
            member: Some(member),
            destination: None,
            args: Some(args),
        }
    }

    #[test]
    fn parse_quoting_and_errors() {
        let r = Rule::parse("type='signal', member='Changed',arg0='it''s'").unwrap();
        assert_eq!(r.kind, Some(Kind::Signal));
        assert_eq!(r.member.as_deref(), Some("Changed"));
        assert_eq!(r.args, vec![(0, "its".into())]);
        let r = Rule::parse(r"arg0='a\b',arg1=x\'y").unwrap();
        assert_eq!(r.args, vec![(0, r"a\b".into()), (1, "x'y".into())]);
        assert_eq!(Rule::parse("").unwrap(), Rule::default());
        for bad in [
            "type='nope'",
            "member",
            "colour='red'",
            "path='relative'",
            "path='/a',path_namespace='/b'",
            "arg64='x'",
            "member='a',member='b'",
            "member='open",
            "=x",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
        assert!(Rule::parse("member='A'")
            .unwrap()
            .same(&Rule::parse(" member = 'A' ").unwrap()));
    }

    #[test]
    fn each_key_selects_exactly() {
        let names: Vec<Arc<str>> = vec!["com.example.Owner".into()];
        let args = [json!("eth0"), json!(3), json!("up")];
        let f = signal(":1.7", &names, "/net/eth0", "net.Link", "Changed", &args);
        let yes = [
            "",
            "type='signal'",
            "sender=':1.7'",
            "sender='com.example.Owner'",
            "interface='net.Link'",
            "member='Changed'",
            "path='/net/eth0'",
            "path_namespace='/net'",
            "path_namespace='/net/eth0'",
            "path_namespace='/'",
            "arg0='eth0'",
            "arg2='up'",
            "type='signal',interface='net.Link',member='Changed',arg0='eth0'",
        ];
        let no = [
            "type='method_call'",
            "sender=':1.8'",
            "sender='com.example.Other'",
            "interface='net.Addr'",
            "member='Changed2'",
            "path='/net'",
            "path_namespace='/ne'",
            "path_namespace='/net/eth'",
            "arg0='eth1'",
            "arg1='3'",
            "arg5='x'",
            "destination=':1.1'",
            "type='signal',member='Changed',arg0='wlan0'",
        ];
        for r in yes {
            assert!(Rule::parse(r).unwrap().matches(&f), "{r} should match");
        }
        for r in no {
            assert!(!Rule::parse(r).unwrap().matches(&f), "{r} should not match");
        }
    }
}
