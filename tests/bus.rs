//! `socklab bus` against real MQTT clients: Debian's mosquitto_pub/sub (3.1.1 and 5.0) and
//! PyPI's paho-mqtt 2.x against `socklab bus serve`, socklab's own clients against Debian's
//! mosquitto broker, durability across kill -9, malformed packets, thousands of clients and a
//! subscriber that never reads.

mod util;

use socklab::bus::client::{Client, ConnectOptions};
use socklab::bus::codec::Version;
use socklab::net::Endpoint;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use util::{eventually, rss_kib, signal, wait_timeout, BIN};

/// A running `socklab bus serve`, killed if a test forgets to stop it.
struct Bus {
    child: Child,
    addr: String,
    port: String,
}

impl Bus {
    fn start(extra: &[&str]) -> Bus {
        let mut child = Command::new(BIN)
            .args(["bus", "serve", "--listen", "127.0.0.1:0", "--workers", "2"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socklab bus serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().to_string();
        assert!(!addr.is_empty(), "no address printed");
        let port = addr.rsplit(':').next().unwrap().to_string();
        Bus { child, addr, port }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Inet(self.addr.clone())
    }

    fn raw(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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

/// Start mosquitto_sub in the background; it is given time to subscribe.
fn sub_bg(port: &str, args: &[&str]) -> Child {
    let c = Command::new("mosquitto_sub")
        .args(["-p", port, "-W", "20"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(400));
    c
}

fn finish(mut c: Child) -> String {
    wait_timeout(&mut c, Duration::from_secs(25)).expect("subscriber finished");
    let mut s = String::new();
    c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

fn python(script: &str, args: &[&str]) {
    util::python_ok(script, args);
}

#[test]
fn retained_set_replace_clear_with_mosquitto_clients_both_versions() {
    let bus = Bus::start(&[]);
    let p = bus.port.as_str();
    for v in ["311", "5"] {
        let t = format!("ret/{v}");
        ok(
            "mosquitto_pub",
            &["-p", p, "-V", v, "-t", &t, "-m", "one", "-r"],
        );
        ok(
            "mosquitto_pub",
            &["-p", p, "-V", v, "-t", &t, "-m", "two", "-r", "-q", "1"],
        );
        let got = ok(
            "mosquitto_sub",
            &["-p", p, "-V", v, "-t", &t, "-C", "1", "-W", "5", "-v"],
        );
        assert_eq!(got, format!("{t} two\n"));
        ok("mosquitto_pub", &["-p", p, "-V", v, "-t", &t, "-n", "-r"]);
        let o = run(
            "mosquitto_sub",
            &["-p", p, "-V", v, "-t", &t, "-C", "1", "-W", "1"],
        );
        assert!(o.stdout.is_empty(), "cleared: {:?}", o.stdout);
    }
}

#[test]
fn wills_on_abnormal_disconnect_only() {
    let bus = Bus::start(&[]);
    let p = bus.port.as_str();
    let watcher = sub_bg(p, &["-t", "will/#", "-C", "1", "-v"]);
    // A normal disconnect: no will.
    ok(
        "mosquitto_pub",
        &[
            "-p",
            p,
            "-t",
            "x",
            "-m",
            "m",
            "--will-topic",
            "will/normal",
            "--will-payload",
            "no",
        ],
    );
    // A client killed with SIGKILL: its will goes out.
    let mut dying = Command::new("mosquitto_sub")
        .args([
            "-p",
            p,
            "-t",
            "nothing",
            "--will-topic",
            "will/abnormal",
            "--will-payload",
            "gone",
            "-V",
            "5",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    dying.kill().unwrap();
    dying.wait().unwrap();
    assert_eq!(finish(watcher), "will/abnormal gone\n");
}

#[test]
fn keep_alive_expires_after_one_and_a_half_intervals() {
    let bus = Bus::start(&[]);
    let watcher = sub_bg(&bus.port, &["-t", "ka", "-C", "1"]);
    // CONNECT 3.1.1, keep-alive 1 s, will "ka" = "dead"; then silence.
    let mut s = bus.raw();
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0b0000_0110,
        0,
        1,
        0,
        1,
        b'k',
    ];
    body.extend_from_slice(&[0, 2, b'k', b'a', 0, 4, b'd', b'e', b'a', b'd']);
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend(body);
    s.write_all(&pkt).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "closed by the broker");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(finish(watcher), "dead\n");
}

#[test]
fn offline_queueing_session_expiry_and_redelivery_with_dup() {
    let bus = Bus::start(&[]);
    let p = bus.port.as_str();
    // A persistent 3.1.1 session subscribes at QoS 1, goes away; messages queue.
    run(
        "mosquitto_sub",
        &[
            "-p", p, "-i", "keeper", "-c", "-q", "1", "-t", "q", "-W", "1", "-C", "1",
        ],
    );
    for m in ["a", "b", "c"] {
        ok("mosquitto_pub", &["-p", p, "-t", "q", "-m", m, "-q", "1"]);
    }
    let got = ok(
        "mosquitto_sub",
        &[
            "-p", p, "-i", "keeper", "-c", "-q", "1", "-t", "q", "-C", "3", "-W", "5",
        ],
    );
    assert_eq!(got, "a\nb\nc\n");

    // 5.0: a session with expiry 1 s is gone 1 s after disconnecting.
    let o = run(
        "mosquitto_sub",
        &[
            "-p", p, "-V", "5", "-i", "short", "-c", "-x", "1", "-q", "1", "-t", "e", "-W", "1",
        ],
    );
    let _ = o;
    std::thread::sleep(Duration::from_millis(2500));
    ok(
        "mosquitto_pub",
        &["-p", p, "-t", "e", "-m", "late", "-q", "1"],
    );
    let o = run(
        "mosquitto_sub",
        &[
            "-p", p, "-V", "5", "-i", "short", "-c", "-x", "1", "-q", "1", "-t", "nothing", "-C",
            "1", "-W", "1",
        ],
    );
    assert!(o.stdout.is_empty(), "the expired session kept nothing");

    // Redelivery: receive a QoS 1 message without acknowledging it, reconnect: DUP is set.
    let o = ConnectOptions {
        version: Version::V311,
        client_id: "nodack".into(),
        clean: false,
        ..Default::default()
    };
    let (mut c, _) = Client::connect(&bus.endpoint(), &o).unwrap();
    c.subscribe(&["dup".into()], mqtt_proto::QoS::Level1)
        .unwrap();
    ok(
        "mosquitto_pub",
        &["-p", p, "-t", "dup", "-m", "x", "-q", "1"],
    );
    match c.read_packet().unwrap() {
        mqtt_proto::v5::Packet::Publish(p) => assert!(!p.dup),
        other => panic!("{other:?}"),
    }
    drop(c); // no PUBACK
    let (mut c, ack) = Client::connect(&bus.endpoint(), &o).unwrap();
    assert!(ack.session_present);
    match c.read_packet().unwrap() {
        mqtt_proto::v5::Packet::Publish(p) => {
            assert!(p.dup, "redelivered with DUP");
            assert_eq!(&p.payload[..], b"x");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sys_topics_report_the_broker() {
    let bus = Bus::start(&["--sys-interval", "1s"]);
    let got = ok(
        "mosquitto_sub",
        &[
            "-p",
            &bus.port,
            "-t",
            "$SYS/broker/#",
            "-v",
            "-C",
            "11",
            "-W",
            "5",
        ],
    );
    for t in [
        "uptime",
        "clients/connected",
        "messages/received",
        "bytes/sent",
        "subscriptions/count",
        "retained messages/count",
    ] {
        assert!(
            got.contains(&format!("$SYS/broker/{t} ")),
            "{t} missing in {got}"
        );
    }
    // `#` alone does not see $SYS.
    let o = run(
        "mosquitto_sub",
        &["-p", &bus.port, "-t", "#", "-C", "1", "-W", "2"],
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn oversize_packets_are_refused_with_0x95() {
    let bus = Bus::start(&["--max-packet", "1k"]);
    let mut s = bus.raw();
    let connect = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 0, 0, 0];
    s.write_all(&connect).unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    let mut rest = vec![0u8; head[1] as usize];
    s.read_exact(&mut rest).unwrap();
    assert_eq!(head[0], 0x20);
    // A PUBLISH declaring 2000 bytes: refused before it is read.
    s.write_all(&[0x30, 0xd0, 0x0f, 0, 1, b't']).unwrap();
    let mut d = Vec::new();
    let _ = s.read_to_end(&mut d);
    assert_eq!(
        (d[0], d[2]),
        (0xe0, 0x95),
        "DISCONNECT Packet too large: {d:x?}"
    );
    // A small one still goes through.
    ok(
        "mosquitto_pub",
        &[
            "-p", &bus.port, "-t", "t", "-m", "small", "-q", "1", "-V", "5",
        ],
    );
}

const PAHO_COMMON: &str = r#"
import sys, time, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
port = int(sys.argv[1])
def client(cid, v5=True, clean=True):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                    **({} if v5 else {"clean_session": clean}))
    return c
"#;

#[test]
fn paho_request_response_properties_and_topic_aliases() {
    let bus = Bus::start(&[]);
    let script = format!(
        "{PAHO_COMMON}{}",
        r#"
got = []
done = threading.Event()
def on_message(c, u, m):
    got.append(m)
    if len(got) == 3: done.set()
sub = client("rr-sub")
sub.on_message = on_message
sub.connect("127.0.0.1", port)
sub.subscribe("req/#", qos=1)
sub.loop_start()
time.sleep(0.3)
pub = client("rr-pub")
pub.connect("127.0.0.1", port)
pub.loop_start()
props = Properties(PacketTypes.PUBLISH)
props.ResponseTopic = "resp/1"
props.CorrelationData = b"\x01\x02id"
props.UserProperty = [("k", "v"), ("k", "w")]
props.PayloadFormatIndicator = 1
props.ContentType = "text/plain"
pub.publish("req/a", b"call", qos=1, properties=props).wait_for_publish(5)
# Topic alias: set alias 1 on first use, then publish with an empty topic.
a = Properties(PacketTypes.PUBLISH); a.TopicAlias = 1
pub.publish("req/alias", b"first", qos=1, properties=a).wait_for_publish(5)
pub.publish("", b"second", qos=1, properties=a).wait_for_publish(5)
assert done.wait(5), "messages not received: %d" % len(got)
m = got[0]
assert m.properties.ResponseTopic == "resp/1", m.properties
assert m.properties.CorrelationData == b"\x01\x02id"
assert m.properties.UserProperty == [("k", "v"), ("k", "w")], m.properties.UserProperty
assert m.properties.ContentType == "text/plain"
assert [x.topic for x in got[1:]] == ["req/alias", "req/alias"], [x.topic for x in got]
assert [x.payload for x in got[1:]] == [b"first", b"second"]
print("ok")
"#
    );
    python(&script, &[&bus.port]);
}

#[test]
fn paho_qos2_exactly_once_across_a_forced_reconnect() {
    let bus = Bus::start(&[]);
    // A subscriber with a persistent session receives QoS 2 messages while its connection
    // is cut mid-stream (the socket shut down under paho); after it reconnects, every
    // message has arrived exactly once.
    let script = format!(
        "{PAHO_COMMON}{}",
        r#"
import socket
N = 200
seen = []
lock = threading.Lock()
def on_message(c, u, m):
    with lock: seen.append(int(m.payload))
sub = client("eo-sub", v5=False, clean=False)
sub.on_message = on_message
sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe("eo", qos=2)
sub.reconnect_delay_set(0.1, 0.2)
sub.connect("127.0.0.1", port)
sub.loop_start()
time.sleep(0.5)
pub = client("eo-pub", v5=False)
pub.connect("127.0.0.1", port)
pub.loop_start()
infos = []
for i in range(N):
    infos.append(pub.publish("eo", str(i), qos=2))
    if i == N // 2:
        s = sub.socket()
        if s is not None:
            s.shutdown(socket.SHUT_RDWR)
for i in infos: i.wait_for_publish(10)
deadline = time.time() + 15
while time.time() < deadline:
    with lock:
        if len(set(seen)) == N: break
    time.sleep(0.1)
time.sleep(0.5)
with lock:
    assert sorted(seen) == list(range(N)), "missing %s dup %d" % (sorted(set(range(N)) - set(seen))[:10], len(seen) - len(set(seen)))
print("ok")
"#
    );
    python(&script, &[&bus.port]);
}

#[test]
fn shared_subscriptions_spread_the_load() {
    let bus = Bus::start(&[]);
    let script = format!(
        "{PAHO_COMMON}{}",
        r#"
counts = {}
subs = []
for i in range(3):
    counts[i] = 0
    c = client("w%d" % i)
    def on_message(c, u, m, i=i): counts[i] += 1
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe("$share/workers/jobs/+", qos=1)
    c.loop_start()
    subs.append(c)
time.sleep(0.5)
pub = client("boss")
pub.connect("127.0.0.1", port)
pub.loop_start()
for i in range(300):
    pub.publish("jobs/%d" % (i % 7), b"j", qos=1).wait_for_publish(5)
deadline = time.time() + 10
while sum(counts.values()) < 300 and time.time() < deadline: time.sleep(0.05)
assert sum(counts.values()) == 300, counts
assert all(v >= 50 for v in counts.values()), counts
print("ok")
"#
    );
    python(&script, &[&bus.port]);
}

#[test]
fn socklab_clients_against_debian_mosquitto() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let mut mosq = Command::new("mosquitto")
        .args(["-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (.ci/run installs it)");
    let addr = format!("127.0.0.1:{port}");
    assert!(eventually(Duration::from_secs(5), || TcpStream::connect(
        &addr
    )
    .is_ok()));
    let mut sub = Command::new(BIN)
        .args([
            "bus", "sub", "--bus", &addr, "s/#", "-v", "-q", "2", "-C", "3", "-V", "5",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for (t, m, q, v) in [
        ("s/a", "one", "0", "311"),
        ("s/b", "two", "1", "5"),
        ("s/c", "three", "2", "311"),
    ] {
        let st = Command::new(BIN)
            .args(["bus", "pub", "--bus", &addr, t, m, "-q", q, "-V", v])
            .status()
            .unwrap();
        assert!(st.success());
    }
    wait_timeout(&mut sub, Duration::from_secs(10)).expect("sub done");
    let mut out = String::new();
    sub.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, "s/a one\ns/b two\ns/c three\n");
    for q in ["0", "1", "2"] {
        let o = Command::new(BIN)
            .args(["bus", "bench", &addr, "-q", q, "-d", "1s", "--json"])
            .env("SOCKLAB_BUS", &addr)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["delivered"].as_u64().unwrap() > 100, "{v}");
        assert_eq!(v["lost"], 0, "{v}");
        assert_eq!(v["corrupt"], 0, "{v}");
        if q == "2" {
            assert_eq!(v["duplicates"], 0, "{v}");
        }
    }
    let _ = mosq.kill();
    let _ = mosq.wait();
}

#[test]
fn bench_scenarios_verify_every_message_against_socklab() {
    let bus = Bus::start(&[]);
    for (scenario, n, q) in [
        ("pairs", "4", "1"),
        ("fanout", "5", "2"),
        ("fanin", "5", "1"),
        ("shared", "3", "1"),
    ] {
        let o = Command::new(BIN)
            .args([
                "bus",
                "bench",
                &bus.addr,
                "--scenario",
                scenario,
                "-n",
                n,
                "-q",
                q,
                "-d",
                "1s",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["delivered"].as_u64().unwrap() > 100, "{scenario}: {v}");
        assert_eq!(v["lost"], 0, "{scenario}: {v}");
        assert_eq!(v["corrupt"], 0, "{scenario}: {v}");
        if q == "2" {
            assert_eq!(v["duplicates"], 0, "{scenario}: {v}");
        }
    }
}

#[test]
fn kill_9_loses_nothing_acknowledged_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // The offline subscriber's queue must hold everything the publisher gets through in
    // 700 ms (past the default cap of 1,000, QoS 1 messages are dropped by policy, logged).
    let args = ["--data", data, "--max-queued", "1000000"];
    let mut bus = Bus::start(&args);
    // A persistent QoS 1 subscriber, then offline.
    let so = ConnectOptions {
        version: Version::V5,
        client_id: "durable-sub".into(),
        clean: false,
        session_expiry: Some(3600),
        ..Default::default()
    };
    let (mut s, _) = Client::connect(&bus.endpoint(), &so).unwrap();
    s.subscribe(&["d".into()], mqtt_proto::QoS::Level1).unwrap();
    s.disconnect().unwrap();
    // A publisher streams QoS 1 and records what was acknowledged; the broker is killed
    // with SIGKILL mid-stream.
    let po = ConnectOptions {
        version: Version::V311,
        client_id: "durable-pub".into(),
        ..Default::default()
    };
    let (mut p, _) = Client::connect(&bus.endpoint(), &po).unwrap();
    let pid = bus.child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        signal(pid, libc::SIGKILL);
    });
    let mut acked = Vec::new();
    for i in 0u32..1_000_000 {
        if p.publish(
            "d",
            bytes::Bytes::from(i.to_string()),
            mqtt_proto::QoS::Level1,
            false,
        )
        .is_err()
        {
            break;
        }
        acked.push(i);
    }
    killer.join().unwrap();
    bus.kill9();
    assert!(
        acked.len() > 10,
        "some messages were acknowledged before the kill"
    );
    let bus = Bus::start(&args);
    let (mut s, ack) = Client::connect(&bus.endpoint(), &so).unwrap();
    assert!(ack.session_present, "the session survived");
    s.socket()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut got = std::collections::BTreeSet::new();
    while let Ok(m) = s.next_message() {
        got.insert(String::from_utf8_lossy(&m.payload).parse::<u32>().unwrap());
        if got.len() >= acked.len() && got.contains(acked.last().unwrap()) {
            break;
        }
    }
    let missing: Vec<_> = acked.iter().filter(|i| !got.contains(i)).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged, missing e.g. {missing:?}",
        acked.len()
    );
}

#[test]
fn five_thousand_concurrent_clients() {
    let want = 5000u64 + 200;
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if soft < 2 * want + 100 {
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            (2 * want + 100).min(hard),
            hard,
        )
        .unwrap();
    }
    let bus = Bus::start(&[]);
    let mut socks = Vec::new();
    // CONNECT 3.1.1 (client id "cN") + SUBSCRIBE "all" QoS 0, pipelined.
    for i in 0..5000 {
        let id = format!("c{i}");
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut pkt = vec![0x10, body.len() as u8];
        pkt.extend(body);
        pkt.extend_from_slice(&[0x82, 8, 0, 1, 0, 3, b'a', b'l', b'l', 0]);
        let mut s = bus.raw();
        s.write_all(&pkt).unwrap();
        socks.push(s);
    }
    for s in &mut socks {
        let mut b = [0u8; 9];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, [0x20, 2, 0, 0, 0x90, 3, 0, 1, 0], "CONNACK + SUBACK");
    }
    ok("mosquitto_pub", &["-p", &bus.port, "-t", "all", "-m", "hi"]);
    for s in &mut socks {
        let mut b = [0u8; 9];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, [0x30, 7, 0, 3, b'a', b'l', b'l', b'h', b'i']);
    }
}

#[test]
fn a_subscriber_that_never_reads_beside_fast_ones() {
    let bus = Bus::start(&["--max-queued", "100"]);
    // The slow one: subscribes to every bench topic at QoS 1, then never reads.
    let mut slow = bus.raw();
    let connect = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 2, b's', b'l',
    ];
    slow.write_all(&connect[..16]).unwrap();
    slow.write_all(&[
        0x82, 12, 0, 1, 0, 7, b'b', b'e', b'n', b'c', b'h', b'/', b'#', 1,
    ])
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(bus.child.id());
    let o = Command::new(BIN)
        .args([
            "bus",
            "bench",
            &bus.addr,
            "--scenario",
            "fanout",
            "-n",
            "4",
            "-q",
            "1",
            "--size",
            "4k",
            "-d",
            "3s",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lost"], 0, "the fast subscribers lost nothing: {v}");
    assert!(v["delivered_per_sec"].as_f64().unwrap() > 1000.0, "{v}");
    let after = rss_kib(bus.child.id());
    // 100 queued + 20 in flight of 4 KiB, plus the socket's output cap: far below 64 MiB.
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

/// A malformed-input case: name, CONNECT to send first (if any), the bytes, and the 5.0
/// DISCONNECT reason expected (`None`: the connection is just closed).
type Case<'a> = (&'a str, Option<&'a Vec<u8>>, Vec<u8>, Option<u8>);

/// Malformed and forbidden input: each case is sent on a fresh connection (after a valid
/// CONNECT when `connected`), and the broker must close it -- with a DISCONNECT carrying
/// `reason` for 5.0 -- and keep serving everyone else.
#[test]
fn malformed_packets_are_refused_and_the_broker_keeps_serving() {
    let bus = Bus::start(&[]);
    let v5 = vec![0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 0, 0, 0];
    let v3 = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 10, 0, 0];
    // (name, connect first (None: raw), bytes, expected reason for 5.0 (None: just closed))
    let cases: Vec<Case<'_>> = vec![
        (
            "publish before connect",
            None,
            vec![0x30, 3, 0, 1, b't'],
            None,
        ),
        (
            "subscribe before connect",
            None,
            vec![0x82, 6, 0, 1, 0, 1, b'#', 0],
            None,
        ),
        ("pingreq before connect", None, vec![0xc0, 0], None),
        (
            "five-byte remaining length",
            None,
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
            None,
        ),
        (
            "connect with reserved flags",
            None,
            vec![0x11, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 10, 0, 0],
            None,
        ),
        (
            "unknown protocol name",
            None,
            vec![0x10, 12, 0, 4, b'M', b'Q', b'X', b'T', 4, 2, 0, 10, 0, 0],
            None,
        ),
        (
            "connect reserved flag bit 0",
            None,
            vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 3, 0, 10, 0, 0],
            None,
        ),
        (
            "client id with U+0000",
            None,
            vec![0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 10, 0, 1, 0],
            None,
        ),
        (
            "client id invalid UTF-8",
            None,
            vec![
                0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 10, 0, 1, 0xff,
            ],
            None,
        ),
        (
            "connect truncated body",
            None,
            vec![0x10, 5, 0, 4, b'M', b'Q', b'T'],
            None,
        ),
        (
            "will qos 3",
            None,
            vec![
                0x10,
                12,
                0,
                4,
                b'M',
                b'Q',
                b'T',
                b'T',
                4,
                0b0001_1110,
                0,
                10,
                0,
                0,
            ],
            None,
        ),
        ("second connect", Some(&v5), v5.clone(), Some(0x82)),
        ("second connect 3.1.1", Some(&v3), v3.clone(), None),
        (
            "unknown packet type 0",
            Some(&v5),
            vec![0x00, 0],
            Some(0x81),
        ),
        ("auth from a 3.1.1 client", Some(&v3), vec![0xf0, 0], None),
        (
            "publish with a + wildcard",
            Some(&v5),
            vec![0x30, 6, 0, 3, b'a', b'/', b'+', 0],
            Some(0x81),
        ),
        (
            "publish with a # wildcard",
            Some(&v5),
            vec![0x30, 4, 0, 1, b'#', 0],
            Some(0x81),
        ),
        (
            "publish topic with U+0000",
            Some(&v5),
            vec![0x30, 6, 0, 3, b'a', 0, b'b', 0],
            Some(0x81),
        ),
        (
            "publish topic invalid UTF-8",
            Some(&v5),
            vec![0x30, 6, 0, 3, b'a', 0xc3, 0x28, 0],
            Some(0x81),
        ),
        (
            "publish qos 3",
            Some(&v5),
            vec![0x36, 6, 0, 1, b't', 0, 1, 0],
            Some(0x81),
        ),
        (
            "publish dup on qos 0",
            Some(&v5),
            vec![0x38, 4, 0, 1, b't', 0],
            Some(0x81),
        ),
        (
            "publish packet id 0",
            Some(&v5),
            vec![0x32, 6, 0, 1, b't', 0, 0, 0],
            Some(0x81),
        ),
        (
            "publish empty topic no alias",
            Some(&v5),
            vec![0x30, 3, 0, 0, 0],
            Some(0x90),
        ),
        (
            "publish alias 0",
            Some(&v5),
            vec![0x30, 7, 0, 1, b't', 3, 0x23, 0, 0],
            Some(0x94),
        ),
        (
            "publish unknown alias",
            Some(&v5),
            vec![0x30, 6, 0, 0, 3, 0x23, 0, 9],
            Some(0x82),
        ),
        (
            "publish unknown property",
            Some(&v5),
            vec![0x30, 6, 0, 1, b't', 2, 0x7f, 0],
            Some(0x81),
        ),
        (
            "publish utf-8 payload not utf-8",
            Some(&v5),
            vec![0x30, 7, 0, 1, b't', 2, 0x01, 1, 0xff],
            Some(0x81),
        ),
        (
            "subscribe reserved flags 0",
            Some(&v5),
            vec![0x80, 7, 0, 1, 0, 0, 1, b'#', 0],
            Some(0x81),
        ),
        (
            "subscribe with no filters",
            Some(&v5),
            vec![0x82, 3, 0, 1, 0],
            Some(0x81),
        ),
        (
            "subscribe bad wildcard",
            Some(&v5),
            vec![0x82, 8, 0, 1, 0, 0, 2, b'a', b'#', 0],
            Some(0x81),
        ),
        (
            "subscribe options reserved bits",
            Some(&v5),
            vec![0x82, 7, 0, 1, 0, 0, 1, b'#', 0xc0],
            Some(0x81),
        ),
        (
            "subscribe qos 3",
            Some(&v5),
            vec![0x82, 7, 0, 1, 0, 0, 1, b'#', 3],
            Some(0x81),
        ),
        (
            "unsubscribe reserved flags",
            Some(&v5),
            vec![0xa0, 6, 0, 1, 0, 0, 1, b'#'],
            Some(0x81),
        ),
        (
            "pubrel reserved flags",
            Some(&v5),
            vec![0x60, 2, 0, 1],
            Some(0x81),
        ),
        (
            "pingreq with a body",
            Some(&v5),
            vec![0xc0, 1, 0],
            Some(0x81),
        ),
        (
            "connack from a client",
            Some(&v5),
            vec![0x20, 2, 0, 0],
            Some(0x82),
        ),
        (
            "suback from a client",
            Some(&v5),
            vec![0x90, 3, 0, 1, 0],
            Some(0x82),
        ),
        (
            "puback trailing bytes 3.1.1",
            Some(&v3),
            vec![0x40, 3, 0, 1, 0],
            None,
        ),
        (
            "remaining length past max",
            Some(&v5),
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            Some(0x95),
        ),
        // "It is a Protocol Error to include X more than once": 0x82, not 0x81.
        (
            "publish with two payload format indicators",
            Some(&v5),
            vec![0x30, 9, 0, 1, b't', 4, 0x01, 1, 0x01, 0, b'x'],
            Some(0x82),
        ),
        (
            "publish with two content types",
            Some(&v5),
            vec![0x30, 13, 0, 1, b't', 8, 3, 0, 1, b'a', 3, 0, 1, b'b', b'x'],
            Some(0x82),
        ),
        (
            "subscribe with two subscription identifiers",
            Some(&v5),
            vec![0x82, 11, 0, 1, 4, 0x0b, 1, 0x0b, 2, 0, 1, b'a', 0],
            Some(0x82),
        ),
        (
            "publish from a client with a subscription identifier",
            Some(&v5),
            vec![0x30, 7, 0, 1, b't', 2, 0x0b, 1, b'x'],
            Some(0x82),
        ),
        (
            "auth without an authentication method",
            Some(&v5),
            vec![0xf0, 2, 0x18, 0],
            Some(0x82),
        ),
    ];
    assert!(cases.len() >= 30);
    for (name, connect, bytes, reason) in &cases {
        let mut s = bus.raw();
        if let Some(c) = connect {
            s.write_all(c).unwrap();
            let mut head = [0u8; 2];
            s.read_exact(&mut head).unwrap();
            let mut rest = vec![0u8; head[1] as usize];
            s.read_exact(&mut rest).unwrap();
            assert_eq!(head[0], 0x20, "{name}: CONNACK");
        }
        let _ = s.write_all(bytes);
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got);
        assert!(r.is_ok() || got.is_empty(), "{name}: closed ({r:?})");
        match reason {
            // DISCONNECT with the reason code (and a Reason String after it).
            Some(code) => assert_eq!(
                (got.first(), got.get(2)),
                (Some(&0xe0), Some(code)),
                "{name}: {got:x?}"
            ),
            None => assert!(
                got.is_empty() || got[0] == 0xe0 || got[0] == 0x20,
                "{name}: {got:x?}"
            ),
        }
    }
    // Unsupported protocol levels get CONNACK 0x01 (3.1.1 format) / 0x84 (5.0 format).
    for (level, want) in [(2u8, vec![0x20, 2, 0, 1]), (6, vec![0x20, 3, 0, 0x84, 0])] {
        let mut s = bus.raw();
        s.write_all(&[
            0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 10, 0, 0,
        ])
        .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, want, "level {level}");
    }
    // Enhanced authentication: no method is known, so a CONNECT naming one gets CONNACK
    // 0x8C (bad authentication method) and is closed; Authentication Data without a method
    // is a protocol error.
    let with_method = [
        0x10, 21, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 8, 0x15, 0, 5, b'S', b'C', b'R', b'A',
        b'M', 0, 0,
    ];
    let mut s = bus.raw();
    s.write_all(&with_method).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!((got[0], got[3]), (0x20, 0x8c), "{got:x?}");
    let data_only = [
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 4, 0x16, 0, 1, 7, 0, 0,
    ];
    let mut s = bus.raw();
    s.write_all(&data_only).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "closed without CONNACK: {got:x?}");
    // Everyone else is still served.
    ok(
        "mosquitto_pub",
        &["-p", &bus.port, "-t", "after", "-m", "fine", "-r"],
    );
    assert_eq!(
        ok(
            "mosquitto_sub",
            &["-p", &bus.port, "-t", "after", "-C", "1", "-W", "5"]
        ),
        "fine\n"
    );
}

