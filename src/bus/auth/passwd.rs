//! Password files: one `USER:HASH` line per user, the hash an Argon2id PHC string made by
//! the `argon2` crate (`$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH`); blank lines and lines
//! starting with `#` are kept as they are. `socklab bus passwd FILE USER` adds or updates an
//! entry (`--delete` removes one), reading the password from the terminal without echo, or
//! the first line of standard input when that is not a terminal. No password is stored,
//! printed or logged: only its hash is written.
//!
//! The file's shape is mosquitto's (`user:hash`), but its hashes are not: mosquitto writes
//! PBKDF2-SHA512 (`$7$`) or salted SHA-512 (`$6$`), which are refused with a message saying
//! to set that user's password again.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use std::collections::HashMap;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

/// Largest Argon2 memory cost accepted from a file, in KiB (a typo must not make each login
/// allocate gigabytes).
const MAX_MEMORY_KIB: u32 = 256 * 1024;
/// Largest Argon2 time cost accepted from a file.
const MAX_TIME_COST: u32 = 16;
/// Longest password accepted (Argon2 takes any length; a megabyte-long one is a mistake or
/// an attack on the hashing time).
pub const MAX_PASSWORD: usize = 1024;

/// A mistake in a password file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// A comment or blank line, kept as it was.
    Other(String),
    /// A user and the PHC string of their password's hash.
    Entry(String, String),
}

/// A password file in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passwords {
    lines: Vec<Line>,
    index: HashMap<String, usize>,
}

/// Why a user name cannot be in the file.
fn check_user(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("empty user name".into());
    }
    if user.contains(':') || user.chars().any(char::is_control) {
        return Err(format!(
            "user name {user:?} holds ':' or a control character"
        ));
    }
    if user.len() > 65535 {
        return Err("user name longer than MQTT allows (65,535 bytes)".into());
    }
    Ok(())
}

fn check_hash(hash: &str) -> Result<(), String> {
    if hash.starts_with("$6$") || hash.starts_with("$7$") {
        return Err(
            "a mosquitto_passwd hash ($6$/$7$): set this user's password again with `socklab bus passwd`"
                .into(),
        );
    }
    let h = PasswordHash::new(hash).map_err(|e| format!("not a PHC hash string: {e}"))?;
    if !matches!(h.algorithm.as_str(), "argon2id" | "argon2i" | "argon2d") {
        return Err(format!(
            "hash algorithm {:?} (only Argon2 is accepted)",
            h.algorithm.as_str()
        ));
    }
    let params = argon2::Params::try_from(&h).map_err(|e| format!("bad Argon2 parameters: {e}"))?;
    if params.m_cost() > MAX_MEMORY_KIB || params.t_cost() > MAX_TIME_COST {
        return Err(format!(
            "Argon2 cost m={} KiB, t={} is above the limit (m <= {MAX_MEMORY_KIB}, t <= {MAX_TIME_COST})",
            params.m_cost(),
            params.t_cost()
        ));
    }
    if h.hash.is_none() || h.salt.is_none() {
        return Err("hash string without salt or hash".into());
    }
    Ok(())
}

