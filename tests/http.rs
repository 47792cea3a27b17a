//! `socklab serve http` against real clients: curl, wget, Python, raw sockets, and a
//! headless Chromium; every model under every send strategy.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

/// A small site: index.html with an image, a text file, a directory with no index, and a
/// secret next to (not inside) the root.
fn site() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir_all(root.join("files/sub dir")).unwrap();
    std::fs::write(
        root.join("index.html"),
        "<!DOCTYPE html><html><head><title>socklab test page</title></head><body><h1 id=\"t\">It works</h1><img id=\"pic\" src=\"pic.png\" width=\"40\" height=\"40\"><p><a href=\"files/\">files</a></p></body></html>\n",
    )
    .unwrap();
    std::fs::write(root.join("pic.png"), png_40x40()).unwrap();
    std::fs::write(root.join("files/hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(root.join("files/data.bin"), bytes(3, 300_000)).unwrap();
    std::fs::write(root.join("files/a&b <c>.txt"), b"escaped\n").unwrap();
    std::fs::write(dir.path().join("secret.txt"), b"TOP SECRET\n").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("files/link-out")).unwrap();
    (dir, root)
}

/// A valid 40x40 red PNG, written by hand (stored zlib blocks, CRCs computed).
fn png_40x40() -> Vec<u8> {
    fn crc(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc(&body).to_be_bytes());
    }
    let (w, h) = (40u32, 40u32);
    // Each row: filter type 0, then RGB pixels.
    let row: Vec<u8> = std::iter::once(0u8)
        .chain((0..w).flat_map(|_| [220u8, 30, 30]))
        .collect();
    let raw: Vec<u8> = (0..h).flat_map(|_| row.iter().copied()).collect();
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    let mut z = vec![0x78, 0x01];
    for (i, block) in raw.chunks(65535).enumerate() {
        let last = (i + 1) * 65535 >= raw.len();
        z.push(last as u8);
        z.extend_from_slice(&(block.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(block.len() as u16)).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &z);
    chunk(&mut png, b"IEND", &[]);
    png
}

fn http_server(root: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "http",
        "--root",
        root.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is needed: .ci/run installs it")
}

