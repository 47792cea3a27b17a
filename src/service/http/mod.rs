//! HTTP/1.1 static files, sans-IO: requests in, responses (head bytes + a file region) out.
//!
//! - GET and HEAD; keep-alive by default in HTTP/1.1, `Connection: close` honoured; HTTP/1.0
//!   closes unless it asks for keep-alive; pipelined requests are answered in order.
//! - Requests are parsed with `httparse`. Limits: request line 8 KiB (414), head 16 KiB or
//!   64 headers (431). A request head must arrive within `--header-timeout` of its first
//!   byte (408), so a slow client cannot hold a connection with a half-sent request.
//! - Responses carry `Date`, `Server`, `Content-Type` ([`mime`]), `Content-Length`,
//!   `Last-Modified`, `ETag`, `Accept-Ranges`; `If-None-Match`/`If-Modified-Since` give 304;
//!   one byte range (`bytes=a-b`, `a-`, `-n`) gives 206 with `Content-Range`, an unsatisfiable
//!   one 416.
//! - Directories: `index.html` if present, else a listing ([`listing`]); a directory named
//!   without its trailing slash is redirected (301).
//! - Errors have small HTML bodies: 400, 403, 404, 405 (with `Allow`), 408, 414, 431, 501
//!   (request bodies with a `Transfer-Encoding`).
//! - The root cannot be left ([`path`]).
//!
//! File bodies are queued as file regions ([`Outbox::push_file`]), so every model sends
//! them with the chosen strategy and a 1 GiB file never sits in memory.

pub mod listing;
pub mod mime;
pub mod path;

use crate::output::Outbox;
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

/// What the HTTP service serves and how.
#[derive(Debug)]
pub struct HttpConfig {
    /// The served directory, canonical (symlinks resolved).
    pub root: PathBuf,
    /// The served directory, opened: every file is opened relative to it ([`path::open`]).
    pub root_fd: std::os::fd::OwnedFd,
    /// Serve symlinks that point outside the root.
    pub follow_symlinks: bool,
    /// Time allowed for a request head, from its first byte.
    pub header_timeout: Duration,
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
}

struct Response {
    status: u16,
    headers: String,
    body: Body,
}

enum Body {
    None,
    Html(String),
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        len: u64,
    },
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
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

/// The current time as an HTTP date, formatted once per second per thread.
fn now_http_date() -> String {
    use std::cell::RefCell;
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        c.1.clone()
    })
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

/// A parsed byte range request against a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No usable `Range` (absent, not bytes, or several ranges): the whole file.
    Whole,
    /// Bytes `start..=end`.
    Part(u64, u64),
    /// Cannot be satisfied: 416.
    Unsatisfiable,
}

