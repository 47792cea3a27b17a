//! Decode and encode a 64-byte QoS 1 PUBLISH (MQTT 5.0) with `mqtt-proto` and
//! `mqtt-protocol-core`, and encode it with socklab's hand-written PUBLISH writer.
//! Reports nanoseconds per operation (best of 5 runs of 1,000,000).

use std::hint::black_box;
use std::time::Instant;

fn best(name: &str, mut f: impl FnMut()) {
    let n = 1_000_000;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    println!("{name:<48} {best:>7.1} ns");
}

fn main() {
    use mqtt_proto::v5;
    let payload = bytes::Bytes::from(vec![7u8; 64]);
    let p = v5::Publish::new(
        mqtt_proto::QosPid::Level1(mqtt_proto::Pid::try_from(7).unwrap()),
        mqtt_proto::TopicName::try_from("bench/topic/1").unwrap(),
        payload.clone(),
    );
    let wire = v5::Packet::Publish(p.clone()).encode().unwrap().as_ref().to_vec();

    best("mqtt-proto: decode PUBLISH (slice decoder)", || {
        let h = v5::Header::new_with(wire[0], (wire.len() - 2) as u32, wire.len() as u32).unwrap();
        let mut off = 2;
        black_box(v5::Publish::decode(black_box(&wire), &mut off, h).unwrap());
    });
    best("mqtt-proto: decode PUBLISH (Packet::decode)", || {
        black_box(v5::Packet::decode(black_box(&wire)).unwrap());
    });
    best("socklab codec::decode (framing + mqtt-proto)", || {
        let (h, _) = socklab::bus::codec::frame(&wire, 1 << 20).unwrap().unwrap();
        black_box(socklab::bus::codec::decode(socklab::bus::codec::Version::V5, black_box(&wire), h).unwrap());
    });
    let pk = v5::Packet::Publish(p.clone());
    best("mqtt-proto: encode PUBLISH", || {
        black_box(black_box(&pk).encode().unwrap());
    });
    let msg = socklab::bus::codec::Message::from_publish(&p, "bench/topic/1".into(), Instant::now());
    let mut out = Vec::with_capacity(256);
    best("socklab encode_publish (into a reused buffer)", || {
        out.clear();
        let h = socklab::bus::codec::PublishHeader { qos: 1, pid: 7, ..Default::default() };
        black_box(socklab::bus::codec::encode_publish(socklab::bus::codec::Version::V5, black_box(&msg), &h, 1 << 20, &mut out));
    });

    use mqtt_protocol_core::mqtt::packet::v5_0;
    let arc: std::sync::Arc<[u8]> = wire[2..].to_vec().into();
    best("mqtt-protocol-core: decode PUBLISH", || {
        black_box(v5_0::Publish::parse(wire[0] & 0x0f, black_box(arc.clone())).unwrap());
    });
    let (mp, _) = v5_0::Publish::parse(wire[0] & 0x0f, arc.clone()).unwrap();
    best("mqtt-protocol-core: encode PUBLISH", || {
        black_box(black_box(&mp).to_continuous_buffer());
    });
}
