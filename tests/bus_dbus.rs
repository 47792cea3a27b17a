//! The D-Bus half of `socklab bus` against a real `socklab bus serve`: name ownership with
//! every flag combination and the events each party sees, calls answered, failed, unknown,
//! timed out and orphaned by a kill -9, match rules, 100 callers × 10 names, bad input, the
//! command line (`bus own -- COMMAND`, `call`, `names`, `monitor`), and a paho-mqtt program
//! written from docs/bus.md alone.

mod util;

use bytes::Bytes;
use mqtt_proto::v5;
use mqtt_proto::{QosPid, TopicName};
use serde_json::{json, Value};
use socklab::bus::client::{Client, ConnectOptions};
use socklab::bus::names::{RequestReply, ALLOW_REPLACEMENT, DO_NOT_QUEUE, REPLACE_EXISTING};
use socklab::bus::peer::{BusConnection, BusMessage, CallError, Signal};
use socklab::net::Endpoint;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::{descendants_of, signal, wait_timeout, BIN};

const NO_REPLY: &str = "org.freedesktop.DBus.Error.NoReply";
const DRIVER: &str = "org.freedesktop.DBus";

/// A running `socklab bus serve`, killed when dropped.
struct BusServer {
    child: Child,
    addr: String,
}

impl BusServer {
    fn start(extra: &[&str]) -> BusServer {
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
        BusServer { child, addr }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Inet(self.addr.clone())
    }

    fn conn(&self) -> BusConnection {
        BusConnection::connect(&self.endpoint()).expect("connect to the bus")
    }

    /// `socklab bus ARGS...` with `$SOCKLAB_BUS` pointing here, to completion.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("bus")
            .args(args)
            .env("SOCKLAB_BUS", &self.addr)
            .stdin(Stdio::null())
            .output()
            .expect("run socklab bus")
    }

    /// `socklab bus own ...` in the background, once it printed its first line (returned).
    fn own(&self, args: &[&str]) -> (Child, String, BufReader<ChildStdout>) {
        let mut child = Command::new(BIN)
            .args(["bus", "own"])
            .args(args)
            .env("SOCKLAB_BUS", &self.addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn socklab bus own");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "bus own printed nothing: {args:?}");
        (child, line.trim().to_string(), out)
    }
}