#[test]
fn unix_socket_and_ipv6_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.sock");
    let mut child = Command::new(BIN)
        .args([
            "bus",
            "serve",
            "--listen",
            "[::1]:0",
            "--unix",
            path.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let v6 = lines.next().unwrap().unwrap();
    let unix = lines.next().unwrap().unwrap();
    assert!(v6.starts_with("[::1]:"), "{v6}");
    assert_eq!(unix, path.to_str().unwrap());
    let mut sub = Command::new(BIN)
        .args(["bus", "sub", "u", "-C", "1"])
        .env("SOCKLAB_BUS", &unix)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let st = Command::new(BIN)
        .args(["bus", "pub", "--bus", &v6, "u", "across"])
        .status()
        .unwrap();
    assert!(st.success());
    wait_timeout(&mut sub, Duration::from_secs(10)).expect("sub done");
    let mut out = String::new();
    sub.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, "across\n");
    signal(child.id(), libc::SIGTERM);
    let st = wait_timeout(&mut child, Duration::from_secs(10)).expect("exits on SIGTERM");
    assert!(st.success());
    assert!(!path.exists(), "socket file removed");
}

/// Read one whole packet (fixed header with a one-byte remaining length, then the body).
fn read_packet(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    let mut p = head.to_vec();
    p.resize(2 + head[1] as usize, 0);
    s.read_exact(&mut p[2..]).unwrap();
    p
}

