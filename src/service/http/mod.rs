//! HTTP/1.1 static files, sans-IO: requests in, responses (head bytes + a file region) out.
//!
//! - GET and HEAD; keep-alive by default in HTTP/1.1, `Connection: close` honoured; HTTP/1.0
//!   closes unless it asks for keep-alive; pipelined requests are answered in order.
//! - Requests are parsed with `httparse`. Limits: request line 8 KiB (414), head 16 KiB or
//!   64 headers (431), a body (skipped: GET and HEAD have no use for one) 64 KiB (413). A
//!   request head must arrive within `--header-timeout` of its first byte (408), so a slow
//!   client cannot hold a connection with a half-sent request.
//! - Framing is strict (RFC 9112): an invalid `Content-Length`, or several that differ, is
//!   400 and close (no request smuggling); an HTTP/1.1 request needs exactly one valid
//!   `Host` (400 otherwise); any `Transfer-Encoding` is 501 and close.
//! - Responses carry `Date`, `Server`, `Content-Type` ([`mime`]), `Content-Length`,
//!   `Last-Modified` (when the file's time can be written as an HTTP date), `ETag`,
//!   `Accept-Ranges`. Conditional requests and one byte range ([`conditional`]): 412, 304,
//!   206 with `Content-Range` (only while `If-Range` still names the file), 416.
//! - Directories: `index.html` if present, else a listing ([`listing`]) read from the
//!   directory's own descriptor; a directory named without its trailing slash is
//!   redirected (301), its `Location` made from the name's raw bytes.
//! - Errors have small HTML bodies: 400, 403, 404, 405 (with `Allow`), 408, 412, 413, 414,
//!   416, 431, 501, 503 (the server is out of descriptors or memory).
//! - The root cannot be left ([`path`]).
//! - Bounded output: pipelined requests are answered only while the connection's queued
//!   output is under [`QUEUE_BYTES`], [`QUEUE_FILES`] open files and [`QUEUE_RESPONSES`]
//!   answers; past that the rest of the input waits ([`Http::has_backlog`]) and the model
//!   stops reading the connection until the output drains and it calls [`Http::resume`].
//!
//! File bodies are queued as file regions ([`Outbox::push_file`]), so every model sends
//! them with the chosen strategy and a 1 GiB file never sits in memory.

pub mod cache;
pub mod conditional;
pub mod listing;
pub mod mime;
pub mod path;

pub use conditional::{parse_range, Range};

use crate::output::Outbox;
use conditional::{Conditions, Outcome, Validators};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Longest request line accepted (414 beyond).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Longest request head accepted (431 beyond).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted (431 beyond).
pub const MAX_HEADERS: usize = 64;
/// Largest request body skipped (413 and close beyond): GET and HEAD have no use for one.
pub const MAX_BODY: u64 = 64 * 1024;
/// Pipelined requests wait while this many bytes of answers are queued in memory.
pub const QUEUE_BYTES: usize = 256 * 1024;
/// Pipelined requests wait while this many file bodies (open files) are queued.
pub const QUEUE_FILES: usize = 4;
/// Pipelined requests wait while this many answers are queued.
pub const QUEUE_RESPONSES: usize = 32;
/// A request buffer this large is freed, not kept, once empty.
const KEEP_BUF: usize = 8 * 1024;

/// What the HTTP service serves and how.
#[derive(Debug)]
pub struct HttpConfig {
    /// The served directory, canonical (symlinks resolved); for messages.
    pub root: PathBuf,
    /// The served directory, opened: every file is opened relative to it ([`path::open`]).
    pub root_fd: std::os::fd::OwnedFd,
    /// Serve symlinks that point outside the root.
    pub follow_symlinks: bool,
    /// Time allowed for a request head, from its first byte.
    pub header_timeout: Duration,
    /// Complete answers for small files ([`cache`]).
    pub cache: cache::Cache,
}

/// The state of one HTTP connection.
#[derive(Debug)]
pub struct Http {
    config: Arc<HttpConfig>,
    /// Bytes of the request head(s) received and not yet answered.
    buf: Vec<u8>,
    /// Request body bytes still to skip (a GET with a `Content-Length`).
    skip: u64,
    /// When the first byte of the request being received arrived.
    started: Option<Instant>,
    /// A response that ends the connection has been queued.
    closing: bool,
    /// Requests wait in `buf` because the output queue is full: the model must flush it and
    /// call [`Http::resume`] before reading more.
    held: bool,
    /// Answers queued since the output queue was last seen empty.
    batch: usize,
    /// The cache entry validated since input last arrived ([`cache::Cache::serve`]).
    checked: cache::Checked,
}

struct Response {
    status: u16,
    headers: String,
    body: Body,
}

enum Body {
    None,
    Html(String),
    /// A small file's contents, read to be cached ([`Fill`]).
    Cached(Fill),
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        len: u64,
    },
}