impl Drop for BusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn kill_child(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Signals already received (those routed before the last call's reply are queued by then).
fn signals(c: &mut BusConnection) -> Vec<(String, Vec<Value>)> {
    let mut v = Vec::new();
    while let Some(m) = c.next_message(Some(Duration::from_millis(1))).unwrap() {
        if let BusMessage::Signal(s) = m {
            v.push((s.member, s.args));
        }
    }
    v
}

/// Make sure everything routed to `c` so far has arrived: a round trip to the bus.
fn sync(c: &mut BusConnection) {
    c.call_driver("GetId", &[]).unwrap();
}

#[test]
fn ownership_every_flag_combination_with_the_events_both_parties_see() {
    let bus = BusServer::start(&[]);
    let mut a = bus.conn();
    let mut b = bus.conn();
    let (ua, ub) = (a.unique_name().to_string(), b.unique_name().to_string());
    for owner in 0..8u32 {
        for req in 0..8u32 {
            let name = format!("com.example.Flags.o{owner}r{req}");
            let why = format!("owner flags {owner}, requester flags {req}");
            assert_eq!(
                a.request_name(&name, owner).unwrap(),
                RequestReply::PrimaryOwner
            );
            assert_eq!(
                signals(&mut a),
                vec![("NameAcquired".into(), vec![json!(name)])]
            );
            let got = b.request_name(&name, req).unwrap();
            let replaced = req & REPLACE_EXISTING != 0 && owner & ALLOW_REPLACEMENT != 0;
            let (want, queue) = if replaced {
                let mut q = vec![ub.clone()];
                if owner & DO_NOT_QUEUE == 0 {
                    q.push(ua.clone());
                }
                (RequestReply::PrimaryOwner, q)
            } else if req & DO_NOT_QUEUE != 0 {
                (RequestReply::Exists, vec![ua.clone()])
            } else {
                (RequestReply::InQueue, vec![ua.clone(), ub.clone()])
            };
            assert_eq!(got, want, "{why}");
            assert_eq!(b.list_queued_owners(&name).unwrap(), queue, "{why}");
            let b_saw = signals(&mut b);
            sync(&mut a);
            let a_saw = signals(&mut a);
            if replaced {
                assert_eq!(
                    b_saw,
                    vec![("NameAcquired".into(), vec![json!(name)])],
                    "{why}"
                );
                assert_eq!(a_saw, vec![("NameLost".into(), vec![json!(name)])], "{why}");
            } else {
                assert_eq!((b_saw, a_saw), (vec![], vec![]), "{why}");
            }
            // The owner asking again: already owner.
            let owner_now = if replaced { &mut b } else { &mut a };
            assert_eq!(
                owner_now.request_name(&name, 0).unwrap(),
                RequestReply::AlreadyOwner
            );
        }
    }
}

#[test]
fn the_queue_hands_over_when_the_owner_is_killed_with_events_in_order() {
    let bus = BusServer::start(&[]);
    let name = "com.example.Handover";
    let mut watcher = bus.conn();
    watcher.add_match("member='NameOwnerChanged'").unwrap();
    // The first owner is another process: `bus own`, killed with SIGKILL below.
    let (mut first, line, _out) = bus.own(&[name, "--", "true"]);
    let ua = line.split(' ').next().unwrap().to_string();
    assert_eq!(line, format!("{ua} owns {name}"));
    let mut b = bus.conn();
    let ub = b.unique_name().to_string();
    assert_eq!(b.request_name(name, 0).unwrap(), RequestReply::InQueue);
    assert_eq!(
        b.list_queued_owners(name).unwrap(),
        vec![ua.clone(), ub.clone()]
    );
    signal(first.id(), libc::SIGKILL);
    let _ = first.wait();
    // B becomes the owner and is told so.
    let m = b.next_message(Some(Duration::from_secs(10))).unwrap();
    match m {
        Some(BusMessage::Signal(Signal { member, args, .. })) => {
            assert_eq!((member.as_str(), args), ("NameAcquired", vec![json!(name)]))
        }
        other => panic!("expected NameAcquired, got {other:?}"),
    }
    assert_eq!(b.get_name_owner(name).unwrap(), ub);
    assert_eq!(b.release_name(name).unwrap() as u32, 1);
    assert_eq!(
        signals(&mut b),
        vec![("NameLost".into(), vec![json!(name)])]
    );
    assert!(!b.name_has_owner(name).unwrap());
    // Everything the watcher saw, in order.
    sync(&mut watcher);
    let noc = |n: &str, o: &str, w: &str| {
        (
            "NameOwnerChanged".to_string(),
            vec![json!(n), json!(o), json!(w)],
        )
    };
    assert_eq!(
        signals(&mut watcher),
        vec![
            noc(&ua, "", &ua),
            noc(name, "", &ua),
            noc(&ub, "", &ub),
            noc(name, &ua, &ub),
            noc(&ua, &ua, ""),
            noc(name, &ub, ""),
        ]
    );
}

/// The shell service used by the command-line tests.
const SHELL: &str = r#"case "$1" in
  fail) echo "no good" >&2; exit 3;;
  sleep) sleep 5;;
  *) echo "$SOCKLAB_BUS_MEMBER:$*";;
esac"#;