/// Parse a `Range` header value for a file of `size` bytes (one range only; several ranges
/// are answered with the whole file, which the RFC allows).
pub fn parse_range(value: &str, size: u64) -> Range {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, true) => return Range::Whole,
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return Range::Unsatisfiable,
            Ok(n) if size == 0 => {
                return if n > 0 {
                    Range::Unsatisfiable
                } else {
                    Range::Whole
                }
            }
            Ok(n) => (size.saturating_sub(n), size - 1),
            Err(_) => return Range::Whole,
        },
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return Range::Whole;
            };
            let end = if b.is_empty() {
                size.saturating_sub(1)
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= start => e.min(size.saturating_sub(1)),
                    _ => return Range::Whole,
                }
            };
            if start >= size {
                return Range::Unsatisfiable;
            }
            (start, end)
        }
    };
    Range::Part(parsed.0, parsed.1)
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

    /// The time by which the current request head must be complete.
    pub fn deadline(&self) -> Option<Instant> {
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

    /// Consume received bytes, answering every complete request in order.
    pub fn receive(&mut self, mut input: &[u8], out: &mut Outbox) {
        if self.closing {
            return; // nothing after a closing response is read
        }
        if self.skip > 0 {
            let n = (self.skip as usize).min(input.len());
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
        while !self.closing && !self.buf.is_empty() {
            if !self.one_request(out) {
                break;
            }
        }
        if self.buf.is_empty() {
            self.started = None;
        }
    }

    /// Answer the first request in the buffer if it is complete; `false` if more bytes are
    /// needed.
    fn one_request(&mut self, out: &mut Outbox) -> bool {
        let line_end = self.buf.windows(2).position(|w| w == b"\r\n");
        if line_end.map_or(self.buf.len() > MAX_REQUEST_LINE, |e| e > MAX_REQUEST_LINE) {
            self.send(out, error(414), false, true, "-", "-", Instant::now());
            return false;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.buf.len() > MAX_HEAD {
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
        let method = req.method.unwrap_or("").to_string();
        let target = req.path.unwrap_or("").to_string();
        let minor = req.version.unwrap_or(1);
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let connection = header("connection")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let keep_alive = if minor == 0 {
            connection.split(',').any(|t| t.trim() == "keep-alive")
        } else {
            !connection.split(',').any(|t| t.trim() == "close")
        };
        let transfer_encoding = header("transfer-encoding");
        let content_length = header("content-length");
        let conditional = (header("if-none-match"), header("if-modified-since"));
        let range = header("range");
        self.buf.drain(..head_len);
        self.started = if self.buf.is_empty() { None } else { Some(t0) };

        if transfer_encoding.is_some() {
            self.send(out, error(501), false, true, &method, &target, t0);
            return false;
        }
        match content_length.map(|v| v.trim().parse::<u64>()) {
            None => {}
            Some(Ok(n)) => {
                let here = (n as usize).min(self.buf.len());
                self.buf.drain(..here);
                self.skip = n - here as u64;
            }
            Some(Err(_)) => {
                self.send(out, error(400), false, true, &method, &target, t0);
                return false;
            }
        }
        let head_only = method == "HEAD";
        let response = if method != "GET" && !head_only {
            let mut r = error(405);
            r.headers.push_str("Allow: GET, HEAD\r\n");
            r
        } else {
            self.respond(&target, conditional, range.as_deref())
        };
        let http10_keepalive = minor == 0 && keep_alive;
        self.send_full(
            out,
            response,
            head_only,
            !keep_alive,
            http10_keepalive,
            &method,
            &target,
            t0,
        );
        self.skip == 0
    }

    fn respond(
        &self,
        target: &str,
        conditional: (Option<String>, Option<String>),
        range: Option<&str>,
    ) -> Response {
        use path::Refusal;
        let refused = |r: Refusal| match r {
            Refusal::BadRequest => error(400),
            Refusal::Forbidden => error(403),
            Refusal::NotFound => error(404),
        };
        let t = match path::parse(target) {
            Ok(t) => t,
            Err(r) => return refused(r),
        };
        let (file, meta, name) =
            match path::open(&self.config.root_fd, &t.rel, self.config.follow_symlinks) {
                Err(r) => return refused(r),
                Ok((_, meta)) if meta.is_dir() => {
                    if !t.trailing_slash {
                        let mut r = error(301);
                        let query = target.find('?').map(|i| &target[i..]).unwrap_or("");
                        let location: String = t
                            .shown
                            .split('/')
                            .map(path::encode)
                            .collect::<Vec<_>>()
                            .join("/");
                        let _ = write!(r.headers, "Location: {location}/{query}\r\n");
                        return r;
                    }
                    let index = t.rel.join("index.html");
                    match path::open(&self.config.root_fd, &index, self.config.follow_symlinks) {
                        Ok((f, m)) if m.is_file() => (f, m, index),
                        _ => {
                            // The directory was opened beneath the root, and `rel` holds no `..`.
                            return match listing::render(&self.config.root.join(&t.rel), &t.shown) {
                                Ok(html) => Response {
                                    status: 200,
                                    headers: String::new(),
                                    body: Body::Html(html),
                                },
                                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                                    error(403)
                                }
                                Err(_) => error(404),
                            };
                        }
                    }
                }
                Ok((f, m)) if m.is_file() => (f, m, t.rel.clone()),
                Ok(_) => return error(403), // devices, FIFOs, sockets are not served
            };
        let file = Arc::new(file);
        let file_path = name;
        let size = meta.len();
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let secs = mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let etag = {
            use std::os::unix::fs::MetadataExt;
            format!(
                "\"{:x}-{:x}-{:x}\"",
                meta.ino(),
                size,
                meta.mtime_nsec() as u64 ^ (secs << 20)
            )
        };
        let mut headers = format!(
            "Content-Type: {}\r\nLast-Modified: {}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n",
            mime::content_type(&file_path.to_string_lossy()),
            httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
        );
        let (inm, ims) = conditional;
        let not_modified = match inm {
            Some(v) => v.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t == etag || t.strip_prefix("W/") == Some(etag.as_str())
            }),
            None => ims
                .and_then(|v| httpdate::parse_http_date(&v).ok())
                .is_some_and(|since| {
                    since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                        >= secs
                }),
        };
        if not_modified {
            return Response {
                status: 304,
                headers,
                body: Body::None,
            };
        }
        match range.map_or(Range::Whole, |r| parse_range(r, size)) {
            Range::Whole => Response {
                status: 200,
                headers,
                body: Body::File {
                    file,
                    offset: 0,
                    len: size,
                },
            },
            Range::Part(a, b) => {
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
            Range::Unsatisfiable => {
                let mut r = error(416);
                let _ = write!(r.headers, "Content-Range: bytes */{size}\r\n");
                r
            }
        }
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
        let close = close || (r.status >= 400 && !matches!(r.status, 403 | 404 | 405 | 416));
        let len = match &r.body {
            Body::None => 0,
            Body::Html(h) => h.len() as u64,
            Body::File { len, .. } => *len,
        };
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nDate: {}\r\nServer: socklab\r\n{}",
            r.status,
            reason(r.status),
            now_http_date(),
            r.headers
        );
        if matches!(r.body, Body::Html(_)) {
            head.push_str("Content-Type: text/html; charset=utf-8\r\n");
        }
        if r.status != 304 {
            let _ = write!(head, "Content-Length: {len}\r\n");
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
                Body::File { file, offset, len } => out.push_file(file, offset, len),
            }
        }
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
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> (tempfile::TempDir, Arc<HttpConfig>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), b"hello world").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/x<y>.txt"), b"x").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let cfg = HttpConfig {
            root_fd: path::open_root(&root).unwrap(),
            root,
            follow_symlinks: false,
            header_timeout: Duration::from_secs(10),
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
        let (r, _) = run(&cfg, b"HEAD /hello.txt HTTP/1.1\r\n\r\n");
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
            b"GET /hello.txt HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(done);
    }

    #[test]
    fn pipelined_requests_answered_in_order_at_every_split() {
        let (_d, cfg) = site();
        let input =
            b"GET /hello.txt HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nHEAD /d/ HTTP/1.1\r\n\r\n";
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
            b"POST /hello.txt HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
        );
        assert!(
            r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET, HEAD"),
            "{r}"
        );
        let (r, done) = run(
            &cfg,
            b"GET /hello.txt HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 501") && done);
        let (r, done) = run(&cfg, b"NOT A REQUEST\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400") && done, "{r}");
        let long = format!(
            "GET /{} HTTP/1.1\r\n\r\n",
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
        let (r, _) = run(&cfg, b"GET /../etc/passwd HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    }

    #[test]
    fn directories_redirect_list_and_escape() {
        let (_d, cfg) = site();
        let (r, _) = run(&cfg, b"GET /d HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 301") && r.contains("Location: /d/\r\n"),
            "{r}"
        );
        let (r, _) = run(&cfg, b"GET /d/ HTTP/1.1\r\n\r\n");
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
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\n\r\n");
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
            format!("GET /hello.txt HTTP/1.1\r\nIf-None-Match: {etag}\r\n\r\n").as_bytes(),
        );
        assert!(
            r.starts_with("HTTP/1.1 304") && !r.contains("hello world"),
            "{r}"
        );
        let (r, _) = run(
            &cfg,
            format!("GET /hello.txt HTTP/1.1\r\nIf-Modified-Since: {lm}\r\n\r\n").as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 304"), "{r}");
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nRange: bytes=6-\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 206")
                && r.contains("Content-Range: bytes 6-10/11")
                && r.ends_with("world"),
            "{r}"
        );
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nRange: bytes=-5\r\n\r\n");
        assert!(r.ends_with("\r\n\r\nworld"), "{r}");
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nRange: bytes=0-4\r\n\r\n");
        assert!(r.ends_with("\r\n\r\nhello"), "{r}");
        let (r, _) = run(&cfg, b"GET /hello.txt HTTP/1.1\r\nRange: bytes=20-\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 416") && r.contains("Content-Range: bytes */11"),
            "{r}"
        );
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("bytes=0-0", 10), Range::Part(0, 0));
        assert_eq!(parse_range("bytes=5-100", 10), Range::Part(5, 9));
        assert_eq!(parse_range("bytes=-3", 10), Range::Part(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), Range::Part(0, 9));
        assert_eq!(parse_range("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Range::Whole);
        assert_eq!(parse_range("items=0-1", 10), Range::Whole);
        assert_eq!(parse_range("bytes=5-2", 10), Range::Whole);
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