/// Hash `password` with Argon2id and the crate's default (OWASP) parameters and a fresh salt.
///
/// # Errors
/// An empty or over-long password.
pub fn hash(password: &[u8]) -> Result<String, String> {
    if password.is_empty() {
        return Err("empty password".into());
    }
    if password.len() > MAX_PASSWORD {
        return Err(format!("password longer than {MAX_PASSWORD} bytes"));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing failed: {e}"))
}

/// Whether `password` matches the PHC string `hash` (which names its own parameters).
pub fn verify_hash(hash: &str, password: &[u8]) -> bool {
    if password.len() > MAX_PASSWORD {
        return false;
    }
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

impl Passwords {
    /// Parse the text of a password file.
    ///
    /// # Errors
    /// The first bad line: no `:`, a bad user name, a hash that is not an Argon2 PHC string
    /// (or costs more than the limits), a user listed twice.
    pub fn parse(text: &str) -> Result<Passwords, ParseError> {
        let mut p = Passwords::default();
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| ParseError {
                line: i + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                p.lines.push(Line::Other(raw.to_string()));
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected USER:HASH".into()))?;
            check_user(user).map_err(err)?;
            check_hash(hash).map_err(err)?;
            if p.index.contains_key(user) {
                return Err(err(format!("user {user:?} is listed twice")));
            }
            p.index.insert(user.to_string(), p.lines.len());
            p.lines
                .push(Line::Entry(user.to_string(), hash.to_string()));
        }
        Ok(p)
    }

    /// Read and parse a password file.
    ///
    /// # Errors
    /// The file cannot be read, or [`Passwords::parse`] refuses it (the message names the
    /// file and line).
    pub fn load(path: &Path) -> anyhow::Result<Passwords> {
        use crate::client::UsageError;
        let text = std::fs::read_to_string(path).map_err(|e| {
            UsageError(format!("cannot read password file {}: {e}", path.display()))
        })?;
        Ok(Passwords::parse(&text)
            .map_err(|e| UsageError(format!("password file {}: {e}", path.display())))?)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there is no user.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether `user` has an entry.
    pub fn contains(&self, user: &str) -> bool {
        self.index.contains_key(user)
    }

    /// The stored hash of `user`.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        match self.lines.get(*self.index.get(user)?)? {
            Line::Entry(_, h) => Some(h),
            Line::Other(_) => None,
        }
    }

    /// Add `user` or replace their password.
    ///
    /// # Errors
    /// A bad user name, or an empty or over-long password.
    pub fn set(&mut self, user: &str, password: &[u8]) -> Result<(), String> {
        check_user(user)?;
        let h = hash(password)?;
        match self.index.get(user) {
            Some(&i) => self.lines[i] = Line::Entry(user.to_string(), h),
            None => {
                self.index.insert(user.to_string(), self.lines.len());
                self.lines.push(Line::Entry(user.to_string(), h));
            }
        }
        Ok(())
    }

    /// Remove `user`; whether they were there.
    pub fn remove(&mut self, user: &str) -> bool {
        let Some(i) = self.index.remove(user) else {
            return false;
        };
        self.lines.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        true
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            match l {
                Line::Other(t) => s.push_str(t),
                Line::Entry(u, h) => {
                    s.push_str(u);
                    s.push(':');
                    s.push_str(h);
                }
            }
            s.push('\n');
        }
        s
    }

    /// Write the file atomically (a temporary file beside it, then a rename), readable by
    /// its owner only.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Arguments of `socklab bus passwd`.
#[derive(Debug, Clone, clap::Args)]
pub struct PasswdArgs {
    /// The password file (created if missing, mode 0600).
    pub file: PathBuf,
    /// The user to add or update.
    pub user: String,
    /// Remove the user instead.
    #[arg(short = 'D', long)]
    pub delete: bool,
}

/// Read a password: from the terminal without echo (asked twice), else the first line of
/// standard input.
fn read_password() -> anyhow::Result<String> {
    use crate::client::UsageError;
    if io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password again: ")?;
        if first != again {
            return Err(UsageError("the passwords differ".into()).into());
        }
        Ok(first)
    } else {
        let mut line = String::new();
        io::stdin()
            .lock()
            .take(MAX_PASSWORD as u64 + 2)
            .read_line(&mut line)?;
        let pw = line.strip_suffix('\n').unwrap_or(&line);
        let pw = pw.strip_suffix('\r').unwrap_or(pw);
        Ok(pw.to_string())
    }
}

