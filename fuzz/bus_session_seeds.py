#!/usr/bin/env python3
"""Write the seed corpus of the bus_session fuzz target: valid MQTT 3.1.1 and 5.0 sessions
of three clients (pub/sub at every QoS, retained messages, wills, persistent sessions,
topic aliases, shared subscriptions, request/response properties, lost connections, time
passing), in the target's input format (see fuzz_targets/bus_session.rs). The fuzzer
mutates from these, so it gets past CONNECT into the broker's states.

    python3 fuzz/bus_session_seeds.py fuzz/corpus/bus_session
"""
import hashlib
import os
import struct
import sys


def var(n):
    out = b""
    while True:
        b = n % 128
        n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + var(len(body)) + body


def props(*items):
    body = b"".join(items)
    return var(len(body)) + body


def p_u8(pid, v):
    return bytes([pid, v])


def p_u16(pid, v):
    return bytes([pid]) + struct.pack(">H", v)


def p_u32(pid, v):
    return bytes([pid]) + struct.pack(">I", v)


def p_str(pid, v):
    return bytes([pid]) + s(v)


def p_var(pid, v):
    return bytes([pid]) + var(v)


def p_user(k, v):
    return bytes([0x26]) + s(k) + s(v)


def connect(cid, v5=True, clean=True, ka=60, cprops=b"", will=None, user=None):
    flags = 0x02 if clean else 0
    payload = s(cid)
    if will:
        topic, msg, qos, retain, wprops = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += (props(wprops) if v5 else b"") + s(topic) + s(msg)
    if user:
        flags |= 0xC0
        payload += s(user[0]) + s(user[1])
    head = s("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", ka)
    if v5:
        head += props(cprops)
    return packet(0x10, head + payload)


def connect31(cid):
    return packet(0x10, s("MQIsdp") + bytes([3, 0x02]) + struct.pack(">H", 30) + s(cid))


def publish(topic, msg, v5=True, qos=0, pid=1, retain=False, dup=False, pprops=b""):
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = s(topic)
    if qos:
        body += struct.pack(">H", pid)
    if v5:
        body += props(pprops)
    return packet(first, body + (msg.encode() if isinstance(msg, str) else msg))


def subscribe(pid, filters, v5=True, sprops=b""):
    body = struct.pack(">H", pid) + (props(sprops) if v5 else b"")
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return packet(0x82, body)


def unsubscribe(pid, filters, v5=True):
    body = struct.pack(">H", pid) + (props(b"") if v5 else b"")
    for f in filters:
        body += s(f)
    return packet(0xA2, body)


def ack(kind, pid):
    first = {"puback": 0x40, "pubrec": 0x50, "pubrel": 0x62, "pubcomp": 0x70}[kind]
    return packet(first, struct.pack(">H", pid))


def disconnect(v5=True, reason=0, dprops=b""):
    if not v5:
        return b"\xe0\x00"
    return packet(0xE0, bytes([reason]) + props(dprops))


PING = b"\xc0\x00"


class Seed:
    """Chunks of three clients' bytes, with lost connections and seconds passing."""

    def __init__(self, settings=0):
        self.out = bytearray([settings])

    def send(self, who, data, tick=False):
        first = True
        while data:
            n = min(32, len(data))
            head = who | ((n - 1) << 2) | (0x80 if tick and first else 0)
            self.out += bytes([head]) + data[:n]
            data = data[n:]
            first = False
        return self

    def lose(self, who, tick=False):
        self.out += bytes([3 | (who << 2) | (0x80 if tick else 0)])
        return self

    def tick(self, seconds=1):
        for _ in range(seconds):
            self.send(0, PING, tick=True)
        return self


