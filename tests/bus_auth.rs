//! `socklab bus serve` with password files, ACLs and TLS, against real clients: Debian's
//! mosquitto_pub/sub, PyPI's paho-mqtt 2.x, raw bytes for exact reason codes, and socklab's
//! own `bus pub/sub`. Certificates are made by each test (rcgen).

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use util::{signal, wait_timeout, BIN};

/// A running `socklab bus serve`; its printed addresses in order (plain TCP, TLS, Unix).
struct Bus {
    child: Child,
    addrs: Vec<String>,
}

impl Bus {
    fn start(lines: usize, args: &[&str]) -> Bus {
        let mut child = Command::new(BIN)
            .args(["bus", "serve", "--workers", "2"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socklab bus serve");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut addrs = Vec::new();
        for _ in 0..lines {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert!(!line.trim().is_empty(), "an address line");
            addrs.push(line.trim().to_string());
        }
        Bus { child, addrs }
    }

    fn port(&self, i: usize) -> String {
        self.addrs[i].rsplit(':').next().unwrap().to_string()
    }

    fn raw(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addrs[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (.ci/run installs mosquitto-clients)"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn code(cmd: &str, args: &[&str]) -> i32 {
    run(cmd, args).status.code().unwrap_or(-1)
}

/// Start mosquitto_sub in the background; it is given time to subscribe.
fn sub_bg(args: &[&str]) -> Child {
    let c = Command::new("mosquitto_sub")
        .args(["-W", "15"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(500));
    c
}

fn finish(mut c: Child) -> String {
    wait_timeout(&mut c, Duration::from_secs(20)).expect("subscriber finished");
    let mut s = String::new();
    c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// Add users to a password file with `socklab bus passwd` (password on stdin).
fn passwd(file: &Path, users: &[(&str, &str)]) {
    for (u, p) in users {
        let mut c = Command::new(BIN)
            .args(["bus", "passwd"])
            .arg(file)
            .arg(u)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(format!("{p}\n").as_bytes())
            .unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            o.stdout.is_empty() && o.stderr.is_empty(),
            "nothing printed"
        );
    }
}

fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(kind: u8, body: Vec<u8>) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut p = vec![kind, body.len() as u8];
    p.extend(body);
    p
}

/// A CONNECT (3.1.1, or 5.0 with no properties), clean session, keep-alive 30.
fn connect_bytes(v5: bool, id: &str, user: Option<&str>, pw: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    mqtt_string(&mut b, b"MQTT");
    b.push(if v5 { 5 } else { 4 });
    b.push(0x02 | if user.is_some() { 0x80 } else { 0 } | if pw.is_some() { 0x40 } else { 0 });
    b.extend_from_slice(&[0, 30]);
    if v5 {
        b.push(0);
    }
    mqtt_string(&mut b, id.as_bytes());
    if let Some(u) = user {
        mqtt_string(&mut b, u.as_bytes());
    }
    if let Some(p) = pw {
        mqtt_string(&mut b, p.as_bytes());
    }
    packet(0x10, b)
}

/// Read one packet.
fn read_packet(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    assert!(head[1] < 128);
    let mut body = vec![0u8; head[1] as usize];
    s.read_exact(&mut body).unwrap();
    let mut p = head.to_vec();
    p.extend(body);
    p
}

/// Connect with raw bytes; the CONNACK's return/reason code.
fn connack(bus: &Bus, v5: bool, id: &str, user: Option<&str>, pw: Option<&str>) -> (u8, TcpStream) {
    let mut s = bus.raw();
    s.write_all(&connect_bytes(v5, id, user, pw)).unwrap();
    let p = read_packet(&mut s);
    assert_eq!(p[0], 0x20, "CONNACK");
    (p[3], s)
}

/// SUBSCRIBE (QoS 0 each) and the SUBACK's codes.
fn suback(s: &mut TcpStream, v5: bool, filters: &[&str]) -> Vec<u8> {
    let mut b = vec![0, 1];
    if v5 {
        b.push(0);
    }
    for f in filters {
        mqtt_string(&mut b, f.as_bytes());
        b.push(0);
    }
    s.write_all(&packet(0x82, b)).unwrap();
    let p = read_packet(s);
    assert_eq!(p[0], 0x90, "SUBACK");
    p[if v5 { 5 } else { 4 }..].to_vec()
}

fn files(dir: &Path, acl: &str, users: &[(&str, &str)]) -> (String, String) {
    let pw = dir.join("passwd");
    passwd(&pw, users);
    let a = dir.join("acl");
    std::fs::write(&a, acl).unwrap();
    (
        pw.to_string_lossy().into_owned(),
        a.to_string_lossy().into_owned(),
    )
}

#[test]
fn connack_codes_for_wrong_password_unknown_user_and_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let (pw, acl) = files(
        dir.path(),
        "user alice\ntopic readwrite #\n",
        &[("alice", "secret")],
    );
    let bus = Bus::start(
        1,
        &[
            "--listen",
            "127.0.0.1:0",
            "--passwords",
            &pw,
            "--acl",
            &acl,
            "--login-burst",
            "100",
        ],
    );
    // (user, password, 3.1.1 return code, 5.0 reason code)
    for (user, pass, v3, v5) in [
        (Some("alice"), Some("secret"), 0, 0),
        (Some("alice"), Some("wrong"), 4, 0x86),
        (Some("mallory"), Some("secret"), 4, 0x86),
        (Some("alice"), None, 4, 0x86),
        (None, None, 5, 0x87),
    ] {
        assert_eq!(
            connack(&bus, false, "c3", user, pass).0,
            v3,
            "3.1.1 {user:?} {pass:?}"
        );
        assert_eq!(
            connack(&bus, true, "c5", user, pass).0,
            v5,
            "5.0 {user:?} {pass:?}"
        );
    }
    // mosquitto_pub reports the same codes as its exit status.
    let p = bus.port(0);
    let pub_ = |extra: &[&str]| {
        let mut a = vec!["-p", p.as_str(), "-t", "t", "-m", "x"];
        a.extend_from_slice(extra);
        code("mosquitto_pub", &a)
    };
    assert_eq!(pub_(&["-u", "alice", "-P", "secret"]), 0);
    assert_eq!(pub_(&["-u", "alice", "-P", "nope"]), 4);
    assert_eq!(pub_(&[]), 5);
    assert_eq!(pub_(&["-V", "5", "-u", "alice", "-P", "nope"]), 0x86);
    assert_eq!(pub_(&["-V", "5"]), 0x87);
    // socklab's own client says why.
    let o = run(
        BIN,
        &[
            "bus",
            "pub",
            "--bus",
            &bus.addrs[0],
            "t",
            "x",
            "-u",
            "alice",
            "-P",
            "no",
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("BadUserNameOrPassword"));
    let o = run(
        BIN,
        &[
            "bus",
            "pub",
            "--bus",
            &bus.addrs[0],
            "t",
            "x",
            "-u",
            "alice",
            "-P",
            "secret",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

const MATRIX_ACL: &str = "\
user spy
topic read #
topic read $SYS/#

user w
topic write #

user alice
topic read r/exact
topic write w/exact
topic readwrite rw/+/x
topic deny rw/no/x

pattern readwrite u/%u/#
pattern read c/%c/#
";

#[test]
fn acl_matrix_with_paho_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let users = [("spy", "s"), ("w", "w"), ("alice", "a")];
    let (pw, acl) = files(dir.path(), MATRIX_ACL, &users);
    let bus = Bus::start(
        1,
        &["--listen", "127.0.0.1:0", "--passwords", &pw, "--acl", &acl],
    );
    // Alice (client id "cid1") subscribes to each filter and publishes to each topic; the
    // writer `w` publishes to each topic too; the spy sees everything that was accepted.
    let script = r##"
import sys, time, threading
import paho.mqtt.client as mqtt
port = int(sys.argv[1])
FILTERS = ["r/exact", "w/exact", "rw/+/x", "u/alice/#", "u/bob/#", "c/cid1/#", "c/other/#", "#"]
TOPICS = ["r/exact", "w/exact", "rw/yes/x", "rw/no/x", "u/alice/t", "u/bob/t", "c/cid1/t", "c/other/t"]
for v5 in (False, True):
    proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    got = {"spy": [], "alice": []}
    lock = threading.Lock()
    def mk(cid, user, pw, name):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)
        c.username_pw_set(user, pw)
        def on_message(cl, u, m, name=name):
            with lock: got[name].append(m.topic)
        c.on_message = on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c
    spy = mk("spy", "spy", "s", "spy")
    spy.subscribe("#", qos=1)
    alice = mk("cid1", "alice", "a", "alice")
    granted = {}
    done = threading.Event()
    def on_subscribe(c, u, mid, codes, props=None):
        granted[mid] = [rc.value if hasattr(rc, "value") else rc for rc in codes]
        if len(granted) == len(FILTERS): done.set()
    alice.on_subscribe = on_subscribe
    mids = [alice.subscribe(f, qos=1)[1] for f in FILTERS]
    assert done.wait(5), "SUBACKs"
    codes = [granted[m][0] for m in mids]
    denied = 0x87 if v5 else 0x80
    want = [1, denied, 1, 1, denied, 1, denied, denied]
    assert codes == want, (v5, codes, want)
    w = mk("w", "w", "w", "w")
    for t in TOPICS:
        alice.publish(t, b"a:" + t.encode(), qos=1).wait_for_publish(5)
        w.publish(t, b"w:" + t.encode(), qos=1).wait_for_publish(5)
    time.sleep(0.5)
    with lock:
        spy_seen = sorted(set(got["spy"]))
        alice_seen = sorted(got["alice"])
    # What alice may write reached the spy; the rest was dropped (3.1.1) or refused (5.0).
    alice_wrote = {"w/exact", "rw/yes/x", "u/alice/t"}
    assert set(spy_seen) == set(TOPICS), spy_seen
    # Alice reads: r/exact (w's), rw/yes/x (both), u/alice/t (both), c/cid1/t (w's);
    # never rw/no/x (deny inside her granted rw/+/x), nor anything she did not subscribe.
    want_alice = sorted(["r/exact", "rw/yes/x", "rw/yes/x", "u/alice/t", "u/alice/t", "c/cid1/t"])
    assert alice_seen == want_alice, (v5, alice_seen)
    for c in (spy, alice, w):
        c.disconnect(); c.loop_stop()
print("ok")
"##;
    util::python_ok(script, &[&bus.port(0)]);
}

#[test]
fn acl_with_mosquitto_clients_denied_subscription_and_publish() {
    let dir = tempfile::tempdir().unwrap();
    let users = [("spy", "s"), ("w", "w"), ("alice", "a")];
    let (pw, acl) = files(dir.path(), MATRIX_ACL, &users);
    let bus = Bus::start(
        1,
        &["--listen", "127.0.0.1:0", "--passwords", &pw, "--acl", &acl],
    );
    let p = bus.port(0);
    let p = p.as_str();
    // Denied subscriptions, exact codes over raw bytes: 3.1.1 0x80, 5.0 0x87.
    for (v5, denied) in [(false, 0x80), (true, 0x87)] {
        let (rc, mut s) = connack(&bus, v5, "cid1", Some("alice"), Some("a"));
        assert_eq!(rc, 0);
        assert_eq!(
            suback(&mut s, v5, &["r/exact", "w/exact", "u/alice/+"]),
            [0, denied, 0]
        );
    }
    // mosquitto_sub: %u and %c granted, others' topics not.
    let mine = sub_bg(&[
        "-p",
        p,
        "-u",
        "alice",
        "-P",
        "a",
        "-i",
        "cid1",
        "-t",
        "u/alice/#",
        "-t",
        "c/cid1/#",
        "-C",
        "2",
        "-v",
    ]);
    for t in ["u/bob/t", "u/alice/t", "c/other/t", "c/cid1/t"] {
        ok(
            "mosquitto_pub",
            &["-p", p, "-u", "w", "-P", "w", "-t", t, "-m", "m", "-q", "1"],
        );
    }
    assert_eq!(finish(mine), "u/alice/t m\nc/cid1/t m\n");
    // A denied publish: dropped for 3.1.1 (exit 0, nothing routed), 0x87 for 5.0 QoS 1.
    let spy = sub_bg(&[
        "-p", p, "-u", "spy", "-P", "s", "-t", "r/#", "-t", "w/#", "-C", "1", "-v",
    ]);
    assert_eq!(
        code(
            "mosquitto_pub",
            &["-p", p, "-u", "alice", "-P", "a", "-t", "r/exact", "-m", "no", "-q", "1"]
        ),
        0
    );
    let o = run(
        "mosquitto_pub",
        &[
            "-p", p, "-V", "5", "-u", "alice", "-P", "a", "-t", "r/exact", "-m", "no", "-q", "1",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .to_lowercase()
            .contains("not authori"),
        "{o:?}"
    );
    ok(
        "mosquitto_pub",
        &[
            "-p", p, "-u", "alice", "-P", "a", "-t", "w/exact", "-m", "yes", "-q", "1",
        ],
    );
    assert_eq!(finish(spy), "w/exact yes\n");
}

#[test]
fn retained_messages_never_leak_and_sys_is_guarded() {
    let dir = tempfile::tempdir().unwrap();
    let acl = "user w\ntopic write #\nuser r\ntopic read a/#\ntopic deny a/secret\ntopic read #\n\
               user admin\ntopic read $SYS/#\n";
    let (pw, acl) = files(dir.path(), acl, &[("w", "w"), ("r", "r"), ("admin", "x")]);
    let bus = Bus::start(
        1,
        &[
            "--listen",
            "127.0.0.1:0",
            "--passwords",
            &pw,
            "--acl",
            &acl,
            "--sys-interval",
            "1s",
        ],
    );
    let p = bus.port(0);
    let p = p.as_str();
    for (t, m) in [("a/secret", "s"), ("a/open", "o"), ("b/x", "b")] {
        ok(
            "mosquitto_pub",
            &[
                "-p", p, "-u", "w", "-P", "w", "-t", t, "-m", m, "-r", "-q", "1",
            ],
        );
    }
    for v in ["311", "5"] {
        for filter in ["a/#", "#", "+/secret", "a/+"] {
            let o = run(
                "mosquitto_sub",
                &[
                    "-p", p, "-V", v, "-u", "r", "-P", "r", "-t", filter, "-W", "2", "-v",
                ],
            );
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(!out.contains("a/secret"), "{filter} {v}: {out}");
            assert_eq!(
                out.contains("a/open o"),
                filter != "+/secret",
                "{filter} {v}: {out}"
            );
        }
    }
    // $SYS: `#` does not reach it, a subscription to it is refused without a rule, and
    // granted with one.
    let o = run(
        "mosquitto_sub",
        &[
            "-p", p, "-u", "r", "-P", "r", "-t", "$SYS/#", "-W", "3", "-v",
        ],
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("$SYS"));
    let (rc, mut s) = connack(&bus, true, "r5", Some("r"), Some("r"));
    assert_eq!(rc, 0);
    assert_eq!(
        suback(&mut s, true, &["$SYS/#", "$SYS/broker/uptime"]),
        [0x87, 0x87]
    );
    let admin = ok(
        "mosquitto_sub",
        &[
            "-p",
            p,
            "-u",
            "admin",
            "-P",
            "x",
            "-t",
            "$SYS/broker/uptime",
            "-C",
            "1",
            "-W",
            "5",
            "-v",
        ],
    );
    assert!(admin.starts_with("$SYS/broker/uptime "), "{admin}");
}

/// A CA, a server certificate for 127.0.0.1/localhost, and client certificates for `alice`
/// (this CA) and `eve` (another CA), as PEM files.
fn pki(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(p, key))
    };
    let (ca_pem, issuer) = ca("bus test CA");
    let (_, other) = ca("another CA");
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    let leaf = |names: Vec<String>, cn: &str, file: &str, by: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, by).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "bus",
        "server",
        &issuer,
    );
    leaf(vec![], "alice", "alice", &issuer);
    leaf(vec![], "eve", "eve", &other);
    dir.to_path_buf()
}

#[test]
fn tls_with_mosquitto_paho_and_socklab_and_plain_clients_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = pki(dir.path());
    let (pw, acl) = files(
        dir.path(),
        "user alice\ntopic readwrite t/#\n",
        &[("alice", "secret")],
    );
    let s = |f: &str| d.join(f).to_string_lossy().into_owned();
    let bus = Bus::start(
        2,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &s("server.pem"),
            "--tls-key",
            &s("server.key"),
            "--passwords",
            &pw,
            "--acl",
            &acl,
        ],
    );
    let (plain, tls) = (bus.port(0), bus.port(1));
    let ca = s("ca.pem");
    let login = ["-u", "alice", "-P", "secret"];
    // mosquitto over TLS in, a plain subscriber out.
    let sub = sub_bg(&[
        "-p", &plain, "-u", "alice", "-P", "secret", "-t", "t/#", "-C", "3", "-v",
    ]);
    let mut a = vec![
        "-p",
        tls.as_str(),
        "--cafile",
        ca.as_str(),
        "-t",
        "t/mosq",
        "-m",
        "1",
        "-q",
        "1",
    ];
    a.extend_from_slice(&login);
    ok("mosquitto_pub", &a);
    // socklab bus pub over TLS.
    ok(
        BIN,
        &[
            "bus",
            "pub",
            "--bus",
            &bus.addrs[1],
            "--cafile",
            &ca,
            "-u",
            "alice",
            "-P",
            "secret",
            "-q",
            "1",
            "t/socklab",
            "2",
        ],
    );
    // paho over TLS.
    let script = r#"
import sys, ssl
import paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-tls", protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=sys.argv[2])
c.username_pw_set("alice", "secret")
c.connect("127.0.0.1", int(sys.argv[1]))
c.loop_start()
c.publish("t/paho", b"3", qos=1).wait_for_publish(5)
c.disconnect(); c.loop_stop()
print("ok")
"#;
    util::python_ok(script, &[&tls, &ca]);
    assert_eq!(finish(sub), "t/mosq 1\nt/socklab 2\nt/paho 3\n");
    // A plain client on the TLS port, and a TLS client on the plain port, get nowhere.
    let mut a = vec!["-p", tls.as_str(), "-t", "t/x", "-m", "x"];
    a.extend_from_slice(&login);
    assert_ne!(code("mosquitto_pub", &a), 0);
    let mut a = vec![
        "-p",
        plain.as_str(),
        "--cafile",
        ca.as_str(),
        "-t",
        "t/x",
        "-m",
        "x",
    ];
    a.extend_from_slice(&login);
    assert_ne!(code("mosquitto_pub", &a), 0);
    let mut raw = TcpStream::connect(&bus.addrs[1]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&connect_bytes(
        false,
        "plain",
        Some("alice"),
        Some("secret"),
    ))
    .unwrap();
    let mut back = Vec::new();
    let _ = raw.read_to_end(&mut back);
    assert!(!back.starts_with(&[0x20]), "no CONNACK in the clear");
    // The broker still serves everyone else.
    let mut a = vec![
        "-p",
        tls.as_str(),
        "--cafile",
        ca.as_str(),
        "-t",
        "t/x",
        "-m",
        "x",
    ];
    a.extend_from_slice(&login);
    ok("mosquitto_pub", &a);
}