#[test]
fn command_line_reply_error_unknown_timeout_ping_introspect_names_monitor() {
    let bus = BusServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("shell.xml");
    std::fs::write(&xml, "<node><interface name=\"org.example.Shell\"/></node>").unwrap();
    let xml = xml.to_str().unwrap();
    let (mut own, line, _out) = bus.own(&[
        "org.example.Shell",
        "--introspect",
        xml,
        "--",
        "sh",
        "-c",
        SHELL,
        "sh",
    ]);
    let unique = line.split(' ').next().unwrap().to_string();
    assert_eq!(line, format!("{unique} owns org.example.Shell"));

    let o = bus.cli(&["call", "org.example.Shell", "Echo", "a", "b c"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "Echo:a b c\n");
    let o = bus.cli(&[
        "call",
        "org.example.Shell",
        "Add",
        "-j",
        "2",
        "[3]",
        "--json",
    ]);
    assert_eq!(stdout(&o), "{\"reply\":[\"Add:2 [3]\"]}\n");

    let o = bus.cli(&["call", "org.example.Shell", "Run", "fail"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("org.freedesktop.DBus.Error.Failed: no good (exit status 3)"),
        "{}",
        stderr(&o)
    );

    let t0 = Instant::now();
    let o = bus.cli(&[
        "call",
        "org.example.Shell",
        "Run",
        "sleep",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(NO_REPLY), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());

    let o = bus.cli(&["call", "org.example.Nobody", "Run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("org.freedesktop.DBus.Error.ServiceUnknown"),
        "{}",
        stderr(&o)
    );

    // Ping and Introspect are answered for every connection, by name or unique name.
    for dest in ["org.example.Shell", unique.as_str()] {
        let o = bus.cli(&[
            "call",
            dest,
            "Ping",
            "--interface",
            "org.freedesktop.DBus.Peer",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), "");
        let o = bus.cli(&["call", dest, "Introspect"]);
        assert_eq!(
            stdout(&o),
            "<node><interface name=\"org.example.Shell\"/></node>\n"
        );
    }
    let o = bus.cli(&["call", DRIVER, "Introspect"]);
    assert!(stdout(&o).contains("<method name=\"RequestName\">"));

    // names: the bus, the well-known name with its owner, the unique names.
    let o = bus.cli(&["names", "--json"]);
    let names: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(names.contains(&json!({"name": "org.example.Shell", "owner": unique, "queue": []})));
    assert!(names.contains(&json!({"name": DRIVER, "owner": DRIVER, "queue": []})));

    // A second `bus own` without --queue fails; with --queue it waits, and gets the name
    // when the first one dies.
    let o = bus.cli(&["own", "org.example.Shell", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("owned by {unique}")),
        "{}",
        stderr(&o)
    );

    // The monitor sees the call and its reply.
    let mut mon = Command::new(BIN)
        .args(["bus", "monitor", "--json", "-C", "2", "-W", "20s"])
        .args([
            "type='method_call',destination='org.example.Shell'",
            "type='method_return'",
        ])
        .env("SOCKLAB_BUS", &bus.addr)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(mon.stderr.take().unwrap());
    let mut l = String::new();
    while !l.contains("monitoring") {
        l.clear();
        assert!(err.read_line(&mut l).unwrap() > 0, "monitor ended");
    }
    let o = bus.cli(&["call", "org.example.Shell", "Watched", "x"]);
    assert!(o.status.success());
    wait_timeout(&mut mon, Duration::from_secs(20)).expect("monitor finished");
    let mut seen = String::new();
    mon.stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    let seen: Vec<Value> = seen
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0]["type"], "method_call");
    assert_eq!(seen[0]["member"], "Watched");
    assert_eq!(seen[0]["args"], json!(["x"]));
    assert_eq!(seen[1]["type"], "method_return");
    assert_eq!(seen[1]["sender"], json!(unique));
    assert_eq!(seen[1]["reply-serial"], seen[0]["serial"]);
    assert_eq!(seen[1]["args"], json!(["Watched:x"]));
    kill_child(&mut own);
}

#[test]
fn replace_and_queue_on_the_command_line() {
    let bus = BusServer::start(&[]);
    let n = "org.example.Swap";
    let (mut first, line, mut first_out) =
        bus.own(&[n, "--allow-replacement", "--queue", "--", "echo", "first"]);
    assert!(line.ends_with(&format!("owns {n}")), "{line}");
    let (mut second, line, _o) = bus.own(&[n, "--replace", "--", "echo", "second"]);
    assert!(line.ends_with(&format!("owns {n}")), "{line}");
    let mut l = String::new();
    first_out.read_line(&mut l).unwrap();
    assert!(l.trim().ends_with(&format!("waits for {n}")), "{l}");
    assert_eq!(stdout(&bus.cli(&["call", n, "Who"])), "second\n");
    kill_child(&mut second);
    l.clear();
    first_out.read_line(&mut l).unwrap();
    assert!(l.trim().ends_with(&format!("owns {n}")), "{l}");
    assert_eq!(stdout(&bus.cli(&["call", n, "Who"])), "first\n");
    kill_child(&mut first);
}

#[test]
fn no_reply_at_once_when_the_owner_is_killed_mid_call() {
    let bus = BusServer::start(&[]);
    let (mut own, _line, _out) = bus.own(&["org.example.Slow", "--", "sleep", "30"]);
    let mut call = Command::new(BIN)
        .args([
            "bus",
            "call",
            "org.example.Slow",
            "Wait",
            "--timeout",
            "60s",
        ])
        .env("SOCKLAB_BUS", &bus.addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The call is being served once its command runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut running = Vec::new();
    while running.is_empty() && Instant::now() < deadline {
        running = descendants_of(own.id());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!running.is_empty(), "the command never started");
    let t0 = Instant::now();
    signal(own.id(), libc::SIGKILL);
    let _ = own.wait();
    let status = wait_timeout(&mut call, Duration::from_secs(10)).expect("the call ended");
    let took = t0.elapsed();
    for p in running {
        signal(p, libc::SIGKILL);
    }
    let mut err = String::new();
    call.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "org.freedesktop.DBus.Error.NoReply: the recipient disconnected without replying"
        ),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn match_rules_select_exactly_the_right_signals() {
    let bus = BusServer::start(&[]);
    let mut e = bus.conn();
    e.request_name("org.example.Emitter", 0).unwrap();
    let mut other = bus.conn();
    let rules: [&[&str]; 6] = [
        &["interface='net.Link'"],
        &["member='Changed',path_namespace='/net'"],
        &["arg0='eth1'"],
        &["sender='org.example.Emitter',member='Removed'"],
        &["type='signal',path='/net/eth0'"],
        &[],
    ];
    let mut listeners: Vec<BusConnection> = rules
        .iter()
        .map(|rs| {
            let mut l = bus.conn();
            for r in rs.iter() {
                l.add_match(r).unwrap();
            }
            l.add_match("member='End'").unwrap();
            l
        })
        .collect();
    let direct = listeners[5].unique_name().to_string();
    let sig = |c: &mut BusConnection, path: &str, i: &str, m: &str, a: Value, d: Option<&str>| {
        c.emit(path, i, m, a.as_array().unwrap(), d).unwrap()
    };
    sig(
        &mut e,
        "/net/eth0",
        "net.Link",
        "Changed",
        json!(["eth0"]),
        None,
    ); // s1
    sig(
        &mut e,
        "/net/eth1",
        "net.Link",
        "Added",
        json!(["eth1"]),
        None,
    ); // s2
    sig(
        &mut e,
        "/netx",
        "net.Other",
        "Changed",
        json!(["eth1"]),
        None,
    ); // s3
    sig(&mut e, "/x", "net.Other", "Removed", json!(["x"]), None); // s4
    sig(
        &mut e,
        "/net/eth0",
        "net.Addr",
        "Removed",
        json!(["eth0"]),
        None,
    ); // s5
    sig(
        &mut e,
        "/d",
        "net.Direct",
        "Hello",
        json!([]),
        Some(&direct),
    ); // s6
    sync(&mut e); // s1..s6 are routed before s7
    sig(
        &mut other,
        "/y",
        "net.Other",
        "Removed",
        json!(["eth1"]),
        None,
    ); // s7
    sync(&mut other); // s7 is routed before End
    sig(&mut e, "/", "net.Ctl", "End", json!([]), None);
    let want: [&[&str]; 6] = [
        &["Changed/net/eth0", "Added/net/eth1"],
        &["Changed/net/eth0"],
        &["Added/net/eth1", "Changed/netx", "Removed/y"],
        &["Removed/x", "Removed/net/eth0"],
        &["Changed/net/eth0", "Removed/net/eth0"],
        &["Hello/d"],
    ];
    let emitter = e.unique_name().to_string();
    for (i, l) in listeners.iter_mut().enumerate() {
        let mut got = Vec::new();
        loop {
            match l.next_message(Some(Duration::from_secs(10))).unwrap() {
                Some(BusMessage::Signal(s)) if s.member == "End" => break,
                Some(BusMessage::Signal(s)) => {
                    if s.path == "/y" {
                        assert_eq!(s.sender, other.unique_name());
                    } else {
                        assert_eq!(s.sender, emitter);
                    }
                    got.push(format!("{}{}", s.member, s.path));
                }
                other => panic!("listener {i}: {other:?}"),
            }
        }
        assert_eq!(got, want[i], "listener {i} with rules {:?}", rules[i]);
    }
}

/// A raw MQTT 5 client for the wire-level tests.
fn raw(bus: &BusServer) -> (Client, String) {
    let (c, ack) = Client::connect(&bus.endpoint(), &ConnectOptions::default()).unwrap();
    let unique = ack
        .properties
        .user_properties
        .iter()
        .find(|u| &*u.name == "unique-name")
        .map(|u| u.value.to_string())
        .unwrap();
    c.socket()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (c, unique)
}

fn publish(topic: &str, props: &[(&str, &str)], payload: &[u8], corr: Option<&[u8]>) -> v5::Packet {
    let mut p = v5::Publish::new(
        QosPid::Level0,
        TopicName::try_from(topic).unwrap(),
        Bytes::copy_from_slice(payload),
    );
    p.properties.user_properties = props
        .iter()
        .map(|(k, v)| v5::UserProperty {
            name: (*k).into(),
            value: (*v).into(),
        })
        .collect();
    if let Some(c) = corr {
        p.properties.response_topic = Some(TopicName::try_from("my/replies").unwrap());
        p.properties.correlation_data = Some(Bytes::copy_from_slice(c));
    }
    v5::Packet::Publish(p)
}

fn prop<'a>(p: &'a v5::Publish, k: &str) -> Option<&'a str> {
    p.properties
        .user_properties
        .iter()
        .find(|u| &*u.name == k)
        .map(|u| &*u.value)
}

#[test]
fn hundred_callers_ten_names_every_reply_matched_to_its_call() {
    let bus = BusServer::start(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let services: Vec<_> = (0..10)
        .map(|i| {
            let mut c = bus.conn();
            let name = format!("org.example.Svc{i}");
            assert_eq!(
                c.request_name(&name, 0).unwrap(),
                RequestReply::PrimaryOwner
            );
            let stop = stop.clone();
            std::thread::spawn(move || {
                let w = c.writer().unwrap();
                let mut served = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(BusMessage::Call(call)) =
                        c.next_message(Some(Duration::from_millis(50))).unwrap()
                    {
                        let mut reply = vec![json!(name)];
                        reply.extend(call.args.iter().cloned());
                        w.reply(&call, &reply).unwrap();
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    const ROUNDS: u64 = 5;
    let callers: Vec<_> = (0..100u64)
        .map(|caller| {
            let (mut c, _) = raw(&bus);
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    // Ten calls in flight at once on one connection, one per name.
                    for k in 0..10u64 {
                        let corr = (caller << 32 | round << 8 | k).to_be_bytes();
                        let args = json!([caller, round, k]).to_string();
                        c.send(&publish(
                            &format!("$bus/call/org.example.Svc{k}"),
                            &[("member", "Echo")],
                            args.as_bytes(),
                            Some(&corr),
                        ))
                        .unwrap();
                    }
                    let mut answered = [false; 10];
                    for _ in 0..10 {
                        let p = c.next_message().unwrap();
                        assert_eq!(&*p.topic_name, "my/replies");
                        assert_eq!(prop(&p, "type"), Some("method_return"));
                        let corr = p.properties.correlation_data.as_deref().unwrap();
                        let n = u64::from_be_bytes(corr.try_into().unwrap());
                        let k = n & 0xff;
                        assert_eq!((n >> 32, (n >> 8) & 0xff), (caller, round));
                        let got: Value = serde_json::from_slice(&p.payload).unwrap();
                        assert_eq!(
                            got,
                            json!([format!("org.example.Svc{k}"), caller, round, k])
                        );
                        assert!(!answered[k as usize], "two replies to one call");
                        answered[k as usize] = true;
                    }
                }
                c.disconnect().unwrap();
            })
        })
        .collect();
    for c in callers {
        c.join().expect("caller");
    }
    stop.store(true, Ordering::Relaxed);
    let served: u64 = services.into_iter().map(|s| s.join().unwrap()).sum();
    assert_eq!(served, 100 * ROUNDS * 10);
}

#[test]
fn bad_input_gets_clear_errors_and_the_bus_keeps_serving() {
    let bus = BusServer::start(&["--max-calls", "8"]);
    let mut svc = bus.conn();
    svc.request_name("org.example.Quiet", 0).unwrap();
    let (mut c, me) = raw(&bus);
    let err_of = |c: &mut Client, p: v5::Packet| -> (String, String) {
        c.send(&p).unwrap();
        let r = c.next_message().unwrap();
        assert_eq!(prop(&r, "type"), Some("error"));
        let msg: Value = serde_json::from_slice(&r.payload).unwrap();
        (
            prop(&r, "error").unwrap().to_string(),
            msg[0].as_str().unwrap().to_string(),
        )
    };
    let invalid = "org.freedesktop.DBus.Error.InvalidArgs";
    let q = "$bus/call/org.example.Quiet";
    assert_eq!(
        err_of(&mut c, publish(q, &[], b"[]", Some(b"1"))).0,
        invalid
    );
    assert_eq!(
        err_of(
            &mut c,
            publish(q, &[("member", "M"), ("path", "rel")], b"[]", Some(b"2"))
        )
        .0,
        invalid
    );
    assert_eq!(
        err_of(
            &mut c,
            publish(
                q,
                &[("member", "M"), ("timeout", "soon")],
                b"[]",
                Some(b"3")
            )
        )
        .0,
        invalid
    );
    let d = "$bus/call/org.freedesktop.DBus";
    assert_eq!(
        err_of(
            &mut c,
            publish(d, &[("member", "ListNames")], b"{not json", Some(b"4"))
        )
        .0,
        invalid
    );
    // Claiming another's unique name, or the bus's.
    for n in [":1.1", DRIVER, "no-dots"] {
        let body = json!([n, 0]).to_string();
        let (e, m) = err_of(
            &mut c,
            publish(d, &[("member", "RequestName")], body.as_bytes(), Some(b"5")),
        );
        assert_eq!(e, invalid, "{n}: {m}");
    }
    // A sender that names itself someone else: the callee sees who really sent it.
    c.send(&publish(
        q,
        &[
            ("member", "Spoof"),
            ("sender", ":1.999"),
            ("type", "signal"),
        ],
        b"[]",
        Some(b"6"),
    ))
    .unwrap();
    let call = loop {
        match svc.next_message(Some(Duration::from_secs(10))).unwrap() {
            Some(BusMessage::Call(call)) => break call,
            Some(BusMessage::Signal(s)) if s.member == "NameAcquired" => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(call.sender, me);
    // A reply from a third party carrying the call's correlation data is not taken.
    let (mut intruder, _) = raw(&bus);
    let mut stolen = publish("$bus/reply", &[], b"[\"forged\"]", None);
    if let v5::Packet::Publish(p) = &mut stolen {
        // The bus's correlation data for call N is N, big-endian: guess the small ones.
        for n in 1u64..4 {
            p.properties.correlation_data = Some(Bytes::copy_from_slice(&n.to_be_bytes()));
            intruder.send(&v5::Packet::Publish(p.clone())).unwrap();
        }
    }
    svc.writer()
        .unwrap()
        .reply(&call, &[json!("real")])
        .unwrap();
    let r = c.next_message().unwrap();
    assert_eq!(r.properties.correlation_data.as_deref(), Some(&b"6"[..]));
    assert_eq!(&r.payload[..], b"[\"real\"]");
    // $bus/ cannot be subscribed to.
    let (mut s, _) = Client::connect(&bus.endpoint(), &ConnectOptions::default()).unwrap();
    let code = s
        .subscribe(&["$bus/#".into()], mqtt_proto::QoS::Level0)
        .unwrap();
    assert_eq!(code, vec![v5::SubscribeReasonCode::TopicFilterInvalid]);
    // Malformed signal topics and unknown $bus/ topics are dropped; the connection lives.
    c.send(&publish("$bus/signal/nomember", &[], b"[]", None))
        .unwrap();
    c.send(&publish("$bus/signal//M", &[], b"[]", None))
        .unwrap();
    c.send(&publish("$bus/whatever", &[], b"[]", None)).unwrap();
    // A caller that floods an owner who never answers meets its cap of 8 waiting calls.
    let mut limited = 0;
    for i in 0..20u8 {
        c.send(&publish(q, &[("member", "Never")], b"[]", Some(&[100 + i])))
            .unwrap();
    }
    for _ in 0..12 {
        let r = c.next_message().unwrap();
        if prop(&r, "error") == Some("org.freedesktop.DBus.Error.LimitsExceeded") {
            limited += 1;
        }
    }
    assert_eq!(limited, 12);
    // The owner leaves: the eight waiting calls are answered NoReply, and the bus serves on.
    drop(svc);
    for _ in 0..8 {
        assert_eq!(prop(&c.next_message().unwrap(), "error"), Some(NO_REPLY));
    }
    let mut fresh = bus.conn();
    assert_eq!(fresh.call_driver("Ping", &[]).unwrap(), Vec::<Value>::new());
    match fresh.call(
        "org.example.Quiet",
        "/",
        None,
        "M",
        &[],
        Duration::from_secs(5),
    ) {
        Err(CallError::Error { name, .. }) => {
            assert_eq!(name, "org.freedesktop.DBus.Error.ServiceUnknown")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_paho_program_written_from_the_docs_calls_a_socklab_name_and_serves_one() {
    let bus = BusServer::start(&[]);
    let (mut rev, _, _o) = bus.own(&[
        "org.example.Rev",
        "--",
        "sh",
        "-c",
        "printf %s \"$1\" | rev",
        "sh",
    ]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/bus_dbus_paho.py");
    let mut py = Command::new("python3")
        .args([script, &bus.addr, "org.example.Rev", "org.example.PyCalc"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with paho-mqtt (.ci/run installs it)");
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    if line.trim() != "ready" {
        let _ = wait_timeout(&mut py, Duration::from_secs(10));
        let mut err = String::new();
        py.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        panic!("python: {line:?} {err}");
    }
    let o = bus.cli(&["call", "org.example.PyCalc", "Add", "-j", "2", "3", "37"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    let o = bus.cli(&["call", "org.example.PyCalc", "Fail"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("com.example.Error.Failed: asked to fail"),
        "{}",
        stderr(&o)
    );
    let status = wait_timeout(&mut py, Duration::from_secs(20)).expect("python finished");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(status.success());
    assert_eq!(line.trim(), "served Add Fail");
    kill_child(&mut rev);
}

#[test]
fn the_acl_decides_who_owns_and_calls_names_and_who_emits_signals() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("bus.passwd");
    let pw = pw.to_str().unwrap();
    for user in ["alice", "bob"] {
        let mut p = Command::new(BIN)
            .args(["bus", "passwd", pw, user])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        writeln!(p.stdin.take().unwrap(), "{user}-pw").unwrap();
        assert!(p.wait().unwrap().success());
    }
    let acl = dir.path().join("bus.acl");
    std::fs::write(
        &acl,
        "user alice\n\
         own org.example.Vault\n\
         call org.example.Vault\n\
         topic write $bus/signal/org.example.Vault1/#\n\
         user bob\n\
         call org.example.Vault org.example.Vault1 Get\n\
         call deny org.example.Vault * Wipe\n",
    )
    .unwrap();
    let bus = BusServer::start(&["--passwords", pw, "--acl", acl.to_str().unwrap()]);
    let login = |user: &str| {
        let o = ConnectOptions {
            username: Some(user.into()),
            password: Some(Bytes::from(format!("{user}-pw"))),
            ..Default::default()
        };
        BusConnection::connect_with(&bus.endpoint(), &o).unwrap()
    };
    let mut alice = login("alice");
    let mut bob = login("bob");
    let denied = "org.freedesktop.DBus.Error.AccessDenied";
    let name_of = |r: Result<RequestReply, CallError>| r.map_err(|e| e.name().map(str::to_string));
    assert_eq!(
        name_of(bob.request_name("org.example.Vault", 0)),
        Err(Some(denied.to_string()))
    );
    assert_eq!(
        name_of(alice.request_name("org.example.Vault", 0)),
        Ok(RequestReply::PrimaryOwner)
    );
    assert_eq!(
        name_of(alice.request_name("org.example.Other", 0)),
        Err(Some(denied.to_string()))
    );
    let w = alice.writer().unwrap();
    let service = std::thread::spawn(move || {
        let mut served = Vec::new();
        while served.len() < 2 {
            if let Some(BusMessage::Call(c)) =
                alice.next_message(Some(Duration::from_secs(20))).unwrap()
            {
                w.reply(&c, &[json!("ok")]).unwrap();
                served.push(c.member.clone());
            }
        }
        alice
            .emit("/v", "org.example.Vault1", "Opened", &[], None)
            .unwrap();
        alice
            .emit("/v", "org.example.Other1", "Opened", &[], None)
            .unwrap();
        alice
            .emit("/v", "org.example.Vault1", "End", &[], None)
            .unwrap();
        served
    });
    bob.add_match("path='/v'").unwrap();
    let call = |c: &mut BusConnection, iface: Option<&str>, m: &str| {
        c.call(
            "org.example.Vault",
            "/",
            iface,
            m,
            &[],
            Duration::from_secs(10),
        )
        .map_err(|e| e.name().map(str::to_string))
    };
    let v1 = Some("org.example.Vault1");
    assert_eq!(call(&mut bob, v1, "Get"), Ok(vec![json!("ok")]));
    assert_eq!(call(&mut bob, v1, "Wipe"), Err(Some(denied.into())));
    assert_eq!(call(&mut bob, None, "Wipe"), Err(Some(denied.into())));
    assert_eq!(call(&mut bob, v1, "Put"), Err(Some(denied.into())));
    assert_eq!(call(&mut bob, None, "Get"), Err(Some(denied.into())));
    assert_eq!(
        call(&mut bob, Some("org.freedesktop.DBus.Peer"), "Ping"),
        Ok(vec![])
    );
    let mut carol = login("bob");
    assert_eq!(call(&mut carol, v1, "Get"), Ok(vec![json!("ok")]));
    assert_eq!(service.join().unwrap(), vec!["Get", "Get"]);
    // Alice may emit on org.example.Vault1 only: bob sees Opened and End, not the other.
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("org.example.Vault1.End") {
        match bob.next_message(Some(Duration::from_secs(10))).unwrap() {
            Some(BusMessage::Signal(s)) => got.push(format!("{}.{}", s.interface, s.member)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, ["org.example.Vault1.Opened", "org.example.Vault1.End"]);
    // A wrong password never gets a unique name.
    let o = ConnectOptions {
        username: Some("bob".into()),
        password: Some(Bytes::from("guess")),
        ..Default::default()
    };
    assert!(BusConnection::connect_with(&bus.endpoint(), &o).is_err());
    // The command line logs in too.
    let o = bus.cli(&[
        "call",
        "org.example.Nobody",
        "X",
        "-u",
        "bob",
        "-P",
        "bob-pw",
    ]);
    assert!(stderr(&o).contains("ServiceUnknown"), "{}", stderr(&o));
}
