//! The invariants the fuzz targets check, written once: each `fuzz_targets/*.rs` calls one of
//! these functions, and `tests/fuzz_corpus.rs` replays every committed corpus entry through
//! the same functions in the normal `cargo test`, so a past finding stays fixed.
//!
//! Each function takes arbitrary bytes and panics when an invariant is broken (a panic is
//! what libFuzzer reports as a crash). Inputs that carry *how* to feed a session (where to
//! split the stream) take that from their first bytes, so the fuzzer explores splits too.
#![allow(dead_code)]

use socklab::output::Outbox;

/// Cut `input` into chunks whose lengths cycle through `seed` (1..=64 bytes each; a seed
/// byte of 192 or more also puts an empty chunk before its chunk: a session must accept
/// those). An empty seed or input means one chunk.
fn chunks<'a>(seed: &[u8], mut input: &'a [u8]) -> Vec<&'a [u8]> {
    if seed.is_empty() || input.is_empty() {
        return vec![input];
    }
    let mut out = Vec::new();
    let mut i = 0;
    while !input.is_empty() {
        let b = seed[i % seed.len()];
        if b >= 192 {
            out.push(&input[..0]);
        }
        let n = (b as usize % 64 + 1).min(input.len());
        out.push(&input[..n]);
        input = &input[n..];
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------
// reverse framing

/// How a reverse stream ends, by the reference reading.
type Ending = Result<Option<(usize, usize)>, u64>;

/// What the reverse protocol must answer to `input` as a whole, by the plainest reading of
/// the spec: the answers, and how the stream ends (`Ok(None)` clean, `Ok(Some((got,
/// expected)))` truncated, `Err(declared)` too large).
fn reverse_reference(mut input: &[u8], limit: usize) -> (Vec<u8>, Ending) {
    let mut out = Vec::new();
    loop {
        if input.is_empty() {
            return (out, Ok(None));
        }
        if input.len() < 4 {
            return (out, Ok(Some((input.len(), 4))));
        }
        let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
        if len > limit {
            return (out, Err(len as u64));
        }
        if input.len() - 4 < len {
            return (out, Ok(Some((input.len(), len + 4))));
        }
        out.extend(input[4..4 + len].iter().rev());
        input = &input[4 + len..];
    }
}

/// Reverse framing: `data[0]` picks the limit, `data[1..4]` the split pattern, the rest is
/// the byte stream. Fed in those chunks, the session answers exactly what the reference
/// says, refuses an oversize length, and reports a truncated request at end of input with
/// the right counts.
pub fn reverse_framing(data: &[u8]) {
    use socklab::service::reverse::Reverse;
    use socklab::service::ProtocolError;
    if data.len() < 4 {
        return;
    }
    let limit = [0usize, 1, 7, 64, 1000, 65_536, 16 << 20][data[0] as usize % 7];
    let (seed, stream) = (&data[1..4], &data[4..]);
    let (want, ending) = reverse_reference(stream, limit);
    let mut s = Reverse::new(limit);
    let mut out = Outbox::new();
    let mut got = Vec::new();
    let mut error = None;
    for c in chunks(seed, stream) {
        if let Err(e) = s.receive(c, &mut out) {
            error = Some(e);
            break;
        }
        got.extend(out.take_bytes());
    }
    got.extend(out.take_bytes());
    assert_eq!(got, want, "answers differ from the reference");
    match ending {
        Err(declared) => assert_eq!(
            error,
            Some(ProtocolError::TooLarge { declared, limit }),
            "oversize length not refused"
        ),
        Ok(end) => {
            assert_eq!(error, None);
            let reported = match s.end_of_input() {
                Ok(()) => None,
                Err(ProtocolError::Truncated { got, expected }) => Some((got, expected)),
                Err(e) => panic!("unexpected error at end of input: {e}"),
            };
            assert_eq!(reported, end, "end of input misreported");
            assert_eq!(s.mid_request(), end.is_some());
        }
    }
}

// ---------------------------------------------------------------------------------------
// bench answer checkers

/// The load generator's answer checkers: `data[0]` picks the service and payload size,
/// `data[1..4]` the split pattern, the rest is what a server might answer. Whatever
/// arrives, a checker never claims more bytes than it was given, gives the same verdict
/// however the bytes are split, and accepts an echo/reverse answer only if it is byte for
/// byte the right one.
pub fn bench_checkers(data: &[u8]) {
    use socklab::bench::proto::{Answer, BenchService, Progress, Requests};
    if data.len() < 4 {
        return;
    }
    let service = [
        BenchService::Echo,
        BenchService::Reverse,
        BenchService::Http,
    ][data[0] as usize % 3];
    let size = (data[0] as usize / 3) % 40;
    let (seed, answer) = (&data[1..4], &data[4..]);
    let run = |parts: Vec<&[u8]>| -> (usize, Progress) {
        let mut reqs = Requests::new(service, size, "/x", "h", 7);
        let mut a: Answer = reqs.next_request();
        let mut used = 0;
        let mut verdict = Progress::More;
        for p in parts {
            let (n, v) = a.feed(p);
            assert!(n <= p.len(), "claimed {n} of {} bytes", p.len());
            used += n;
            verdict = v;
            if v != Progress::More {
                break;
            }
        }
        (used, verdict)
    };
    let whole = run(vec![answer]);
    let split = run(chunks(seed, answer));
    // After a bad answer the connection is dropped: how many bytes were looked at before
    // the mismatch does not matter, the verdict does.
    if matches!(whole.1, Progress::Bad(_)) {
        assert_eq!(
            whole.1, split.1,
            "verdict depends on how the answer was split"
        );
    } else {
        assert_eq!(whole, split, "verdict depends on how the answer was split");
    }
    if service != BenchService::Http {
        let mut reqs = Requests::new(service, size, "/x", "h", 7);
        let _ = reqs.next_request();
        let wire = reqs.wire();
        let right: Vec<u8> = if service == BenchService::Reverse {
            wire[4..].iter().rev().copied().collect()
        } else {
            wire.to_vec()
        };
        let is_right = answer.len() >= right.len() && answer[..right.len()] == right[..];
        if size > 0 {
            assert_eq!(
                matches!(whole.1, Progress::Done { .. }),
                is_right,
                "a wrong answer passed or a right one failed"
            );
        }
        let mut reqs = Requests::new(service, size, "/x", "h", 7);
        let mut a = reqs.next_request();
        if !right.is_empty() {
            assert_eq!(
                a.feed(&right),
                (right.len(), Progress::Done { close: false })
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// the served tree (http_session, path_resolution)

/// A small tree to serve, made once per process: files, an index, a listing with odd names,
/// a file dated after year 9999 (where the file system can hold it), a FIFO, a symlink in
/// and one out, and a secret next to the root that must never be served.
struct Tree {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    secret: std::path::PathBuf,
    config: std::sync::Arc<socklab::service::http::HttpConfig>,
}

/// The secret's bytes: no answer may contain them.
const SECRET: &[u8] = b"TOP-SECRET-4b1d";

fn tree() -> &'static Tree {
    use std::os::unix::ffi::OsStrExt;
    static TREE: std::sync::OnceLock<Tree> = std::sync::OnceLock::new();
    TREE.get_or_init(|| {
        // tmpfs keeps modification times past 9999; elsewhere the tree is made in /tmp.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir");
        let root = dir.path().join("www");
        let w = |p: &str, b: &[u8]| std::fs::write(root.join(p), b).expect("write");
        for d in ["d", "idx", "m", "d/sub dir"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        w("hello.txt", b"hello world");
        w("empty.txt", b"");
        w("d/a.txt", b"a");
        w("d/x<y>&.txt", b"escaped");
        std::fs::write(
            root.join("d")
                .join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt")),
            b"latin",
        )
        .expect("write");
        w("idx/index.html", b"<p>index</p>");
        for i in 0..40 {
            w(&format!("m/file-{i:02}.txt"), b"m");
        }
        let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8 | 1).collect();
        w("big.bin", &big);
        w("future.txt", b"from the future");
        let future =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_436_860_800);
        let _ = std::fs::File::options()
            .write(true)
            .open(root.join("future.txt"))
            .and_then(|f| f.set_modified(future));
        let _ = nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU);
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).expect("write");
        std::os::unix::fs::symlink(&secret, root.join("link-out")).expect("symlink");
        std::os::unix::fs::symlink("hello.txt", root.join("link-in")).expect("symlink");
        let root = std::fs::canonicalize(&root).expect("canonical");
        let secret = std::fs::canonicalize(&secret).expect("canonical");
        let config = socklab::service::http::HttpConfig {
            root_fd: socklab::service::http::path::open_root(&root).expect("root"),
            root: root.clone(),
            follow_symlinks: false,
            header_timeout: std::time::Duration::from_secs(3600),
            cache: socklab::service::http::cache::Cache::new(1 << 20),
        };
        Tree {
            _dir: dir,
            root,
            secret,
            config: std::sync::Arc::new(config),
        }
    })
}

// ---------------------------------------------------------------------------------------
// http session

/// Feed `parts` to a fresh HTTP session the way every model does (never more input while
/// answers wait for the output to drain), checking the output bounds after each step;
/// returns everything it answered.
fn http_drive(parts: &[&[u8]]) -> Vec<u8> {
    use socklab::service::http::{Http, QUEUE_BYTES, QUEUE_FILES};
    let mut h = Http::new(tree().config.clone());
    let mut out = Outbox::new();
    let mut all = Vec::new();
    let drain = |h: &mut Http, out: &mut Outbox, all: &mut Vec<u8>| loop {
        assert!(out.files() <= QUEUE_FILES, "{} files queued", out.files());
        assert!(
            out.memory() <= QUEUE_BYTES + 64 * 1024,
            "{} bytes queued",
            out.memory()
        );
        all.extend(out.take_bytes());
        if !h.has_backlog() {
            break;
        }
        h.resume(out);
    };
    for p in parts {
        if h.done() {
            break;
        }
        drain(&mut h, &mut out, &mut all);
        h.receive(p, &mut out);
    }
    drain(&mut h, &mut out, &mut all);
    all
}

/// The answers without their `Date` lines (the only part that depends on when they were
/// made).
fn without_dates(answers: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(answers.len());
    let mut rest = answers;
    while let Some(at) = rest.windows(8).position(|w| w == b"\r\nDate: ") {
        out.extend_from_slice(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.extend_from_slice(rest);
    out
}

/// Check that `answers` is a sequence of well-formed responses: each head parses, has a
/// known status and a `Content-Length` (but 304), its body has that length (a HEAD answer
/// has none), nothing follows a `Connection: close`, and the secret never appears.
fn check_responses(mut answers: &[u8]) {
    assert!(
        !answers.windows(SECRET.len()).any(|w| w == SECRET),
        "the secret outside the root was served"
    );
    let mut closed = false;
    while !answers.is_empty() {
        assert!(!closed, "an answer after Connection: close");
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(answers) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("malformed response head: {other:?}"),
        };
        let code = resp.code.expect("status");
        assert!(
            matches!(
                code,
                200 | 206
                    | 301
                    | 304
                    | 400
                    | 403
                    | 404
                    | 405
                    | 408
                    | 412
                    | 413
                    | 414
                    | 416
                    | 431
                    | 501
                    | 503
            ),
            "unexpected status {code}"
        );
        let mut len = None;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).expect("ascii");
                len = Some(v.parse::<usize>().expect("a number"));
            }
            if h.name.eq_ignore_ascii_case("connection") && h.value == b"close" {
                closed = true;
            }
        }
        let len = match (code, len) {
            (304, None) => 0,
            (304, Some(_)) => panic!("304 with a Content-Length"),
            (_, Some(n)) => n,
            (_, None) => panic!("{code} without a Content-Length"),
        };
        answers = &answers[head_len..];
        // A HEAD answer states the length and sends no body: the next bytes are the next
        // answer, or nothing.
        if answers.len() < len || answers.starts_with(b"HTTP/1.1 ") {
            continue;
        }
        answers = &answers[len..];
    }
}