#[test]
fn over_max_connections_the_connect_is_answered_quota_exceeded() {
    let bus = Bus::start(&["--max-connections", "1"]);
    let v3 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 10, 0, 0];
    let v5 = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 0, 0, 0];
    let mut first = bus.raw();
    first.write_all(&v3).unwrap();
    assert_eq!(read_packet(&mut first), [0x20, 2, 0, 0]);
    // 5.0: CONNACK 0x97 (quota exceeded); 3.1.1: 0x03 (server unavailable); then closed.
    for (connect, want) in [(&v5[..], 0x97), (&v3, 3)] {
        let mut s = bus.raw();
        s.write_all(connect).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!((got[0], got[3]), (0x20, want), "{got:x?}");
        if want == 3 {
            assert_eq!(got, [0x20, 2, 0, 3], "3.1.1: no properties");
        } else {
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.contains("connection limit"),
                "a Reason String: {got:x?}"
            );
        }
    }
    drop(first);
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut s = bus.raw();
            s.write_all(&v3).unwrap();
            read_packet(&mut s) == [0x20, 2, 0, 0]
        }),
        "a place is free again once the first connection closed"
    );
}

#[test]
fn max_keep_alive_is_imposed_on_5_0_clients_and_refused_to_3_1_1_ones() {
    let bus = Bus::start(&["--max-keep-alive", "1"]);
    // 5.0 with keep-alive 0: CONNACK carries Server Keep Alive 1 (property 0x13), and 1.5 s
    // of silence end the connection with DISCONNECT 0x8D.
    let mut s = bus.raw();
    s.write_all(&[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0, 0, 0, 0])
        .unwrap();
    let ack = read_packet(&mut s);
    assert_eq!(ack[..4], [0x20, ack[1], 0, 0]);
    assert!(
        ack.windows(3).any(|w| w == [0x13, 0, 1]),
        "Server Keep Alive 1 in {ack:x?}"
    );
    let t0 = Instant::now();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(
        (rest[0], rest[2]),
        (0xe0, 0x8d),
        "DISCONNECT keep-alive timeout"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // 3.1.1 cannot be told: keep-alive 0 or over the maximum is refused (0x02), within it
    // accepted.
    for (ka, want) in [(0u8, 2u8), (5, 2), (1, 0)] {
        let mut s = bus.raw();
        s.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, ka, 0, 0])
            .unwrap();
        assert_eq!(read_packet(&mut s), [0x20, 2, 0, want], "keep-alive {ka}");
    }
}

