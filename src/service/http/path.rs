//! Mapping a request target to a file under the root, safely.
//!
//! The rules: the path is split on `/` *before* percent-decoding, and each segment is
//! decoded exactly once; a segment that decodes to `..`, or contains `/`, `\0` or `\\`, is
//! refused, so `%2e%2e`, `%2f`, `..%2f` and double encodings (`%252e` decodes to the literal
//! text `%2e`, a harmless name) cannot climb out. The joined path is then resolved with
//! `canonicalize`, and a result outside the root (a symlink pointing out) is refused unless
//! symlinks may be followed.

use std::path::{Path, PathBuf};

/// Why a target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a path this server can parse (bad escape, not origin-form): 400.
    BadRequest,
    /// An attempt to leave the root, or a path that is not allowed: 403.
    Forbidden,
    /// Nothing there: 404.
    NotFound,
}

/// A target resolved under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The file or directory on disk.
    pub path: PathBuf,
    /// The decoded path as the client named it (for listings and redirects), always
    /// starting with `/`.
    pub shown: String,
    /// Whether the target ended with `/`.
    pub trailing_slash: bool,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decode one segment.
fn decode(seg: &str) -> Result<Vec<u8>, Refusal> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&x| hex(x)),
                b.get(i + 2).and_then(|&x| hex(x)),
            ) else {
                return Err(Refusal::BadRequest);
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The path part of a request target (origin-form `/a/b?q`, or absolute-form
/// `http://host/a/b`), without query or fragment.
pub fn target_path(target: &str) -> Result<&str, Refusal> {
    let path = if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        }
    } else {
        target
    };
    if !path.starts_with('/') {
        return Err(Refusal::BadRequest);
    }
    let end = path.find(['?', '#']).unwrap_or(path.len());
    Ok(&path[..end])
}

/// Resolve `target` under `root` (which must be canonical).
///
/// # Errors
/// A [`Refusal`] naming the status to answer.
pub fn resolve(root: &Path, target: &str, follow_symlinks: bool) -> Result<Resolved, Refusal> {
    use std::os::unix::ffi::OsStrExt;
    let raw = target_path(target)?;
    let mut rel = PathBuf::new();
    let mut shown = String::from("/");
    for seg in raw.split('/') {
        if seg.is_empty() {
            continue;
        }
        let d = decode(seg)?;
        if d.is_empty() || d == b"." {
            continue;
        }
        if d == b".." || d.iter().any(|&c| c == b'/' || c == 0 || c == b'\\') {
            return Err(Refusal::Forbidden);
        }
        rel.push(std::ffi::OsStr::from_bytes(&d));
        shown.push_str(&String::from_utf8_lossy(&d));
        shown.push('/');
    }
    let trailing_slash = raw.ends_with('/');
    if !trailing_slash && shown.len() > 1 {
        shown.pop();
    }
    let joined = root.join(&rel);
    let real = match std::fs::canonicalize(&joined) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Refusal::Forbidden)
        }
        Err(_) => return Err(Refusal::NotFound),
    };
    if !real.starts_with(root) && !follow_symlinks {
        return Err(Refusal::Forbidden);
    }
    Ok(Resolved {
        path: real,
        shown,
        trailing_slash,
    })
}

/// Percent-encode a name for use in a link (everything but unreserved characters).
pub fn encode(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), b"a").unwrap();
        std::fs::write(root.join("sub/b c.txt"), b"b").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink(root.join("a.txt"), root.join("in")).unwrap();
        let root = std::fs::canonicalize(root).unwrap();
        (dir, root)
    }

    #[test]
    fn ordinary_paths_resolve() {
        let (_d, root) = tree();
        assert_eq!(
            resolve(&root, "/a.txt", false).unwrap().path,
            root.join("a.txt")
        );
        assert_eq!(
            resolve(&root, "/sub/b%20c.txt?x=1#f", false).unwrap().path,
            root.join("sub/b c.txt")
        );
        assert_eq!(
            resolve(&root, "http://h/a.txt", false).unwrap().path,
            root.join("a.txt")
        );
        let d = resolve(&root, "/sub/", false).unwrap();
        assert!(d.trailing_slash);
        assert_eq!(d.shown, "/sub/");
        assert_eq!(
            resolve(&root, "/in", false).unwrap().path,
            root.join("a.txt")
        );
        assert_eq!(resolve(&root, "/nope", false), Err(Refusal::NotFound));
        assert_eq!(resolve(&root, "a.txt", false), Err(Refusal::BadRequest));
        assert_eq!(resolve(&root, "/%zz", false), Err(Refusal::BadRequest));
    }

    #[test]
    fn traversal_attempts_never_leave_the_root() {
        let (_d, root) = tree();
        let attempts = [
            "/../secret",
            "/..",
            "/../",
            "/sub/../../secret",
            "/%2e%2e/secret",
            "/%2E%2E/secret",
            "/.%2e/secret",
            "/%2e./secret",
            "/sub/%2e%2e/%2e%2e/secret",
            "/..%2fsecret",
            "/%2f..%2fsecret",
            "/sub%2f..%2f..%2fsecret",
            "/..%5csecret",
            "/%2e%2e%5csecret",
            "/a.txt%00.html",
            "/%00",
            "/out",
            "/sub/../out",
            "/%252e%252e/secret",
            "/%25%32%65%25%32%65/secret",
            "/....//secret",
            "/.../secret",
            "http://h/../secret",
            "/sub/..%2F..%2Fsecret",
            "/%c0%ae%c0%ae/secret",
            "/..;/secret",
            "/%2e%2e%2f%2e%2e%2fsecret",
            "//../secret",
            "/./../secret",
            "/sub/./../../secret",
            "/%2e%2e",
            "/%2E%2e/%2e%2E/secret",
        ];
        assert!(attempts.len() >= 30);
        for a in attempts {
            match resolve(&root, a, false) {
                Ok(r) => assert!(r.path.starts_with(&root), "{a} escaped to {:?}", r.path),
                Err(e) => assert!(
                    matches!(
                        e,
                        Refusal::Forbidden | Refusal::NotFound | Refusal::BadRequest
                    ),
                    "{a}: {e:?}"
                ),
            }
        }
        // With --follow-symlinks the outside link is served; traversal is still refused.
        assert!(resolve(&root, "/out", true).is_ok());
        assert!(resolve(&root, "/%2e%2e/secret", true).is_err());
    }

    #[test]
    fn links_are_encoded() {
        assert_eq!(encode("b c&d<e>.txt"), "b%20c%26d%3Ce%3E.txt");
    }
}