/// The HTTP session: `data[0..3]` picks the split pattern, the rest is what a client sends.
/// Whatever the bytes and however they are split, the answers are well-formed responses
/// (see `check_responses`), the same as when the bytes arrive at once, the output queue
/// stays within its bounds, and nothing outside the root is served.
pub fn http_session(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (seed, input) = (&data[..3], &data[3..]);
    let whole = http_drive(&[input]);
    check_responses(&whole);
    let parts = chunks(seed, input);
    let split = http_drive(&parts);
    assert!(
        without_dates(&whole) == without_dates(&split),
        "the answers depend on how the request bytes were split"
    );
}

// ---------------------------------------------------------------------------------------
// path resolution

/// Path resolution: `data[0]` bit 0 is `--follow-symlinks`, the rest a request target.
/// Whatever it is, a parsed path has only plain components, its percent-encoded form leads
/// back to it, and what it opens is beneath the root (with `--follow-symlinks`, or the
/// file the one symlink out points to).
pub fn path_resolution(data: &[u8]) {
    use socklab::service::http::path;
    use std::os::fd::AsRawFd;
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let follow = flags & 1 == 1;
    let target = String::from_utf8_lossy(rest);
    let Ok(t) = path::parse(&target) else {
        return;
    };
    assert!(
        t.rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_))),
        "{target:?} parsed to {:?}",
        t.rel
    );
    let encoded = t.encoded();
    let again = path::parse(if encoded.is_empty() { "/" } else { &encoded })
        .expect("an encoded path parses");
    assert_eq!(
        again.rel, t.rel,
        "{encoded} does not lead back to {target:?}"
    );
    let tree = tree();
    if let Ok((file, _)) = path::open(&tree.config.root_fd, &t.rel, follow) {
        let real =
            std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("readlink");
        assert!(
            real.starts_with(&tree.root) || (follow && real == tree.secret),
            "{target:?} opened {} outside the root",
            real.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// range and conditional headers

/// Ranges and conditions: `data[0]` picks the file size, the rest is six header values
/// separated by newlines (`Range`, `If-Range`, `If-Match`, `If-None-Match`,
/// `If-Modified-Since`, `If-Unmodified-Since`). A range is always within the file; a
/// partial answer happens only for a `GET` whose `If-Range` (if any) names the file; dates
/// and numbers round-trip.
pub fn range_headers(data: &[u8]) {
    use socklab::service::http::conditional::{
        digits, evaluate, http_date, parse_date, parse_range, Conditions, Outcome, Range,
        Validators,
    };
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let size = [0u64, 1, 2, 10, 1000, 1 << 40, u64::MAX / 2, u64::MAX][pick as usize % 8];
    let text = String::from_utf8_lossy(rest);
    let mut values = text.split('\n').map(str::to_string);
    let mut next = || values.next().filter(|v| !v.is_empty());
    let c = Conditions {
        range: next(),
        if_range: next(),
        if_match: next(),
        if_none_match: next(),
        if_modified_since: next(),
        if_unmodified_since: next(),
    };
    if let Some(r) = &c.range {
        match parse_range(r, size) {
            Range::Part(a, b) => assert!(a <= b && b < size, "{r:?} on {size}: {a}-{b}"),
            Range::Unsatisfiable | Range::Whole => {}
        }
    }
    let modified = u64::from(pick) * 1_000_003;
    let v = Validators {
        etag: "\"1-2-3\"",
        modified: Some(modified),
        now: modified + u64::from(pick % 3),
    };
    for get in [true, false] {
        let outcome = evaluate(&c, &v, size, get);
        if let Outcome::Send(Range::Part(..)) = outcome {
            assert!(get, "a range answered for HEAD");
            if let Some(ir) = c.if_range.as_deref().map(str::trim) {
                assert!(
                    ir == v.etag || parse_date(ir) == Some(modified),
                    "If-Range {ir:?} let a range through"
                );
            }
        }
    }
    for value in [c.if_modified_since.as_deref(), c.range.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Some(secs) = parse_date(value) {
            let again = http_date(secs).expect("a parsed date is writable");
            assert_eq!(parse_date(&again), Some(secs));
        }
        if let Some(n) = digits(value) {
            assert!(value.bytes().all(|b| b.is_ascii_digit()), "{value:?}");
            assert_eq!(value.parse::<u64>().ok(), Some(n));
        }
    }
    let secs = u64::from_le_bytes(
        rest.get(..8)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 8]),
    );
    if let Some(d) = http_date(secs) {
        assert_eq!(parse_date(&d), Some(secs), "{d}");
    }
}