#[test]
fn bench_open_loop_keeps_to_its_rate() {
    let bus = Bus::start(&[]);
    let o = Command::new(BIN)
        .args([
            "bus",
            "bench",
            &bus.addr,
            "--scenario",
            "pairs",
            "-n",
            "2",
            "--rate",
            "200",
            "-d",
            "1s",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Two publishers at 200/s for 1 s: 201 messages each at most (the one due at 0 s
    // included), and not far fewer.
    let sent = v["sent"].as_u64().unwrap();
    assert!((300..=402).contains(&sent), "sent {sent}: {v}");
    assert_eq!(v["delivered"].as_u64(), Some(sent), "{v}");
    assert_eq!(v["lost"], 0, "{v}");
}

#[test]
fn server_shutdown_publishes_the_wills_of_connected_clients() {
    let mut bus = Bus::start(&[]);
    let watcher = sub_bg(&bus.port, &["-t", "will/#", "-C", "1", "-v"]);
    let mut client = Command::new("mosquitto_sub")
        .args([
            "-p",
            &bus.port,
            "-t",
            "nothing",
            "--will-topic",
            "will/shutdown",
            "--will-payload",
            "server gone",
            "-V",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    signal(bus.child.id(), libc::SIGTERM);
    let st = wait_timeout(&mut bus.child, Duration::from_secs(10)).expect("the broker stops");
    assert!(st.success(), "{st:?}");
    assert_eq!(finish(watcher), "will/shutdown server gone\n");
    let _ = client.kill();
    let _ = client.wait();
}

/// A 5.0 CONNECT with clean start off, a session expiry, and a QoS 1 will with a delay.
fn connect_with_will(id: &str, expiry: u32, topic: &str, payload: &str, delay: u32) -> Vec<u8> {
    // Will flag, will QoS 1.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0b0000_1100, 0, 60];
    body.push(5);
    body.push(0x11);
    body.extend_from_slice(&expiry.to_be_bytes());
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    body.push(5);
    body.push(0x18);
    body.extend_from_slice(&delay.to_be_bytes());
    for s in [topic.as_bytes(), payload.as_bytes()] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s);
    }
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

#[test]
fn with_data_expiry_and_delayed_wills_count_from_the_disconnect_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let args = ["--data", data];
    let mut bus = Bus::start(&args);
    // "brief": a 5.0 session expiring 3 s after it disconnects.
    let brief = ConnectOptions {
        version: Version::V5,
        client_id: "brief".into(),
        clean: false,
        session_expiry: Some(3),
        ..Default::default()
    };
    let (mut c, _) = Client::connect(&bus.endpoint(), &brief).unwrap();
    c.subscribe(&["b".into()], mqtt_proto::QoS::Level1).unwrap();
    c.disconnect().unwrap();
    let t0 = Instant::now();
    // "watch": a persistent subscriber of the will's topic, offline, so that the will is
    // queued for it whenever it goes out.
    let watch = ConnectOptions {
        version: Version::V5,
        client_id: "watch".into(),
        clean: false,
        session_expiry: Some(600),
        ..Default::default()
    };
    let (mut c, _) = Client::connect(&bus.endpoint(), &watch).unwrap();
    c.subscribe(&["w".into()], mqtt_proto::QoS::Level1).unwrap();
    c.disconnect().unwrap();
    // "willing": its connection is lost; its will waits 2 s.
    let mut w = bus.raw();
    w.write_all(&connect_with_will("willing", 60, "w", "late", 2))
        .unwrap();
    let ack = read_packet(&mut w);
    assert_eq!((ack[0], ack[3]), (0x20, 0), "CONNACK success: {ack:x?}");
    drop(w);
    std::thread::sleep(Duration::from_millis(1500));
    bus.kill9();
    let bus = Bus::start(&args);
    // The pending will survived the kill, and went out when its delay (counted from the
    // lost connection, before the restart) had passed.
    let (mut c, ack) = Client::connect(&bus.endpoint(), &watch).unwrap();
    assert!(ack.session_present);
    c.socket()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let m = c.next_message().expect("the will");
    assert_eq!((&*m.topic_name, &m.payload[..]), ("w", &b"late"[..]));
    // "brief" expired 3 s after its DISCONNECT, not 3 s after the restart.
    while t0.elapsed() < Duration::from_millis(3500) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_c, ack) = Client::connect(&bus.endpoint(), &brief).unwrap();
    assert!(
        !ack.session_present,
        "the session expired while the broker was down"
    );
}

#[test]
fn bus_sub_v_means_print_topics_as_with_mosquitto_sub() {
    let o = Command::new(BIN)
        .args(["bus", "sub", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.lines()
            .any(|l| l.contains("-v") && l.contains("topic before it")),
        "{help}"
    );
}