/// One raw request on a fresh connection; the whole answer until the server closes.
fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn curl_get_head_http10_keepalive_ranges_resume_and_304() {
    let (_d, root) = site();
    let srv = http_server(&root, &["-v"]);
    let base = format!("http://{}", srv.addr);
    let out = curl(&["-i", &format!("{base}/files/hello.txt")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("Content-Type: text/plain; charset=utf-8"));
    assert!(text.ends_with("\r\n\r\nhello, world\n"));
    for h in [
        "Date:",
        "Server: socklab",
        "Last-Modified:",
        "ETag:",
        "Content-Length: 13",
    ] {
        assert!(text.contains(h), "missing {h}: {text}");
    }
    let out = curl(&["-I", &format!("{base}/files/data.bin")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Content-Length: 300000") && text.contains("Accept-Ranges: bytes"),
        "{text}"
    );
    let out = curl(&["-i", "--http1.0", &format!("{base}/files/hello.txt")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("200 OK") && text.contains("Connection: close"),
        "{text}"
    );

    // Keep-alive: several URLs over one connection.
    let out = curl(&[
        "-w",
        "%{num_connects}\\n",
        "-o",
        "/dev/null",
        &format!("{base}/files/hello.txt"),
        "-o",
        "/dev/null",
        &format!("{base}/index.html"),
        "-o",
        "/dev/null",
        &format!("{base}/pic.png"),
    ]);
    let counts = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        counts.lines().collect::<Vec<_>>(),
        ["1", "0", "0"],
        "one connection reused: {counts}"
    );

    // A range, and a resumed download (curl -C -).
    let out = curl(&["-r", "1000-1999", &format!("{base}/files/data.bin")]);
    assert_eq!(out.stdout, bytes(3, 300_000)[1000..2000]);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("data.bin");
    std::fs::write(&partial, &bytes(3, 300_000)[..123_456]).unwrap();
    let out = curl(&[
        "-C",
        "-",
        "-o",
        partial.to_str().unwrap(),
        &format!("{base}/files/data.bin"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&partial).unwrap(), bytes(3, 300_000));

    // wget -c resumes the same way.
    std::fs::write(&partial, &bytes(3, 300_000)[..77_777]).unwrap();
    let status = Command::new("wget")
        .args(["-q", "-c", "-O"])
        .arg(&partial)
        .arg(format!("{base}/files/data.bin"))
        .status()
        .expect("wget is needed: .ci/run installs it");
    assert!(status.success());
    assert_eq!(
        std::fs::read(&partial).unwrap(),
        bytes(3, 300_000),
        "wget -c"
    );

    // Conditional requests: 304.
    let out = curl(&["-i", &format!("{base}/files/hello.txt")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let etag = text
        .lines()
        .find_map(|l| l.strip_prefix("ETag: "))
        .unwrap()
        .trim()
        .to_string();
    let out = curl(&[
        "-i",
        "-H",
        &format!("If-None-Match: {etag}"),
        &format!("{base}/files/hello.txt"),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 304"));
    let out = curl(&[
        "-i",
        "-z",
        root.join("files/hello.txt").to_str().unwrap(),
        &format!("{base}/files/hello.txt"),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 304"));
    let out = curl(&["-i", "-r", "999999-", &format!("{base}/files/hello.txt")]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 416"));

    let (status, log) = srv.stop();
    assert!(status.success());
    assert!(
        log.contains("method=\"GET\"") || log.contains("method=GET"),
        "access log at -v: {log}"
    );
}

#[test]
fn directories_listing_redirect_and_escaping() {
    let (_d, root) = site();
    let srv = http_server(&root, &[]);
    let base = format!("http://{}", srv.addr);
    let out = curl(&["-i", &format!("{base}/files")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 301") && text.contains("Location: /files/\r\n"),
        "{text}"
    );
    let out = curl(&["-L", &format!("{base}/files")]);
    let html = String::from_utf8_lossy(&out.stdout);
    assert!(html.contains("Index of /files/"), "{html}");
    assert!(
        html.contains("a&amp;b &lt;c&gt;.txt") && html.contains("href=\"a%26b%20%3Cc%3E.txt\""),
        "{html}"
    );
    assert!(html.contains("href=\"sub%20dir/\""), "{html}");
    let out = curl(&[&format!("{base}/files/a%26b%20%3Cc%3E.txt")]);
    assert_eq!(out.stdout, b"escaped\n");
    let out = curl(&[&format!("{base}/")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("It works"));
    assert!(srv.stop().0.success());
}

#[test]
fn traversal_attempts_never_reach_outside_the_root() {
    let (_d, root) = site();
    let srv = http_server(&root, &[]);
    let attempts = [
        "/../secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/.%2e/secret.txt",
        "/%2e./secret.txt",
        "/files/../../secret.txt",
        "/files/%2e%2e/%2e%2e/secret.txt",
        "/files/..%2f..%2fsecret.txt",
        "/%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/%2e%2e%5csecret.txt",
        "/files/link-out",
        "/files/../files/link-out",
        "/%252e%252e/secret.txt",
        "/%25%32%65%25%32%65/secret.txt",
        "/..%00/secret.txt",
        "/%00",
        "/secret.txt%00.html",
        "/....//secret.txt",
        "/.../secret.txt",
        "http://x/../secret.txt",
        "//../secret.txt",
        "/./../secret.txt",
        "/files/./../../secret.txt",
        "/%c0%ae%c0%ae/secret.txt",
        "/..;/secret.txt",
        "/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/files/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/%2e%2e",
        "/files/sub%20dir/../../../secret.txt",
        "../secret.txt",
        "/files/..\\..\\secret.txt",
    ];
    assert!(attempts.len() >= 30);
    for a in attempts {
        let answer = raw(
            &srv.addr,
            format!("GET {a} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(
            !answer.contains("TOP SECRET"),
            "{a} leaked the secret: {answer}"
        );
        let status: u16 = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(
            matches!(status, 400 | 403 | 404),
            "{a}: {}",
            answer.lines().next().unwrap_or("")
        );
    }
    assert!(srv.stop().0.success());
    // With --follow-symlinks the link out is served, traversal still is not.
    let srv = http_server(&root, &["--follow-symlinks"]);
    assert!(raw(
        &srv.addr,
        b"GET /files/link-out HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .contains("TOP SECRET"));
    assert!(!raw(
        &srv.addr,
        b"GET /%2e%2e/secret.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .contains("TOP SECRET"));
    assert!(srv.stop().0.success());
}

#[test]
fn python_pipelining_malformed_oversize_and_slow_heads() {
    let (_d, root) = site();
    let srv = http_server(&root, &["--header-timeout", "1s"]);
    let (host, port) = srv.addr.rsplit_once(':').unwrap();
    let script = r#"
import http.client, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, port, timeout=10)
for path, want in [("/files/hello.txt", 200), ("/nope", 404), ("/files/hello.txt", 200)]:
    c.request("GET", path)
    r = c.getresponse(); body = r.read()
    assert r.status == want, (path, r.status)
c.request("DELETE", "/files/hello.txt"); r = c.getresponse(); r.read()
assert r.status == 405 and r.getheader("Allow") == "GET, HEAD", r.status

def raw(data, wait=None):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(data)
    if wait: time.sleep(wait)
    out = b""
    while True:
        try:
            k = s.recv(65536)
        except socket.timeout:
            break
        if not k: break
        out += k
    return out

# Pipelining: three requests in one send, answered in order.
out = raw(b"GET /files/hello.txt HTTP/1.1\r\nHost: x\r\n\r\nHEAD /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /files/hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
assert out.count(b"HTTP/1.1 ") == 3, out
assert out.index(b"200 OK") < out.index(b"404 Not Found") < out.rindex(b"200 OK"), out
assert out.endswith(b"hello, world\n")
# Malformed.
assert raw(b"THIS IS NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
assert raw(b"GET /files/hello.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").startswith(b"HTTP/1.1 501")
# Oversize request line and headers.
assert raw(b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
assert raw(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n").startswith(b"HTTP/1.1 431")
assert raw(b"GET / HTTP/1.1\r\nX: " + b"v" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
# A slow head is cut off with 408 after --header-timeout (1 s), while others are served.
s = socket.create_connection((host, port), timeout=10)
s.sendall(b"GET /files/hello.txt HTTP/1.1\r\nHost: slow")
t0 = time.time()
c2 = http.client.HTTPConnection(host, port, timeout=5); c2.request("GET", "/files/hello.txt")
assert c2.getresponse().status == 200
out = b""
while True:
    k = s.recv(4096)
    if not k: break
    out += k
waited = time.time() - t0
assert out.startswith(b"HTTP/1.1 408"), out
assert 0.7 < waited < 5, waited
print("ok")
"#;
    python_ok(script, &[host, port]);
    assert!(srv.stop().0.success());
}

#[test]
fn every_model_and_strategy_serves_the_tree() {
    let (_d, root) = site();
    let data = bytes(3, 300_000);
    for model in MODELS {
        for send in ["read", "mmap", "sendfile"] {
            let srv = http_server(&root, &["--model", model, "--send", send, "--workers", "2"]);
            // Two requests pipelined on one connection, then close.
            let answer = {
                let mut s = TcpStream::connect(&srv.addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                s.write_all(b"GET /files/data.bin HTTP/1.1\r\nHost: x\r\n\r\nGET /files/hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                out
            };
            let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "{model}/{send}");
            assert_eq!(
                &answer[head_end..head_end + data.len()],
                &data[..],
                "{model}/{send}: body differs"
            );
            assert!(answer.ends_with(b"hello, world\n"), "{model}/{send}");
            let (status, err) = srv.stop();
            assert!(status.success(), "{model}/{send}: {err}");
        }
    }
}

fn sha256(path_or_stdin: Option<&Path>, input: Option<std::process::ChildStdout>) -> String {
    let mut cmd = Command::new("sha256sum");
    if let Some(p) = path_or_stdin {
        cmd.arg(p);
    }
    if let Some(i) = input {
        cmd.stdin(Stdio::from(i));
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn wget_downloads_a_sparse_gigabyte_under_each_strategy_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir(&root).unwrap();
    let big = root.join("big.img");
    {
        // 1 GiB, sparse, with markers so that misplaced bytes change the checksum.
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(1 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        for k in 0..16u64 {
            f.write_at(
                format!("marker {k} at {}", k << 26).as_bytes(),
                (k << 26) + 12_345,
            )
            .unwrap();
        }
    }
    std::fs::write(root.join("small.txt"), b"small\n").unwrap();
    let want = sha256(Some(&big), None);
    for send in ["sendfile", "mmap", "read"] {
        let srv = http_server(
            &root,
            &["--send", send, "--model", "reactors", "--workers", "2"],
        );
        let url = format!("http://{}/big.img", srv.addr);
        let mut wget = Command::new("wget")
            .args(["-q", "-O", "-", &url])
            .stdout(Stdio::piped())
            .spawn()
            .expect("wget is needed: .ci/run installs it");
        let stdout = wget.stdout.take().unwrap();
        let summer = std::thread::spawn(move || sha256(None, Some(stdout)));
        // Meanwhile, small requests keep being answered promptly.
        let addr = srv.addr.clone();
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let a = raw(
                &addr,
                b"GET /small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            assert!(a.ends_with("small\n"), "{send}: {a}");
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(wget.wait().unwrap().success(), "{send}: wget failed");
        assert_eq!(summer.join().unwrap(), want, "{send}: the download differs");
        assert!(
            slowest < Duration::from_secs(2),
            "{send}: a small request took {slowest:?} during the download"
        );
        // Memory stays flat: no whole-file buffer.
        let (status, _) = srv.stop();
        assert!(status.success());
    }
}

#[test]
fn memory_stays_flat_while_serving_a_gigabyte() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::File::create(root.join("big.img"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    for (model, send) in [
        ("thread", "read"),
        ("epoll", "mmap"),
        ("fork", "sendfile"),
        ("tokio", "read"),
    ] {
        let srv = http_server(&root, &["--send", send, "--model", model, "--workers", "2"]);
        let mut s = TcpStream::connect(&srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /big.img HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut peak = 0u64;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
            if got % (64 << 20) < (1 << 20) {
                let mut pids = vec![srv.pid()];
                pids.extend(children_of(srv.pid()).into_iter().map(|c| c.0));
                // mmap'd file pages count as resident while mapped: bounded by the window.
                peak = peak.max(pids.iter().map(|&p| rss_kib(p)).max().unwrap_or(0));
            }
        }
        assert!(got > 1 << 30, "{model}/{send}: got {got}");
        assert!(
            peak < 64 * 1024,
            "{model}/{send}: {peak} KiB resident while sending 1 GiB"
        );
        assert!(srv.stop().0.success());
    }
}

#[test]
fn headless_chromium_renders_a_page_with_an_image_and_a_listing() {
    if std::env::var_os("SOCKLAB_SKIP_BROWSER").is_some() {
        eprintln!("SOCKLAB_SKIP_BROWSER set: skipping the browser test");
        return;
    }
    let (_d, root) = site();
    let srv = http_server(&root, &["-v"]);
    let profile = tempfile::tempdir().unwrap();
    let shot_dir = tempfile::tempdir().unwrap();
    let shot = shot_dir.path().join("page.png");
    let chromium = |extra: &[&str], url: &str| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium is needed: .ci/run installs it (SOCKLAB_SKIP_BROWSER=1 skips)")
    };
    let base = format!("http://{}", srv.addr);
    let dom = chromium(&["--dump-dom"], &format!("{base}/"));
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("It works") && dom.contains("pic.png"), "{dom}");
    let listing = chromium(&["--dump-dom"], &format!("{base}/files/"));
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("Index of /files/") && listing.contains("hello.txt"),
        "{listing}"
    );
    let out = chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=400,300",
        ],
        &format!("{base}/"),
    );
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 1000,
        "screenshot looks blank ({} bytes)",
        png.len()
    );
    let (_, log) = srv.stop();
    // The browser fetched the image (the access log at -v shows it).
    assert!(log.contains("/pic.png"), "{log}");
}

/// Issue 13, item 1: a file whose modification time is past year 9999 (which an HTTP date
/// cannot express) is served by every model, twice, and the server goes on (building
/// `Last-Modified` panicked: epoll and poll exited, reactors and pool lost a loop or a
/// worker per request, the others dropped the connection).
#[test]
fn a_file_from_after_the_year_9999_is_served_by_every_model() {
    // tmpfs keeps such a time; ext4 stops at 2446.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let future = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(253_436_860_800);
    let f = std::fs::File::create(dir.path().join("f.txt")).unwrap();
    std::io::Write::write_all(&mut &f, b"from the future\n").unwrap();
    f.set_modified(future).unwrap();
    assert_eq!(f.metadata().unwrap().modified().unwrap(), future);
    std::fs::write(dir.path().join("now.txt"), b"now\n").unwrap();
    for model in MODELS {
        let srv = http_server(dir.path(), &["--model", model, "--workers", "1"]);
        for _ in 0..2 {
            let a = raw(
                &srv.addr,
                b"GET /f.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            assert!(
                a.starts_with("HTTP/1.1 200") && a.ends_with("from the future\n"),
                "{model}: {a:?}"
            );
        }
        let a = raw(
            &srv.addr,
            b"GET /now.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(a.ends_with("now\n"), "{model}: {a:?}");
        let (status, err) = srv.stop();
        assert!(status.success(), "{model}: {status:?} {err}");
    }
}

/// Items 6, 7 and 12 over the wire: smuggling attempts are refused and close the
/// connection, `Host` is required, a stale `If-Range` gets the whole file, and a name that
/// is not UTF-8 is reachable through the listing's link (curl follows it).
#[test]
fn framing_if_range_and_raw_byte_names_over_the_wire() {
    use std::os::unix::ffi::OsStrExt;
    let (_d, root) = site();
    let name = std::ffi::OsStr::from_bytes(b"r\xe9sum\xe9.txt");
    std::fs::write(root.join("files").join(name), b"latin-1\n").unwrap();
    let srv = http_server(&root, &[]);
    for smuggle in [
        &b"GET /files/hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\nGET /files/data.bin HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /files/hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
        b"GET /files/hello.txt HTTP/1.1\r\n\r\n",
        b"GET /files/hello.txt HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        let a = raw(&srv.addr, smuggle);
        assert!(
            a.starts_with("HTTP/1.1 400") && a.matches("HTTP/1.1 ").count() == 1,
            "{a}"
        );
    }
    let base = format!("http://{}", srv.addr);
    let out = curl(&[
        "-H",
        "If-Range: \"stale\"",
        "-r",
        "0-4",
        "-w",
        "%{http_code}",
        &format!("{base}/files/hello.txt"),
    ]);
    assert_eq!(
        out.stdout, b"hello, world\n200",
        "a stale If-Range: the whole file"
    );
    let out = curl(&[&format!("{base}/files/")]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let href = listing
        .split("href=\"")
        .filter_map(|s| s.split('"').next())
        .find(|h| h.starts_with("r%E9sum"))
        .unwrap_or_else(|| panic!("no link for the Latin-1 name: {listing}"));
    let out = curl(&[&format!("{base}/files/{href}")]);
    assert_eq!(out.stdout, b"latin-1\n", "{href}");
    assert!(srv.stop().0.success());
}

/// A GET (or HEAD) on a fresh connection: status, header block, body.
fn fetch(addr: &str, method: &str, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head")
        + 4;
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head[9..12].parse().unwrap();
    (status, head, out[end..].to_vec())
}

/// The header block without its `Date` line (which changes every second).
fn undated(head: &str) -> String {
    head.lines()
        .filter(|l| !l.starts_with("Date:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Issue 11: the response cache serves a small file from memory once it is settled, and
/// never serves it stale -- changed in place (same size), replaced by a rename, removed, or
/// its permissions changed: the next request sees it. Answers from the cache have the same
/// fields as those built from the file (ETag, Last-Modified...); ranges and conditional
/// requests behave as without the cache. Which answers came from the cache is read from
/// the server's debug log (`cached=true`).
#[test]
fn the_response_cache_never_serves_a_stale_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, body) in [
        ("changed.txt", "AAAA"),
        ("replaced.txt", "BBBB"),
        ("removed.txt", "CCCC"),
        ("perm.txt", "DDDD"),
        ("fresh.txt", "EEEE"),
    ] {
        std::fs::write(root.join(name), body).unwrap();
        std::fs::set_permissions(root.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // Files are cached once their last change is a second old (socklab::...::cache::SETTLE).
    std::thread::sleep(Duration::from_millis(1100));
    // As root, permissions do not stop reading; the server drops to nobody if it can.
    let root_user = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid() == 0
    };
    let wrapper: &[&str] = if root_user {
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        &[]
    };
    let args = [
        "http",
        "--root",
        root.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "-v",
    ];
    let srv = Server::start_as(wrapper, &args);
    let a = srv.addr.clone();
    let get = |path: &str| fetch(&a, "GET", path, "");

    // Filled, then served from the cache with the same fields and body.
    let (s1, h1, b1) = get("/changed.txt");
    let (s2, h2, b2) = get("/changed.txt");
    assert_eq!(
        (s1, s2, &b1[..], &b2[..]),
        (200, 200, &b"AAAA"[..], &b"AAAA"[..])
    );
    assert_eq!(undated(&h1), undated(&h2));
    let (s, h, b) = fetch(&a, "HEAD", "/changed.txt", "");
    assert_eq!((s, undated(&h), b.len()), (200, undated(&h1), 0));
    // Conditional and range requests take the normal path: 304 and 206 as always.
    let etag = h1
        .lines()
        .find_map(|l| l.strip_prefix("ETag: "))
        .unwrap()
        .to_string();
    let (s, _, _) = fetch(
        &a,
        "GET",
        "/changed.txt",
        &format!("If-None-Match: {etag}\r\n"),
    );
    assert_eq!(s, 304);
    let (s, h, b) = fetch(&a, "GET", "/changed.txt", "Range: bytes=1-2\r\n");
    assert_eq!((s, &b[..]), (206, &b"AA"[..]), "{h}");
    // Changed in place, same size.
    std::fs::write(root.join("changed.txt"), "XXXX").unwrap();
    assert_eq!(get("/changed.txt").2, b"XXXX");

    // Replaced by a rename.
    for _ in 0..2 {
        assert_eq!(get("/replaced.txt").2, b"BBBB");
    }
    std::fs::write(root.join("new.txt"), "YYYY").unwrap();
    std::fs::set_permissions(root.join("new.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(root.join("new.txt"), root.join("replaced.txt")).unwrap();
    assert_eq!(get("/replaced.txt").2, b"YYYY");

    // Removed.
    for _ in 0..2 {
        assert_eq!(get("/removed.txt").2, b"CCCC");
    }
    std::fs::remove_file(root.join("removed.txt")).unwrap();
    assert_eq!(get("/removed.txt").0, 404);

    // Permissions taken away: as a user the server cannot read it any more (403).
    for _ in 0..2 {
        assert_eq!(get("/perm.txt").2, b"DDDD");
    }
    std::fs::set_permissions(
        root.join("perm.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert_eq!(get("/perm.txt").0, 403);

    // A file changed less than a second ago is not cached (its times could repeat).
    std::fs::write(root.join("fresh.txt"), "FFFF").unwrap();
    for _ in 0..2 {
        assert_eq!(get("/fresh.txt").2, b"FFFF");
    }

    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
    let hits = |path: &str| {
        err.lines()
            .filter(|l| l.contains("cached=true") && l.contains(&format!("path=\"{path}\"")))
            .count()
    };
    assert_eq!(
        hits("/changed.txt"),
        2,
        "the second GET and the HEAD: {err}"
    );
    for path in ["/replaced.txt", "/removed.txt", "/perm.txt"] {
        assert_eq!(hits(path), 1, "{path}: {err}");
    }
    assert_eq!(hits("/fresh.txt"), 0, "{err}");
}