/// A small file read whole for the cache: its contents and its state when read.
struct Fill {
    path: Vec<u8>,
    stamp: cache::Stamp,
    body: Vec<u8>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Seconds since the epoch now (0 if the clock is before 1970).
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Call `f` with the `Date` header line for now (`Date: ...` and CRLF), formatted once per
/// second per thread; `None` if the clock is past year 9999: then no `Date` is sent, as RFC
/// 9110 §6.6.1 allows a server without a usable clock.
fn with_date_line<R>(f: impl FnOnce(Option<&str>) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static CACHE: RefCell<(u64, Option<String>)> = const { RefCell::new((u64::MAX, None)) };
    }
    let secs = now_secs();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            *c = (
                secs,
                conditional::http_date(secs).map(|d| format!("Date: {d}\r\n")),
            );
        }
        f(c.1.as_deref())
    })
}

/// Queue a cached answer: the status line, `Date`, the entry's fields, the connection's own
/// `Connection` field, and the body unless `head_only`.
fn write_cached(
    out: &mut Outbox,
    e: &cache::Entry,
    head_only: bool,
    close: bool,
    http10_keepalive: bool,
) {
    out.push_bytes(b"HTTP/1.1 200 OK\r\n");
    with_date_line(|d| out.push_bytes(d.unwrap_or_default().as_bytes()));
    out.push_bytes(e.fields());
    if close {
        out.push_bytes(b"Connection: close\r\n");
    } else if http10_keepalive {
        out.push_bytes(b"Connection: keep-alive\r\n");
    }
    out.push_bytes(b"\r\n");
    if !head_only {
        out.push_bytes(e.body());
    }
}

/// Escape text for HTML.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn error(status: u16) -> Response {
    let r = reason(status);
    Response {
        status,
        headers: String::new(),
        body: Body::Html(format!(
            "<!DOCTYPE html><html><head><title>{status} {r}</title></head><body><h1>{status} {r}</h1></body></html>\n"
        )),
    }
}

/// Whether a `Host` value is `uri-host [ ":" port ]` made of the characters RFC 3986 allows
/// there (an empty value is valid: RFC 9112 §3.2).
fn valid_host(value: &[u8]) -> bool {
    value.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// The body length the `Content-Length` fields declare: `Ok(None)` without one; an error
/// for an invalid value or values that differ (RFC 9112 §6.3: the framing is unknown).
/// Several fields, or a list, of one same value are that value (RFC 9110 §8.6).
fn content_length<'h>(fields: impl Iterator<Item = &'h [u8]>) -> Result<Option<u64>, ()> {
    let mut len = None;
    for field in fields {
        let text = std::str::from_utf8(field).map_err(|_| ())?;
        for item in text.split(',') {
            let n = conditional::digits(item.trim_matches([' ', '\t'])).ok_or(())?;
            if len.is_some_and(|l| l != n) {
                return Err(());
            }
            len = Some(n);
        }
    }
    Ok(len)
}

/// What the server needs from a parsed request head, borrowed from the request buffer
/// (nothing is allocated unless a conditional or range header is present).
struct Head<'b> {
    method: &'b str,
    target: &'b str,
    minor: u8,
    keep_alive: bool,
    hosts: usize,
    host_valid: bool,
    transfer_encoding: bool,
    content_length: Result<Option<u64>, ()>,
    conditions: Conditions,
}

impl<'b> Head<'b> {
    fn new(req: &httparse::Request<'_, 'b>) -> Head<'b> {
        let all = |name: &'static str| {
            req.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        // A list header's lines, joined as one comma-separated value.
        let list = |name: &'static str| {
            let mut fields = all(name).peekable();
            fields.peek()?;
            let parts: Vec<String> = fields
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            Some(parts.join(", "))
        };
        // Whether a `Connection` token (in any of its lines) is `token`.
        let connection = |token: &str| {
            all("connection").any(|v| {
                v.split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
            })
        };
        let minor = req.version.unwrap_or(1);
        let keep_alive = if minor == 0 {
            connection("keep-alive")
        } else {
            !connection("close")
        };
        Head {
            method: req.method.unwrap_or(""),
            target: req.path.unwrap_or(""),
            minor,
            keep_alive,
            hosts: all("host").count(),
            host_valid: all("host").all(valid_host),
            transfer_encoding: all("transfer-encoding").next().is_some(),
            content_length: content_length(all("content-length")),
            conditions: Conditions {
                if_match: list("if-match"),
                if_none_match: list("if-none-match"),
                if_modified_since: list("if-modified-since"),
                if_unmodified_since: list("if-unmodified-since"),
                if_range: list("if-range"),
                range: list("range"),
            },
        }
    }
}

impl Http {
    /// A new connection's session.
    pub fn new(config: Arc<HttpConfig>) -> Http {
        Http {
            config,
            buf: Vec::new(),
            skip: 0,
            started: None,
            closing: false,
            held: false,
            batch: 0,
            checked: cache::Checked::default(),
        }
    }