// ---------------------------------------------------------------------------------------
// the D-Bus half of the bus

/// Arbitrary D-Bus traffic from three MQTT 5 connections through the broker's D-Bus half
/// (`socklab::bus::dbus`, with its hand-written match-rule parser `socklab::bus::rules`).
/// The input is a script: each step is a head byte and fields separated by 0xFF. The head
/// picks the connection (low 2 bits; 3 = disconnect and reconnect connection 0) and what to
/// send (`$bus/call/`, `$bus/reply`, `$bus/signal/`, a driver call, time passing); the
/// fields are the topic's tail, member, path, interface, timeout, error, correlation data
/// and payload. Invariants: no panic; every delivery encodes; the calls waiting never exceed
/// the caps; once every connection is gone, no call waits and no name or deadline is left.
pub fn bus_dbus(data: &[u8]) {
    use bytes::Bytes;
    use mqtt_proto::v5;
    use mqtt_proto::{QosPid, TopicName};
    use socklab::bus::broker::{AllowAll, Broker, BrokerConfig, Identity, Out};
    use socklab::bus::codec::{PublishHeader, Version};
    use socklab::bus::dbus::BusConfig;
    use socklab::bus::rules::Rule;
    use socklab::bus::session::{Session, SessionConfig};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let t0 = Instant::now();
    let mut now = t0;
    let bus_cfg = BusConfig {
        max_names: 4,
        max_rules: 4,
        max_pending: 3,
        max_pending_total: 5,
        max_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let cfg = BrokerConfig {
        bus: bus_cfg.clone(),
        ..Default::default()
    };
    let mut broker = Broker::new(cfg, Arc::new(AllowAll), now);
    let scfg = SessionConfig::default();
    let mut sessions: Vec<Session> = (0..3).map(|_| Session::new(scfg, now)).collect();
    let connect = |b: &mut Broker, conn: u64, now: Instant| {
        let c = v5::Connect::new(format!("f{conn}").into(), 60);
        b.connect(conn, Version::V5, c, Identity::default(), now);
    };
    for c in 0..3 {
        connect(&mut broker, c, now);
    }
    let drain = |broker: &mut Broker, sessions: &mut [Session], now: Instant| {
        for (conn, out) in std::mem::take(&mut broker.out) {
            let s = &mut sessions[conn as usize];
            match out {
                Out::Packet(p) => s.send(&p),
                Out::Publish(d) => {
                    let h = PublishHeader {
                        qos: d.qos,
                        pid: d.pid,
                        dup: d.dup,
                        retain: d.retain,
                        sub_ids: &d.sub_ids,
                        alias: None,
                        expiry: d.msg.expiry_left(now),
                    };
                    s.deliver(&d.msg, h);
                }
                Out::Close(_) => {}
            }
            s.out.clear();
        }
        broker.ops.clear();
    };
    drain(&mut broker, &mut sessions, now);
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        // A step's fields end at a 0xFE byte (or the input's end).
        let end = tail.iter().position(|&b| b == 0xFE).unwrap_or(tail.len());
        let (step, next) = tail.split_at(end);
        rest = next.get(1..).unwrap_or(&[]);
        let mut f = step
            .split(|&b| b == 0xFF)
            .map(|s| String::from_utf8_lossy(s).into_owned());
        let mut field = || f.next().unwrap_or_default();
        let conn = (head & 3) as u64;
        if conn == 3 {
            broker.closed(0, true, now);
            drain(&mut broker, &mut sessions, now);
            sessions[0] = Session::new(scfg, now);
            connect(&mut broker, 0, now);
            drain(&mut broker, &mut sessions, now);
            continue;
        }
        let tail = field();
        let topic = match (head >> 2) & 7 {
            0 | 1 => format!("$bus/call/{tail}"),
            2 => "$bus/reply".to_string(),
            3 => format!("$bus/signal/{tail}"),
            4 | 5 => "$bus/call/org.freedesktop.DBus".to_string(),
            6 => {
                now += Duration::from_millis(u64::from(head) * 20);
                broker.expire_calls(now);
                drain(&mut broker, &mut sessions, now);
                continue;
            }
            _ => format!("$bus/{tail}"),
        };
        let Ok(topic) = TopicName::try_from(topic.as_str()) else {
            continue;
        };
        let mut p = v5::Publish::new(QosPid::Level0, topic, Bytes::new());
        let mut user = Vec::new();
        for key in [
            "member",
            "path",
            "interface",
            "timeout",
            "error",
            "sender",
            "destination",
        ] {
            let v = field();
            if !v.is_empty() {
                user.push(v5::UserProperty {
                    name: key.into(),
                    value: v.into(),
                });
            }
        }
        p.properties.user_properties = user;
        let corr = field();
        if !corr.is_empty() {
            p.properties.correlation_data = Some(Bytes::from(corr.into_bytes()));
        }
        if head & 0x80 != 0 {
            p.properties.response_topic = TopicName::try_from("r/x").ok();
        }
        let mut body = field();
        // The rule parser on its own, and (bit 6) the text as the one string argument of a
        // JSON array, so AddMatch/RemoveMatch/BecomeMonitor get arbitrary rules.
        let _ = Rule::parse(&body);
        if head & 0x40 != 0 {
            body = serde_json::json!([body]).to_string();
        }
        p.payload = Bytes::from(body.into_bytes());
        broker.packet(conn, v5::Packet::Publish(p), now);
        drain(&mut broker, &mut sessions, now);
        let waiting = broker.bus().pending_calls();
        assert!(
            waiting <= bus_cfg.max_pending_total,
            "{waiting} calls waiting"
        );
    }
    for c in 0..3 {
        broker.closed(c, true, now);
    }
    drain(&mut broker, &mut sessions, now);
    assert_eq!(
        broker.bus().pending_calls(),
        0,
        "calls left after every connection went"
    );
    assert_eq!(broker.next_call_deadline(), None, "deadlines left");
}