#[test]
fn client_certificate_is_the_user_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = pki(dir.path());
    let s = |f: &str| d.join(f).to_string_lossy().into_owned();
    let (pw, acl) = files(
        dir.path(),
        "user alice\ntopic readwrite alice/#\nuser spy\ntopic read #\n",
        &[("spy", "s")],
    );
    let bus = Bus::start(
        2,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &s("server.pem"),
            "--tls-key",
            &s("server.key"),
            "--tls-client-ca",
            &s("ca.pem"),
            "--passwords",
            &pw,
            "--acl",
            &acl,
        ],
    );
    let (plain, tls) = (bus.port(0), bus.port(1));
    let (ca, cert, key) = (s("ca.pem"), s("alice.pem"), s("alice.key"));
    let spy = sub_bg(&[
        "-p", &plain, "-u", "spy", "-P", "s", "-t", "#", "-C", "2", "-v",
    ]);
    // No user name or password: the certificate says alice, and alice's rules apply.
    let tls_pub = |topic: &str, extra: &[&str]| {
        let mut a = vec![
            "-p",
            tls.as_str(),
            "--cafile",
            ca.as_str(),
            "-t",
            topic,
            "-m",
            "c",
            "-q",
            "1",
        ];
        a.extend_from_slice(extra);
        code("mosquitto_pub", &a)
    };
    assert_eq!(tls_pub("other/x", &["--cert", &cert, "--key", &key]), 0); // dropped: not alice's
    assert_eq!(tls_pub("alice/x", &["--cert", &cert, "--key", &key]), 0);
    // A user name in CONNECT does not override the certificate.
    assert_eq!(
        tls_pub(
            "alice/y",
            &["--cert", &cert, "--key", &key, "-u", "spy", "-P", "s"]
        ),
        0
    );
    assert_eq!(finish(spy), "alice/x c\nalice/y c\n");
    // No certificate, or one from another CA: the handshake fails.
    assert_ne!(tls_pub("alice/z", &[]), 0);
    assert_ne!(
        tls_pub(
            "alice/z",
            &["--cert", &s("eve.pem"), "--key", &s("eve.key")]
        ),
        0
    );
    // socklab's clients show certificates too.
    ok(
        BIN,
        &[
            "bus",
            "pub",
            "--bus",
            &bus.addrs[1],
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-q",
            "1",
            "alice/s",
            "x",
        ],
    );
}