    /// Whether the connection must close once its output is flushed.
    pub fn done(&self) -> bool {
        self.closing
    }

    /// Whether a request has started arriving and is not answered yet.
    pub fn mid_request(&self) -> bool {
        !self.buf.is_empty() || self.skip > 0
    }

    /// Bytes of an unanswered request received so far (for error reports).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether received requests wait for the output queue to drain: read nothing more from
    /// the connection, flush, then call [`Http::resume`].
    pub fn has_backlog(&self) -> bool {
        self.held && !self.closing
    }

    /// The output queue drained: answer the requests that waited (up to the bound again).
    pub fn resume(&mut self, out: &mut Outbox) {
        if !self.held {
            return;
        }
        self.held = false;
        self.checked.forget();
        self.process(out);
        if !self.buf.is_empty() && !self.held {
            // What is left is an incomplete request: its time starts now, not while it
            // waited behind answers the client was slow to read.
            self.started = Some(Instant::now());
        }
    }

    /// The time by which the current request head must be complete (none while requests
    /// wait for the output to drain: that is the idle timeout's business).
    pub fn deadline(&self) -> Option<Instant> {
        if self.held {
            return None;
        }
        self.started.map(|t| t + self.config.header_timeout)
    }

    /// The request head did not arrive in time: answer 408 and close.
    pub fn on_deadline(&mut self, out: &mut Outbox) {
        if !self.closing {
            self.send(out, error(408), false, true, "-", "-", Instant::now());
        }
        self.buf.clear();
        self.started = None;
    }