/// `socklab bus passwd FILE USER [--delete]`.
///
/// # Errors
/// An unreadable or malformed file, a bad user name or password, a user to delete who is
/// not there, a failed write.
pub fn run(a: &PasswdArgs) -> anyhow::Result<()> {
    use crate::client::UsageError;
    let mut p = match std::fs::read_to_string(&a.file) {
        Ok(text) => Passwords::parse(&text)
            .map_err(|e| UsageError(format!("password file {}: {e}", a.file.display())))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !a.delete => Passwords::default(),
        Err(e) => return Err(UsageError(format!("cannot read {}: {e}", a.file.display())).into()),
    };
    if a.delete {
        if !p.remove(&a.user) {
            return Err(UsageError(format!("no user {:?} in {}", a.user, a.file.display())).into());
        }
    } else {
        check_user(&a.user).map_err(UsageError)?;
        let pw = read_password()?;
        p.set(&a.user, pw.as_bytes()).map_err(UsageError)?;
    }
    p.save(&a.file)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", a.file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters so that the tests do not spend seconds hashing.
    fn quick_hash(pw: &[u8]) -> String {
        let params = argon2::Params::new(256, 1, 1, None).unwrap();
        let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        a.hash_password(pw, &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    #[test]
    fn hash_then_verify_and_wrong_passwords_fail() {
        let h = hash(b"correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_hash(&h, b"correct horse"));
        assert!(!verify_hash(&h, b"correct horsE"));
        assert!(!verify_hash(&h, b""));
        assert!(!verify_hash("garbage", b"correct horse"));
        assert_ne!(hash(b"x").unwrap(), hash(b"x").unwrap(), "fresh salts");
        assert!(hash(b"").is_err());
        assert!(hash(&vec![b'a'; MAX_PASSWORD + 1]).is_err());
    }

    #[test]
    fn parse_render_keeps_comments_and_order() {
        let a = quick_hash(b"a");
        let b = quick_hash(b"b");
        let text = format!("# users\nalice:{a}\n\nbob:{b}\n");
        let p = Passwords::parse(&text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p.render(), text);
        assert!(verify_hash(p.hash_of("alice").unwrap(), b"a"));
        assert!(!verify_hash(p.hash_of("bob").unwrap(), b"a"));
        assert_eq!(p.hash_of("carol"), None);
    }

    #[test]
    fn set_replaces_in_place_and_remove_reindexes() {
        let mut p = Passwords::parse(&format!(
            "alice:{}\nbob:{}\n",
            quick_hash(b"a"),
            quick_hash(b"b")
        ))
        .unwrap();
        p.set("alice", b"new").unwrap();
        assert!(p.render().starts_with("alice:$argon2id$"));
        assert!(verify_hash(p.hash_of("alice").unwrap(), b"new"));
        assert!(p.remove("alice"));
        assert!(!p.remove("alice"));
        assert!(verify_hash(p.hash_of("bob").unwrap(), b"b"));
        p.set("carol", b"c").unwrap();
        assert_eq!(p.render().lines().count(), 2);
        assert!(p.set("a:b", b"x").is_err());
        assert!(p.set("", b"x").is_err());
    }

    #[test]
    fn bad_files_say_which_line() {
        let good = quick_hash(b"a");
        for (text, line, word) in [
            ("alice\n".to_string(), 1, "USER:HASH"),
            (format!("alice:{good}\nalice:{good}\n"), 2, "twice"),
            (":x\n".to_string(), 1, "empty user"),
            ("u:$7$101$abc$def\n".to_string(), 1, "mosquitto_passwd"),
            ("u:$6$abc$def\n".to_string(), 1, "mosquitto_passwd"),
            ("u:plain\n".to_string(), 1, "PHC"),
            (
                "u:$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E\n"
                    .to_string(),
                1,
                "only Argon2",
            ),
            (
                "u:$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG\n"
                    .to_string(),
                1,
                "above the limit",
            ),
        ] {
            let e = Passwords::parse(&text).unwrap_err();
            assert_eq!(e.line, line, "{text}");
            assert!(e.message.contains(word), "{text}: {e}");
        }
    }

    #[test]
    fn save_is_private_and_atomic() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut p = Passwords::default();
        p.set("alice", b"a").unwrap();
        p.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = Passwords::load(&path).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp left"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(":a\n"), "never the password itself");
    }
}