#[test]
fn sighup_reload_changes_rights_of_live_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let acl1 = "user r\ntopic read a/#\ntopic read b/#\nuser w\ntopic write #\n";
    let (pw, acl) = files(dir.path(), acl1, &[("r", "r"), ("w", "w"), ("gone", "g")]);
    let bus = Bus::start(
        1,
        &["--listen", "127.0.0.1:0", "--passwords", &pw, "--acl", &acl],
    );
    let p = bus.port(0);
    // A live 5.0 session subscribed to both; another client that will lose its account.
    let (rc, mut r) = connack(&bus, true, "reader", Some("r"), Some("r"));
    assert_eq!(rc, 0);
    assert_eq!(suback(&mut r, true, &["a/#", "b/#"]), [0, 0]);
    let (rc, mut gone) = connack(&bus, true, "gone", Some("gone"), Some("g"));
    assert_eq!(rc, 0);
    // New rules: b/# withdrawn; "gone" removed from the password file, "new" added.
    std::fs::write(
        &acl,
        "user r\ntopic read a/#\nuser w\ntopic write #\nuser new\ntopic read #\n",
    )
    .unwrap();
    let pwf = PathBuf::from(&pw);
    std::fs::write(&pwf, "").unwrap();
    passwd(&pwf, &[("r", "r"), ("w", "w"), ("new", "n")]);
    signal(bus.child.id(), libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    // The removed user is disconnected (5.0: DISCONNECT 0x87).
    let d = read_packet(&mut gone);
    assert_eq!((d[0], d[2]), (0xe0, 0x87), "{d:?}");
    for t in ["b/1", "a/1"] {
        ok(
            "mosquitto_pub",
            &["-p", &p, "-u", "w", "-P", "w", "-t", t, "-m", t, "-q", "1"],
        );
    }
    let first = read_packet(&mut r);
    assert_eq!(first[0] & 0xf0, 0x30, "a PUBLISH");
    assert!(
        first.windows(3).any(|w| w == b"a/1"),
        "b/1 was not delivered first: {first:?}"
    );
    // The live session still works, the new user can log in, the old one cannot.
    assert_eq!(connack(&bus, false, "n", Some("new"), Some("n")).0, 0);
    assert_eq!(connack(&bus, false, "g", Some("gone"), Some("g")).0, 4);
    // A bad file is refused and the rules in force stay.
    std::fs::write(&acl, "bogus line\n").unwrap();
    signal(bus.child.id(), libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(connack(&bus, false, "n2", Some("new"), Some("n")).0, 0);
    ok(
        "mosquitto_pub",
        &["-p", &p, "-u", "w", "-P", "w", "-t", "a/2", "-m", "x"],
    );
    let next = read_packet(&mut r);
    assert!(next.windows(3).any(|w| w == b"a/2"));
}

#[test]
fn login_brute_force_is_slowed() {
    let dir = tempfile::tempdir().unwrap();
    let (pw, acl) = files(dir.path(), "", &[("alice", "right")]);
    let bus = Bus::start(
        1,
        &[
            "--listen",
            "127.0.0.1:0",
            "--passwords",
            &pw,
            "--acl",
            &acl,
            "--login-burst",
            "5",
            "--login-interval",
            "1s",
        ],
    );
    // Guess for two seconds from one address; count the guesses the broker checked (0x86)
    // and those it refused unchecked (0x9F, connection rate exceeded).
    let t0 = Instant::now();
    let (mut checked, mut slowed) = (0u32, 0u32);
    let mut i = 0;
    while t0.elapsed() < Duration::from_secs(2) {
        i += 1;
        match connack(
            &bus,
            true,
            "guess",
            Some("alice"),
            Some(&format!("guess{i}")),
        )
        .0
        {
            0x86 => checked += 1,
            0x9f => slowed += 1,
            other => panic!("unexpected reason {other:#x}"),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "brute force: {} attempts in {secs:.2} s, {checked} checked ({:.1}/s), {slowed} refused unchecked",
        checked + slowed,
        checked as f64 / secs
    );
    assert!(
        checked <= 5 + secs.ceil() as u32 + 1,
        "{checked} checked in {secs:.2} s"
    );
    assert!(slowed > 0);
    // Even the right password waits while the source has no attempt left (a guess that is
    // refused unchecked first shows the bucket is empty; one refills per second); 3.1.1 is
    // told "server unavailable".
    let empty = || while connack(&bus, true, "g", Some("alice"), Some("guess")).0 != 0x9f {};
    let waits = (0..3).any(|_| {
        empty();
        connack(&bus, true, "a", Some("alice"), Some("right")).0 == 0x9f
    });
    assert!(waits, "the right password was checked while slowed");
    let waits = (0..3).any(|_| {
        empty();
        connack(&bus, false, "a", Some("alice"), Some("right")).0 == 3
    });
    assert!(waits);
    // Over the Unix socket or from another address the limit is separate: not tested here
    // (one loopback address); the unit tests of the limiter cover sources.
}

#[test]
fn unix_peer_credentials_stand_for_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let me = nix_user();
    let (pw, acl) = files(
        dir.path(),
        &format!("user {me}\ntopic readwrite mine/#\n"),
        &[("alice", "a")],
    );
    let sock = dir.path().join("bus.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let bus = Bus::start(
        2,
        &[
            "--listen",
            "127.0.0.1:0",
            "--unix",
            &sock_s,
            "--passwords",
            &pw,
            "--acl",
            &acl,
            "--unix-peer-user",
        ],
    );
    // Over TCP, no user name is anonymous and refused; over the Unix socket it is the uid's.
    assert_eq!(connack(&bus, false, "t", None, None).0, 5);
    let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    u.write_all(&connect_bytes(false, "u", None, None)).unwrap();
    let mut ack = [0u8; 4];
    u.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    // And that user's rules apply.
    let o = run(
        BIN,
        &[
            "bus", "pub", "--bus", &sock_s, "-q", "1", "-V", "5", "other/x", "m",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("NotAuthorized"),
        "{o:?}"
    );
    ok(
        BIN,
        &[
            "bus", "pub", "--bus", &sock_s, "-q", "1", "-V", "5", "mine/x", "m",
        ],
    );
    let _ = bus;
}

/// The login name of this process's uid (what SO_PEERCRED maps to).
fn nix_user() -> String {
    let o = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn passwd_creates_updates_deletes_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    passwd(&f, &[("alice", "first"), ("bob", "b")]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read_to_string(&f).unwrap();
    assert!(before.starts_with("alice:$argon2id$") && !before.contains("first"));
    passwd(&f, &[("alice", "second")]);
    let after = std::fs::read_to_string(&f).unwrap();
    assert_ne!(before.lines().next(), after.lines().next());
    assert_eq!(before.lines().nth(1), after.lines().nth(1), "bob untouched");
    let fs = f.to_string_lossy().into_owned();
    let o = run(BIN, &["bus", "passwd", &fs, "bob", "--delete"]);
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(&f).unwrap().lines().count(), 1);
    for (args, word) in [
        (
            vec!["bus", "passwd", fs.as_str(), "bob", "--delete"],
            "no user",
        ),
        (vec!["bus", "passwd", fs.as_str(), "a:b"], "':'"),
    ] {
        let o = run(BIN, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(word) && e.lines().count() == 1, "{e}");
    }
    // An empty password on stdin is refused.
    let o = Command::new(BIN)
        .args(["bus", "passwd", &fs, "carol"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    // A bad file makes `bus serve` stop with one line, exit 2.
    std::fs::write(&f, "alice:not-a-hash\n").unwrap();
    let o = run(
        BIN,
        &[
            "bus",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--passwords",
            &fs,
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 1"));
    let _ = wait_timeout;
}
