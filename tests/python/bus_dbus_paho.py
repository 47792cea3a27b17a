"""A paho-mqtt 2.x program that uses socklab bus's D-Bus half, written from docs/bus.md
("The wire mapping onto MQTT 5") alone.

    python3 tests/python/bus_dbus_paho.py HOST:PORT CALL_NAME OWN_NAME

It connects with MQTT 5, reads its unique name from the CONNACK, owns OWN_NAME, calls
CALL_NAME's Reverse("hello") and expects ["olleh"], calls a name nobody owns and expects
ServiceUnknown, then prints "ready" and serves OWN_NAME: Add(a, b, ...) returns the sum,
Fail returns the error com.example.Error.Failed. It exits 0 after serving two calls, printing
"served Add Fail"; any deviation raises (exit 1).
"""

import json
import queue
import sys
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TIMEOUT = 20


def user_props(props):
    return dict(getattr(props, "UserProperty", None) or [])


class Bus:
    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.unique = None
        self.connected = queue.Queue()
        self.replies = {}          # correlation data -> queue of (user properties, args)
        self.calls = queue.Queue()  # calls routed to us: (user properties, args, corr)
        self.reply_topic = "pyclient/replies/" + uuid.uuid4().hex
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_connect = self.on_connect
        self.c.on_message = self.on_message
        self.c.connect(host, int(port))
        self.c.loop_start()
        rc = self.connected.get(timeout=TIMEOUT)
        assert not rc.is_failure, f"CONNACK {rc}"
        assert self.unique and self.unique.startswith(":1."), self.unique

    def on_connect(self, client, userdata, flags, reason_code, properties):
        # The CONNACK's user property "unique-name" is our unique name.
        self.unique = user_props(properties).get("unique-name")
        self.connected.put(reason_code)

    def on_message(self, client, userdata, msg):
        up = user_props(msg.properties)
        args = json.loads(msg.payload) if msg.payload else []
        corr = getattr(msg.properties, "CorrelationData", None)
        if msg.topic == self.reply_topic:
            self.replies[corr].put((up, args))
        elif msg.topic.startswith("$bus/call/") and up.get("type") == "method_call":
            self.calls.put((up, args, corr, getattr(msg.properties, "ResponseTopic", None)))

    def call(self, dest, member, args, path="/", interface=None, timeout_ms=10000):
        """Publish a method call; return ("reply", args) or ("error", name, message)."""
        corr = uuid.uuid4().bytes
        self.replies[corr] = queue.Queue()
        p = Properties(PacketTypes.PUBLISH)
        ups = [("member", member), ("path", path), ("timeout", str(timeout_ms))]
        if interface:
            ups.append(("interface", interface))
        p.UserProperty = ups
        p.ResponseTopic = self.reply_topic
        p.CorrelationData = corr
        self.c.publish("$bus/call/" + dest, json.dumps(args), qos=1, properties=p)
        up, out = self.replies[corr].get(timeout=TIMEOUT)
        del self.replies[corr]
        if up.get("type") == "error":
            return ("error", up.get("error"), out[0] if out else "")
        assert up.get("type") == "method_return", up
        return ("reply", out)

    def reply(self, corr, args, error=None):
        p = Properties(PacketTypes.PUBLISH)
        if error:
            p.UserProperty = [("error", error)]
        p.CorrelationData = corr
        self.c.publish("$bus/reply", json.dumps(args), qos=1, properties=p)


def main():
    addr, call_name, own_name = sys.argv[1:4]
    bus = Bus(addr)

    # RequestName with flag 4 (do not queue): 1 = primary owner.
    r = bus.call("org.freedesktop.DBus", "RequestName", [own_name, 4], path="/org/freedesktop/DBus")
    assert r == ("reply", [1]), r
    r = bus.call("org.freedesktop.DBus", "GetNameOwner", [own_name])
    assert r == ("reply", [bus.unique]), r

    r = bus.call(call_name, "Reverse", ["hello"])
    assert r == ("reply", ["olleh"]), r

    r = bus.call("org.example.NobodyOwnsThis", "Anything", [])
    assert r[0] == "error" and r[1] == "org.freedesktop.DBus.Error.ServiceUnknown", r

    print("ready", flush=True)
    served = []
    while len(served) < 2:
        up, args, corr, response_topic = bus.calls.get(timeout=TIMEOUT)
        assert response_topic == "$bus/reply", response_topic
        assert len(corr) == 8, corr
        assert up["destination"] == own_name and up["sender"].startswith(":1."), up
        if up["member"] == "Add":
            bus.reply(corr, [sum(int(a) for a in args)])
        elif up["member"] == "Fail":
            bus.reply(corr, ["asked to fail"], error="com.example.Error.Failed")
        else:
            bus.reply(corr, ["no method " + up["member"]],
                      error="org.freedesktop.DBus.Error.UnknownMethod")
            continue
        served.append(up["member"])
    print("served " + " ".join(served), flush=True)
    bus.c.disconnect()
    bus.c.loop_stop()


if __name__ == "__main__":
    main()