def seeds():
    v5sub = Seed().send(0, connect("sub", cprops=p_u16(0x22, 4)))
    v5sub.send(0, subscribe(1, [("a/#", 2), ("a/+", 1)], sprops=p_var(0x0B, 7)))
    v5sub.send(1, connect("pub", v5=False))
    for q, pid in [(0, 0), (1, 1), (2, 2)]:
        v5sub.send(1, publish("a/b", "m%d" % q, v5=False, qos=q, pid=pid))
    v5sub.send(1, ack("pubrel", 2)).send(0, ack("puback", 1)).send(0, ack("pubrec", 2))
    v5sub.send(0, ack("pubcomp", 2)).send(0, unsubscribe(3, ["a/+", "x"]))
    v5sub.send(0, disconnect()).send(1, disconnect(v5=False))
    yield "qos_flows", v5sub

    r = Seed().send(1, connect("r", v5=False))
    for t in ["r/1", "r/2/x", "$SYS/fake", "r/"]:
        r.send(1, publish(t, "v", v5=False, retain=True))
    r.send(1, publish("r/1", "", v5=False, retain=True))
    r.send(0, connect("s")).send(0, subscribe(1, [("r/#", 0x01), ("+/+", 0x10 | 1), ("#", 0x20)]))
    r.send(0, subscribe(2, [("r/#", 0x11)]))
    yield "retained", r

    w = Seed().send(1, connect("watch")).send(1, subscribe(1, [("will/#", 1)]))
    wprops = p_u32(0x18, 2) + p_u32(0x02, 30) + p_u8(0x01, 1) + p_str(0x03, "text/plain")
    w.send(0, connect("w", clean=False, cprops=p_u32(0x11, 10),
                      will=("will/w", "gone", 1, True, wprops)))
    w.send(2, connect("w0", v5=False, will=("will/now", "bye", 0, False, b"")))
    w.lose(0).lose(2).tick(3).send(1, ack("puback", 1)).tick(10)
    yield "wills", w

    p = Seed().send(0, connect("keeper", v5=False, clean=False))
    p.send(0, subscribe(1, [("q", 1)], v5=False)).lose(0)
    p.send(1, connect("p", v5=False))
    for i in range(1, 5):
        p.send(1, publish("q", "n%d" % i, v5=False, qos=1, pid=i))
    p.send(0, connect("keeper", v5=False, clean=False))
    for i in range(1, 5):
        p.send(0, ack("puback", i))
    yield "persistent", p

    a = Seed().send(0, connect("aliases", cprops=p_u16(0x22, 2)))
    a.send(0, subscribe(1, [("t/#", 0)]))
    a.send(1, connect("talker"))
    a.send(1, publish("t/long/topic", "1", pprops=p_u16(0x23, 1)))
    a.send(1, publish("", "2", pprops=p_u16(0x23, 1)))
    for t in ["t/a", "t/b", "t/c"]:
        a.send(1, publish(t, "x"))
    yield "topic_aliases", a

    sh = Seed().send(0, connect("w1")).send(1, connect("w2"))
    sh.send(0, subscribe(1, [("$share/g/job/+", 1)])).send(1, subscribe(1, [("$share/g/job/+", 0)]))
    sh.send(2, connect("boss", v5=False))
    for i in range(1, 6):
        sh.send(2, publish("job/%d" % i, "do", v5=False, qos=1, pid=i))
    yield "shared", sh

    rr = Seed().send(0, connect("server")).send(0, subscribe(1, [("req", 1)], sprops=p_var(0x0B, 3)))
    rr.send(1, connect("client", cprops=p_u8(0x19, 1)))
    rr.send(1, subscribe(1, [("resp/+", 1)]))
    rprops = (p_str(0x08, "resp/1") + bytes([0x09]) + s(b"\x01\x02") + p_user("k", "v")
              + p_user("k", "w") + p_u32(0x02, 60) + p_u8(0x01, 1) + p_str(0x03, "json"))
    rr.send(1, publish("req", "{}", qos=1, pid=9, pprops=rprops))
    rr.send(0, ack("puback", 1)).send(0, publish("resp/1", "ok", qos=1, pid=1, pprops=bytes([0x09]) + s(b"\x01\x02")))
    yield "request_response", rr

    e = Seed().send(0, connect("exp", clean=False, cprops=p_u32(0x11, 2)))
    e.send(0, subscribe(1, [("e", 1)])).send(0, disconnect(dprops=p_u32(0x11, 3)))
    e.send(1, connect("exp", clean=False, cprops=p_u32(0x11, 2)))
    e.send(2, connect("exp", clean=False, cprops=p_u32(0x11, 2)))  # takes over
    e.send(2, disconnect(reason=0x04)).tick(4)
    e.send(0, connect("exp", clean=False))
    yield "expiry_takeover", e

    for settings in [1, 2, 3]:
        c = Seed(settings).send(0, connect("slow", clean=False, cprops=p_u32(0x11, 100)))
        c.send(0, subscribe(1, [("c/#", 2)])).send(1, connect("fast", v5=False))
        for i in range(1, 7):
            c.send(1, publish("c/%d" % i, "z" * 20, v5=False, qos=1 + i % 2, pid=i))
            if i % 2:
                c.send(1, ack("pubrel", i))
        c.lose(0).send(0, connect("slow", clean=False, cprops=p_u32(0x11, 100)))
        c.send(0, ack("pubrec", 1)).send(0, ack("pubcomp", 1)).send(0, ack("puback", 2))
        yield "caps_durable_%d" % settings, c

    k = Seed().send(0, connect("ka", ka=1, cprops=p_u16(0x21, 2) + p_u32(0x27, 200)))
    k.send(0, PING).tick(2).send(1, connect31("old")).send(1, PING)
    yield "keepalive_31", k

    n = Seed().send(0, connect("self")).send(0, subscribe(1, [("loop", 0x04 | 0x08 | 1)]))
    n.send(0, publish("loop", "me", qos=1, pid=1, retain=True)).send(0, publish("loop", "", retain=True))
    n.send(0, subscribe(2, [("$share/g/loop", 0x04)]))
    yield "no_local", n

    bad = Seed().send(0, connect("bad")).send(0, packet(0xF0, b"\x18\x00"))
    bad.send(1, connect("dup")).send(1, publish("t", "x", pprops=p_u8(0x01, 1) + p_u8(0x01, 0)))
    bad.send(2, connect("auth", cprops=p_str(0x15, "SCRAM")))
    yield "violations", bad

    u = Seed().send(0, connect("user", v5=False, user=("alice", "secret")))
    u.send(0, subscribe(1, [("a", 0), ("b/+/c", 1), ("#", 2)], v5=False))
    u.send(1, connect("", cprops=p_u32(0x11, 5)))
    u.send(1, publish("b/x/c", "hi", qos=2, pid=7)).send(1, ack("pubrel", 7))
    yield "assigned_id", u


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus/bus_session"
    os.makedirs(out, exist_ok=True)
    for name, seed in seeds():
        data = bytes(seed.out)
        digest = hashlib.sha1(data).hexdigest()[:12]
        with open(os.path.join(out, "seed-%s-%s" % (name, digest)), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
