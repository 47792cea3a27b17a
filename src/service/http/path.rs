//! Mapping a request target to a file under the root, safely.
//!
//! Two locks, either of which alone would hold:
//!
//! 1. [`parse`]: the path is split on `/` *before* percent-decoding, and each segment is
//!    decoded exactly once; a segment that decodes to `..`, or contains `/`, `\0` or `\\`,
//!    is refused, so `%2e%2e`, `%2f`, `..%2f` and double encodings (`%252e` decodes to the
//!    literal text `%2e`, a harmless name) cannot climb out.
//! 2. [`open`]: the file is opened relative to the root's descriptor with `openat2(2)` and
//!    `RESOLVE_BENEATH`: the kernel refuses (`EXDEV`) any resolution that would leave the
//!    root, through `..` or through a symlink, and does so atomically with the open (no
//!    window between a check and the open). `--follow-symlinks` drops that flag, so links
//!    pointing out are served; `..` is still refused by the parser.

use std::os::fd::OwnedFd;
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
    /// The server is out of descriptors or memory (`EMFILE`, `ENFILE`, `ENOMEM`): 503.
    Unavailable,
}

/// Whether an error means the server ran out of descriptors or memory (not the client's
/// fault, and not "forbidden").
pub fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// A request target, checked and decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The path relative to the root (empty for the root itself).
    pub rel: PathBuf,
    /// The decoded path as the client named it (for listings and redirects), always
    /// starting with `/`.
    pub shown: String,
    /// Whether the target ended with `/`.
    pub trailing_slash: bool,
}

impl Target {
    /// The path percent-encoded from its raw bytes, starting with `/` and without a trailing
    /// one: what a `Location` must say so that it leads back here, also for names that are
    /// not UTF-8.
    pub fn encoded(&self) -> String {
        use std::os::unix::ffi::OsStrExt;
        let mut s = String::new();
        for c in self.rel.components() {
            s.push('/');
            s.push_str(&encode(c.as_os_str().as_bytes()));
        }
        s
    }
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

/// Check and decode `target` into a path relative to the root.
///
/// # Errors
/// A [`Refusal`] naming the status to answer.
pub fn parse(target: &str) -> Result<Target, Refusal> {
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
    Ok(Target {
        rel,
        shown,
        trailing_slash,
    })
}

/// Open `rel` (from [`parse`]) beneath the directory `root` for reading.
///
/// # Errors
/// [`Refusal::NotFound`] for nothing there, [`Refusal::Forbidden`] for no permission or a
/// path that would leave the root.
pub fn open(
    root: &OwnedFd,
    rel: &Path,
    follow_symlinks: bool,
) -> Result<(std::fs::File, std::fs::Metadata), Refusal> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK);
    if !follow_symlinks {
        how = how.resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    }
    let fd = nix::fcntl::openat2(root, rel, how).map_err(|e| match e {
        nix::errno::Errno::ENOENT
        | nix::errno::Errno::ENOTDIR
        | nix::errno::Errno::ENAMETOOLONG => Refusal::NotFound,
        nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE | nix::errno::Errno::ENOMEM => {
            Refusal::Unavailable
        }
        _ => Refusal::Forbidden, // EACCES, EPERM, EXDEV (would leave the root), ELOOP...
    })?;
    let file = std::fs::File::from(fd);
    // O_NONBLOCK only kept open() from hanging on a FIFO; reads of regular files ignore it.
    let meta = file.metadata().map_err(|_| Refusal::Forbidden)?;
    Ok((file, meta))
}

/// Open the root directory, for [`open`].
///
/// # Errors
/// The root cannot be opened as a directory.
pub fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    Ok(fd)
}

/// Percent-encode a name's raw bytes for use in a link (everything but unreserved
/// characters), so that names that are not UTF-8 still lead back to themselves.
pub fn encode(name: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(name.len());
    for &b in name {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, PathBuf, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), b"a").unwrap();
        std::fs::write(root.join("sub/b c.txt"), b"b").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("rel-out")).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("in")).unwrap();
        let fd = open_root(&root).unwrap();
        (dir, root, fd)
    }

    fn get(fd: &OwnedFd, target: &str, follow: bool) -> Result<Vec<u8>, Refusal> {
        let t = parse(target)?;
        let (mut f, meta) = open(fd, &t.rel, follow)?;
        if meta.is_dir() {
            return Ok(b"<dir>".to_vec());
        }
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).unwrap();
        Ok(v)
    }

    #[test]
    fn ordinary_paths_resolve() {
        let (_d, _root, fd) = tree();
        assert_eq!(get(&fd, "/a.txt", false).unwrap(), b"a");
        assert_eq!(get(&fd, "/sub/b%20c.txt?x=1#f", false).unwrap(), b"b");
        assert_eq!(get(&fd, "http://h/a.txt", false).unwrap(), b"a");
        assert_eq!(get(&fd, "/", false).unwrap(), b"<dir>");
        let t = parse("/sub/").unwrap();
        assert!(t.trailing_slash);
        assert_eq!(t.shown, "/sub/");
        assert_eq!(
            get(&fd, "/in", false).unwrap(),
            b"a",
            "a symlink inside the root is fine"
        );
        assert_eq!(get(&fd, "/nope", false), Err(Refusal::NotFound));
        assert_eq!(get(&fd, "a.txt", false), Err(Refusal::BadRequest));
        assert_eq!(get(&fd, "/%zz", false), Err(Refusal::BadRequest));
    }

    #[test]
    fn traversal_attempts_never_leave_the_root() {
        let (_d, _root, fd) = tree();
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
            "/rel-out",
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
            match get(&fd, a, false) {
                Ok(v) => assert!(v != b"s", "{a} reached the secret"),
                Err(e) => assert!(
                    matches!(
                        e,
                        Refusal::Forbidden | Refusal::NotFound | Refusal::BadRequest
                    ),
                    "{a}: {e:?}"
                ),
            }
        }
        assert_eq!(
            get(&fd, "/out", false),
            Err(Refusal::Forbidden),
            "symlink out refused by the kernel"
        );
        assert_eq!(get(&fd, "/rel-out", false), Err(Refusal::Forbidden));
        // With --follow-symlinks the links out are served; `..` is still refused.
        assert_eq!(get(&fd, "/out", true).unwrap(), b"s");
        assert_eq!(get(&fd, "/rel-out", true).unwrap(), b"s");
        assert!(get(&fd, "/%2e%2e/secret", true).is_err());
    }

    #[test]
    fn links_are_encoded() {
        assert_eq!(encode(b"b c&d<e>.txt"), "b%20c%26d%3Ce%3E.txt");
        assert_eq!(encode(b"caf\xe9"), "caf%E9");
        let t = parse("/a%20b/caf%E9").unwrap();
        assert_eq!(t.encoded(), "/a%20b/caf%E9");
        assert_eq!(parse(&t.encoded()).unwrap().rel, t.rel);
        assert_eq!(parse("/").unwrap().encoded(), "");
    }
}