    /// Consume received bytes, answering complete requests in order while the output queue
    /// is under its bounds; the rest waits (see [`Http::has_backlog`]).
    pub fn receive(&mut self, mut input: &[u8], out: &mut Outbox) {
        if self.closing {
            return; // nothing after a closing response is read
        }
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(input.len());
            self.skip -= n as u64;
            input = &input[n..];
        }
        if input.is_empty() {
            return;
        }
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
        self.buf.extend_from_slice(input);
        self.checked.forget();
        if !self.held {
            self.process(out);
        }
    }

    /// Answer the complete requests in the buffer while the output queue has room.
    fn process(&mut self, out: &mut Outbox) {
        while !self.closing && !self.buf.is_empty() {
            if out.is_empty() {
                self.batch = 0;
            }
            if out.memory() >= QUEUE_BYTES
                || out.files() >= QUEUE_FILES
                || self.batch >= QUEUE_RESPONSES
            {
                self.held = true;
                break;
            }
            if !self.one_request(out) {
                break;
            }
        }
        if self.buf.is_empty() {
            self.started = None;
            if self.buf.capacity() > KEEP_BUF {
                self.buf = Vec::new();
            }
        }
    }

    /// Answer the first request in the buffer if it is complete; `false` if more bytes are
    /// needed (or the connection is closing).
    fn one_request(&mut self, out: &mut Outbox) -> bool {
        // The request is parsed in place: the buffer is lent out while it is answered.
        let mut buf = std::mem::take(&mut self.buf);
        let more = self.answer_first(&mut buf, out);
        if !self.closing {
            self.buf = buf;
        }
        more
    }

    fn answer_first(&mut self, buf: &mut Vec<u8>, out: &mut Outbox) -> bool {
        // The request line ends at the first LF (a CR before it belongs to the line end:
        // httparse accepts bare LF line ends, and so must this check).
        let line_len = match buf.iter().position(|&b| b == b'\n') {
            Some(e) if e > 0 && buf[e - 1] == b'\r' => e - 1,
            Some(e) => e,
            None => buf.len(),
        };
        if line_len > MAX_REQUEST_LINE {
            self.send(out, error(414), false, true, "-", "-", Instant::now());
            return false;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    self.send(out, error(431), false, true, "-", "-", Instant::now());
                }
                return false;
            }
            Err(httparse::Error::TooManyHeaders) => {
                self.send(out, error(431), false, true, "-", "-", Instant::now());
                return false;
            }
            Err(_) => {
                self.send(out, error(400), false, true, "-", "-", Instant::now());
                return false;
            }
        };
        if head_len > MAX_HEAD {
            self.send(out, error(431), false, true, "-", "-", Instant::now());
            return false;
        }
        let t0 = Instant::now();
        let head = Head::new(&req);
        let (method, target) = (head.method, head.target);
        let rest = buf.len() - head_len;

        // Framing and routing errors: the rest of the stream cannot be trusted, so these
        // answers close the connection (see `send_full`).
        let refused = if head.hosts > 1 || (head.minor == 1 && head.hosts == 0) || !head.host_valid
        {
            Some(400)
        } else if head.transfer_encoding {
            Some(501)
        } else {
            match head.content_length {
                Err(()) => Some(400),
                Ok(Some(n)) if n > MAX_BODY => Some(413),
                Ok(_) => None,
            }
        };
        if let Some(status) = refused {
            self.send(out, error(status), false, true, method, target, t0);
            return false;
        }
        // The body (skipped) follows the head: as much of it as arrived goes with the head.
        let mut consumed = head_len;
        if let Ok(Some(n)) = head.content_length {
            let here = usize::try_from(n).unwrap_or(usize::MAX).min(rest);
            consumed += here;
            self.skip = n - here as u64;
        }
        let head_only = method == "HEAD";
        let close = !head.keep_alive;
        let http10_keepalive = head.minor == 0 && head.keep_alive;
        if (method == "GET" || head_only) && head.conditions.is_empty() {
            let hit = self.config.cache.serve(
                target.as_bytes(),
                &self.config.root_fd,
                &mut self.checked,
                |e| write_cached(out, e, head_only, close, http10_keepalive),
            );
            if hit {
                tracing::debug!(
                    method,
                    path = target,
                    status = 200,
                    cached = true,
                    micros = t0.elapsed().as_micros() as u64,
                    "http"
                );
                self.batch += 1;
                if close {
                    self.closing = true;
                    self.held = false;
                }
                return self.consumed(buf, consumed, t0);
            }
        }
        let response = if method != "GET" && !head_only {
            let mut r = error(405);
            r.headers.push_str("Allow: GET, HEAD\r\n");
            r
        } else {
            self.respond(target, &head.conditions, !head_only)
        };
        self.send_full(
            out,
            response,
            head_only,
            close,
            http10_keepalive,
            method,
            target,
            t0,
        );
        self.consumed(buf, consumed, t0)
    }

    /// The first `n` bytes of `buf` were a request (and as much of its body as arrived):
    /// drop them; the next request's time starts at `t0` if its bytes are already here.
    /// Returns whether the next request may be looked at.
    fn consumed(&mut self, buf: &mut Vec<u8>, n: usize, t0: Instant) -> bool {
        buf.drain(..n);
        self.started = if buf.is_empty() { None } else { Some(t0) };
        self.skip == 0
    }

    fn respond(&self, target: &str, conditions: &Conditions, get: bool) -> Response {
        use path::Refusal;
        let refused = |r: Refusal| match r {
            Refusal::BadRequest => error(400),
            Refusal::Forbidden => error(403),
            Refusal::NotFound => error(404),
            Refusal::Unavailable => {
                let mut r = error(503);
                r.headers.push_str("Retry-After: 1\r\n");
                r
            }
        };
        let t = match path::parse(target) {
            Ok(t) => t,
            Err(r) => return refused(r),
        };
        let follow = self.config.follow_symlinks;
        let (file, meta, name) = match path::open(&self.config.root_fd, &t.rel, follow) {
            Err(r) => return refused(r),
            Ok((dir, meta)) if meta.is_dir() => {
                if !t.trailing_slash {
                    let mut r = error(301);
                    let query = target.find('?').map_or("", |i| &target[i..]);
                    let _ = write!(r.headers, "Location: {}/{query}\r\n", t.encoded());
                    return r;
                }
                // index.html is looked up beneath the root again (a symlink to a sibling
                // page stays allowed); whatever that finds is beneath the root.
                let index = t.rel.join("index.html");
                match path::open(&self.config.root_fd, &index, follow) {
                    Ok((f, m)) if m.is_file() => (f, m, index),
                    Err(Refusal::Unavailable) => return refused(Refusal::Unavailable),
                    _ => {
                        // The listing reads the directory that was opened and checked, by
                        // its descriptor: never a path that could be swapped meanwhile.
                        return match listing::render(dir, &t.shown) {
                            Ok(html) => Response {
                                status: 200,
                                headers: String::new(),
                                body: Body::Html(html),
                            },
                            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                                error(403)
                            }
                            Err(e) if path::out_of_resources(&e) => refused(Refusal::Unavailable),
                            Err(_) => error(404),
                        };
                    }
                }
            }
            Ok((f, m)) if m.is_file() => (f, m, t.rel.clone()),
            Ok(_) => return error(403), // devices, FIFOs, sockets are not served
        };
        let size = meta.len();
        let secs = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let last_modified = conditional::http_date(secs);
        let etag = {
            use std::os::unix::fs::MetadataExt;
            format!(
                "\"{:x}-{:x}-{:x}\"",
                meta.ino(),
                size,
                (meta.mtime_nsec() as u64) ^ (secs << 20)
            )
        };
        let mut headers = format!(
            "Content-Type: {}\r\n",
            mime::content_type(&name.to_string_lossy())
        );
        if let Some(lm) = &last_modified {
            let _ = write!(headers, "Last-Modified: {lm}\r\n");
        }
        let _ = write!(headers, "ETag: {etag}\r\nAccept-Ranges: bytes\r\n");
        let validators = Validators {
            etag: &etag,
            modified: last_modified.is_some().then_some(secs),
            now: now_secs(),
        };
        let file = Arc::new(file);
        match conditional::evaluate(conditions, &validators, size, get) {
            Outcome::PreconditionFailed => error(412),
            Outcome::NotModified => Response {
                status: 304,
                headers,
                body: Body::None,
            },
            Outcome::Send(Range::Whole) => Response {
                status: 200,
                headers,
                body: match self.fill(target, conditions, get, &file, &meta, &name) {
                    Some(fill) => Body::Cached(fill),
                    None => Body::File {
                        file,
                        offset: 0,
                        len: size,
                    },
                },
            },
            Outcome::Send(Range::Part(a, b)) => {
                let _ = write!(headers, "Content-Range: bytes {a}-{b}/{size}\r\n");
                Response {
                    status: 206,
                    headers,
                    body: Body::File {
                        file,
                        offset: a,
                        len: b - a + 1,
                    },
                }
            }
            Outcome::Send(Range::Unsatisfiable) => {
                let mut r = error(416);
                let _ = write!(r.headers, "Content-Range: bytes */{size}\r\n");
                r
            }
        }
    }

    /// A small file the cache wants, read whole: unless it changed while it was read.
    fn fill(
        &self,
        target: &str,
        conditions: &Conditions,
        get: bool,
        file: &std::fs::File,
        meta: &std::fs::Metadata,
        name: &std::path::Path,
    ) -> Option<Fill> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::FileExt;
        let stamp = cache::Stamp::of_meta(meta);
        let size = meta.len();
        if !get
            || !conditions.is_empty()
            || !self.config.cache.wants(target.as_bytes(), size, &stamp)
        {
            return None;
        }
        let mut body = vec![0u8; size as usize];
        file.read_exact_at(&mut body, 0).ok()?;
        let after = file.metadata().ok()?;
        (cache::Stamp::of_meta(&after) == stamp).then(|| Fill {
            path: name.as_os_str().as_bytes().to_vec(),
            stamp,
            body,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        out: &mut Outbox,
        r: Response,
        head_only: bool,
        close: bool,
        method: &str,
        target: &str,
        t0: Instant,
    ) {
        self.send_full(out, r, head_only, close, false, method, target, t0);
    }

    #[allow(clippy::too_many_arguments)]
    fn send_full(
        &mut self,
        out: &mut Outbox,
        r: Response,
        head_only: bool,
        close: bool,
        http10_keepalive: bool,
        method: &str,
        target: &str,
        t0: Instant,
    ) {
        // Errors in parsing leave the stream out of step: those always close.
        let close = close || (r.status >= 400 && !matches!(r.status, 403 | 404 | 405 | 412 | 416));
        let len = match &r.body {
            Body::None => 0,
            Body::Html(h) => h.len() as u64,
            Body::Cached(f) => f.body.len() as u64,
            Body::File { len, .. } => *len,
        };
        let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
        with_date_line(|d| head.push_str(d.unwrap_or_default()));
        // From here on the fields are the same for every request of this file.
        let fields = head.len();
        head.push_str("Server: socklab\r\n");
        head.push_str(&r.headers);
        if matches!(r.body, Body::Html(_)) {
            head.push_str("Content-Type: text/html; charset=utf-8\r\n");
        }
        if r.status != 304 {
            let _ = write!(head, "Content-Length: {len}\r\n");
        }
        if let Body::Cached(f) = &r.body {
            self.config.cache.insert(
                target.as_bytes(),
                &f.path,
                f.stamp,
                &head.as_bytes()[fields..],
                &f.body,
            );
        }
        if close {
            head.push_str("Connection: close\r\n");
        } else if http10_keepalive {
            head.push_str("Connection: keep-alive\r\n");
        }
        head.push_str("\r\n");
        out.push_bytes(head.as_bytes());
        if !head_only {
            match r.body {
                Body::None => {}
                Body::Html(h) => out.push_bytes(h.as_bytes()),
                Body::Cached(f) => out.push_bytes(&f.body),
                Body::File { file, offset, len } => out.push_file(file, offset, len),
            }
        }
        self.batch += 1;
        tracing::debug!(
            method,
            path = target,
            status = r.status,
            bytes = if head_only { 0 } else { len },
            micros = t0.elapsed().as_micros() as u64,
            "http"
        );
        if close {
            self.closing = true;
            self.held = false;
            self.buf = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> (tempfile::TempDir, Arc<HttpConfig>) {
        site_in(tempfile::tempdir().unwrap())
    }

    fn site_in(dir: tempfile::TempDir) -> (tempfile::TempDir, Arc<HttpConfig>) {
        std::fs::write(dir.path().join("hello.txt"), b"hello world").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/x<y>.txt"), b"x").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let cfg = HttpConfig {
            root_fd: path::open_root(&root).unwrap(),
            root,
            follow_symlinks: false,
            header_timeout: Duration::from_secs(10),
            cache: cache::Cache::new(1 << 20),
        };
        (dir, Arc::new(cfg))
    }

    fn run(cfg: &Arc<HttpConfig>, input: &[u8]) -> (String, bool) {
        let mut h = Http::new(cfg.clone());
        let mut out = Outbox::new();
        h.receive(input, &mut out);
        (
            String::from_utf8_lossy(&out.take_bytes()).into_owned(),
            h.done(),
        )
    }

    #[test]
    fn get_head_and_keepalive() {
        let (_d, cfg) = site();
        let (r, done) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("Content-Length: 11\r\n") && r.ends_with("\r\n\r\nhello world"),
            "{r}"
        );
        assert!(r.contains("Content-Type: text/plain"));
        assert!(!done);
        let (r, _) = run(&cfg, b"HEAD /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            r.contains("Content-Length: 11\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let (_, done) = run(&cfg, b"GET /hello.txt HTTP/1.0\r\n\r\n");
        assert!(done, "HTTP/1.0 closes");
        let (r, done) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        );
        assert!(!done && r.contains("Connection: keep-alive"));
        let (_, done) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(done);
    }

    #[test]
    fn pipelined_requests_answered_in_order_at_every_split() {
        let (_d, cfg) = site();
        let input =
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\nHEAD /d/ HTTP/1.1\r\nHost: x\r\n\r\n";
        let (whole, _) = run(&cfg, input);
        let statuses: Vec<&str> = whole.matches("HTTP/1.1 ").collect();
        assert_eq!(statuses.len(), 3);
        let order: Vec<usize> = ["200 OK", "404 Not Found", "200 OK"]
            .iter()
            .map(|s| whole.find(s).unwrap())
            .collect();
        assert!(order[0] < order[1], "{whole}");
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("Date:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        for cut in 0..=input.len() {
            let mut h = Http::new(cfg.clone());
            let mut out = Outbox::new();
            h.receive(&input[..cut], &mut out);
            h.receive(&input[cut..], &mut out);
            let got = String::from_utf8_lossy(&out.take_bytes()).into_owned();
            assert_eq!(strip(&got), strip(&whole), "split at {cut}");
        }
    }

    #[test]
    fn errors_and_limits() {
        let (_d, cfg) = site();
        let (r, _) = run(
            &cfg,
            b"POST /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab",
        );
        assert!(
            r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET, HEAD"),
            "{r}"
        );
        let (r, done) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 501") && done);
        let (r, done) = run(&cfg, b"NOT A REQUEST\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400") && done, "{r}");
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "a".repeat(MAX_REQUEST_LINE + 10)
        );
        let (r, _) = run(&cfg, long.as_bytes());
        assert!(r.starts_with("HTTP/1.1 414"), "{r}");
        let many: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
        let (r, _) = run(&cfg, format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "v".repeat(MAX_HEAD));
        let (r, _) = run(&cfg, big.as_bytes());
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        let (r, _) = run(&cfg, b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    }

    #[test]
    fn directories_redirect_list_and_escape() {
        let (_d, cfg) = site();
        let (r, _) = run(&cfg, b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 301") && r.contains("Location: /d/\r\n"),
            "{r}"
        );
        let (r, _) = run(&cfg, b"GET /d/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200")
                && r.contains("x&lt;y&gt;.txt")
                && r.contains("href=\"x%3Cy%3E.txt\""),
            "{r}"
        );
        assert!(!r.contains("<y>"));
    }

    #[test]
    fn conditional_and_ranges() {
        let (_d, cfg) = site();
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n");
        let etag = r
            .lines()
            .find_map(|l| l.strip_prefix("ETag: "))
            .unwrap()
            .to_string();
        let lm = r
            .lines()
            .find_map(|l| l.strip_prefix("Last-Modified: "))
            .unwrap()
            .to_string();
        let (r, _) = run(
            &cfg,
            format!("GET /hello.txt HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n")
                .as_bytes(),
        );
        assert!(
            r.starts_with("HTTP/1.1 304") && !r.contains("hello world"),
            "{r}"
        );
        let (r, _) = run(
            &cfg,
            format!("GET /hello.txt HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: {lm}\r\n\r\n")
                .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 304"), "{r}");
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=6-\r\n\r\n",
        );
        assert!(
            r.starts_with("HTTP/1.1 206")
                && r.contains("Content-Range: bytes 6-10/11")
                && r.ends_with("world"),
            "{r}"
        );
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=-5\r\n\r\n",
        );
        assert!(r.ends_with("\r\n\r\nworld"), "{r}");
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=0-4\r\n\r\n",
        );
        assert!(r.ends_with("\r\n\r\nhello"), "{r}");
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=20-\r\n\r\n",
        );
        assert!(
            r.starts_with("HTTP/1.1 416") && r.contains("Content-Range: bytes */11"),
            "{r}"
        );
    }

    #[test]
    fn a_far_future_modification_time_is_served_without_panicking() {
        // ext4 stops at year 2446; tmpfs keeps a time past 9999.
        let (d, cfg) = site_in(tempfile::tempdir_in("/dev/shm").unwrap());
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("hello.txt"))
            .unwrap();
        let future = SystemTime::UNIX_EPOCH + Duration::from_secs(253_436_860_800);
        f.set_modified(future).unwrap();
        assert_eq!(f.metadata().unwrap().modified().unwrap(), future);
        for _ in 0..2 {
            let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
            assert!(r.ends_with("hello world"), "{r}");
            assert!(!r.contains("Last-Modified"), "{r}");
        }
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: Fri, 31 Dec 9999 23:59:59 GMT\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    }

    /// Item 6: RFC 9112 §6.3: differing or invalid `Content-Length` values are a framing
    /// error (request smuggling): 400 and close, nothing after it read as a request.
    #[test]
    fn invalid_or_conflicting_content_length_is_400_and_close() {
        let (_d, cfg) = site();
        for bad in [
            "Content-Length: 5\r\nContent-Length: 30",
            "Content-Length: +30",
            "Content-Length: -1",
            "Content-Length: 5, 6",
            "Content-Length: 0x10",
            "Content-Length: ",
            "Content-Length: 1 2",
            "Content-Length: 99999999999999999999999",
        ] {
            let req = format!(
                "GET /hello.txt HTTP/1.1\r\nHost: x\r\n{bad}\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            );
            let (r, done) = run(&cfg, req.as_bytes());
            assert!(r.starts_with("HTTP/1.1 400"), "{bad}: {r}");
            assert!(done && r.matches("HTTP/1.1 ").count() == 1, "{bad}: {r}");
        }
        // The same value repeated is one value (RFC 9110 §8.6).
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nabGET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("HTTP/1.1 404"),
            "{r}"
        );
    }

    /// Item 6: RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or with two, or with an
    /// invalid one, is 400. HTTP/1.0 may omit it.
    #[test]
    fn host_is_required_once_in_http11() {
        let (_d, cfg) = site();
        for req in [
            &b"GET /hello.txt HTTP/1.1\r\n\r\n"[..],
            b"GET /hello.txt HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /hello.txt HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET /hello.txt HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET /hello.txt HTTP/1.1\r\nHost: a/b\r\n\r\n",
        ] {
            let (r, done) = run(&cfg, req);
            assert!(r.starts_with("HTTP/1.1 400") && done, "{req:?}: {r}");
        }
        for req in [
            &b"GET /hello.txt HTTP/1.0\r\n\r\n"[..],
            b"GET /hello.txt HTTP/1.1\r\nHost: example.com:8080\r\n\r\n",
            b"GET /hello.txt HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            b"GET /hello.txt HTTP/1.1\r\nHost:\r\n\r\n",
        ] {
            let (r, _) = run(&cfg, req);
            assert!(r.starts_with("HTTP/1.1 200"), "{req:?}: {r}");
        }
    }

    /// Item 6: a request written with bare LF line ends whose head is over 8 KiB is not a
    /// long request line (414 was answered).
    #[test]
    fn a_long_bare_lf_head_is_not_a_long_request_line() {
        let (_d, cfg) = site();
        let req = format!(
            "GET /hello.txt HTTP/1.1\nHost: x\nX-Pad: {}\n\n",
            "v".repeat(9000)
        );
        let (r, _) = run(&cfg, req.as_bytes());
        assert!(r.starts_with("HTTP/1.1 200"), "{}", &r[..40.min(r.len())]);
        let long = format!(
            "GET /{} HTTP/1.1\nHost: x\n\n",
            "a".repeat(MAX_REQUEST_LINE)
        );
        let (r, _) = run(&cfg, long.as_bytes());
        assert!(r.starts_with("HTTP/1.1 414"), "{}", &r[..40.min(r.len())]);
    }

    /// Item 7: RFC 9110 §13.1.5: a range whose `If-Range` does not match the current
    /// representation gets the whole file (200), never a 206 of the new bytes.
    #[test]
    fn if_range_that_does_not_match_gets_the_whole_file() {
        let (d, cfg) = site();
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("hello.txt"))
            .unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
            .unwrap();
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n");
        let header = |r: &str, name: &str| {
            r.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .to_string()
        };
        let etag = header(&r, "ETag: ");
        let lm = header(&r, "Last-Modified: ");
        let ask = |if_range: &str| {
            run(
                &cfg,
                format!(
                    "GET /hello.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=6-\r\nIf-Range: {if_range}\r\n\r\n"
                )
                .as_bytes(),
            )
            .0
        };
        let r = ask(&etag);
        assert!(
            r.starts_with("HTTP/1.1 206") && r.ends_with("\r\n\r\nworld"),
            "{r}"
        );
        let r = ask(&lm);
        assert!(r.starts_with("HTTP/1.1 206"), "{r}");
        for stale in [
            "\"0-0-0\"".to_string(),
            format!("W/{etag}"),
            "Thu, 01 Jan 1970 00:00:00 GMT".to_string(),
            "Sun, 13 Sep 2020 12:26:41 GMT".to_string(),
            "garbage".to_string(),
        ] {
            let r = ask(&stale);
            assert!(
                r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nhello world"),
                "{stale}: {r}"
            );
        }
    }

    /// RFC 9110 §13.2.2: `If-Match` / `If-Unmodified-Since` that fail give 412.
    #[test]
    fn failed_preconditions_give_412() {
        let (_d, cfg) = site();
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n");
        let etag = r
            .lines()
            .find_map(|l| l.strip_prefix("ETag: "))
            .unwrap()
            .to_string();
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nIf-Match: \"nope\"\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 412"), "{r}");
        let (r, _) = run(
            &cfg,
            format!("GET /hello.txt HTTP/1.1\r\nHost: x\r\nIf-Match: \"a\", {etag}\r\n\r\n")
                .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let (r, _) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nIf-Unmodified-Since: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 412"), "{r}");
    }

    /// Item 12: names that are not UTF-8 get links and redirects made from their raw bytes,
    /// which lead back to them.
    #[test]
    fn non_utf8_names_link_and_redirect_to_themselves() {
        use std::os::unix::ffi::OsStrExt;
        let (d, cfg) = site();
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
        std::fs::write(d.path().join("d").join(name), b"latin-1 name").unwrap();
        let dir = std::ffi::OsStr::from_bytes(b"r\xe9p");
        std::fs::create_dir(d.path().join(dir)).unwrap();
        let (r, _) = run(&cfg, b"GET /d/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.contains("href=\"caf%E9.txt\""), "{r}");
        let (r, _) = run(&cfg, b"GET /d/caf%E9.txt HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.ends_with("latin-1 name"), "{r}");
        let (r, _) = run(&cfg, b"GET /r%E9p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 301") && r.contains("Location: /r%E9p/?q=1\r\n"),
            "{r}"
        );
    }

    /// Items 2 and 3: thousands of pipelined requests in one read do not queue thousands of
    /// answers: the session stops at the bound (bytes, files, responses) and keeps the rest
    /// of its input until the output drains.
    #[test]
    fn pipelined_answers_are_bounded_until_the_output_drains() {
        let (d, cfg) = site();
        std::fs::create_dir(d.path().join("m")).unwrap();
        for i in 0..300 {
            std::fs::write(d.path().join(format!("m/file-number-{i:04}.txt")), b"x").unwrap();
        }
        std::fs::File::create(d.path().join("big.bin"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        for (target, count) in [("/m/", 3000usize), ("/big.bin", 2000), ("/nope", 5000)] {
            let one = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            let input = one.repeat(count);
            let mut h = Http::new(cfg.clone());
            let mut out = Outbox::new();
            h.receive(input.as_bytes(), &mut out);
            assert!(
                out.pending() <= 8 << 20,
                "{target}: {} bytes queued at once",
                out.pending()
            );
            // Draining and resuming answers every request, in order.
            let mut answers = 0;
            for _ in 0..count + 1 {
                answers += String::from_utf8_lossy(&out.take_bytes())
                    .matches("HTTP/1.1 ")
                    .count();
                if answers == count {
                    break;
                }
                assert!(h.has_backlog(), "{target}: stalled after {answers}");
                h.resume(&mut out);
            }
            assert_eq!(answers, count, "{target}");
            assert!(!h.has_backlog() && !h.mid_request());
        }
    }

    /// Item 4: the listing is read from the directory that was opened beneath the root,
    /// not by path again: a local user swapping the directory for a symlink to somewhere
    /// else (`renameat2(RENAME_EXCHANGE)` in a loop) never gets that place listed.
    #[test]
    fn a_directory_swapped_for_a_symlink_is_never_listed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (d, cfg) = site();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("OUTSIDE-MARKER"), b"").unwrap();
        std::fs::create_dir(d.path().join("m")).unwrap();
        std::fs::write(d.path().join("m/inside.txt"), b"").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("swap")).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, root) = (stop.clone(), d.path().to_path_buf());
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &root.join("m"),
                        nix::fcntl::AT_FDCWD,
                        &root.join("swap"),
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
                swaps
            })
        };
        let mut listed = 0;
        for _ in 0..20_000 {
            let (r, _) = run(&cfg, b"GET /m/ HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(
                !r.contains("OUTSIDE-MARKER"),
                "listed outside the root: {r}"
            );
            listed += r.contains("inside.txt") as usize;
        }
        stop.store(true, Ordering::Relaxed);
        assert!(swapper.join().unwrap() > 100);
        assert!(listed > 0, "the directory was never listed");
    }

    #[test]
    fn slow_head_gets_408_at_the_deadline() {
        let (_d, cfg) = site();
        let mut h = Http::new(cfg);
        let mut out = Outbox::new();
        assert_eq!(h.deadline(), None);
        h.receive(b"GET /hello.txt HT", &mut out);
        assert!(h.deadline().is_some() && h.mid_request());
        h.on_deadline(&mut out);
        let r = String::from_utf8_lossy(&out.take_bytes()).into_owned();
        assert!(r.starts_with("HTTP/1.1 408") && h.done(), "{r}");
    }
}
