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
    let service =
        [BenchService::Echo, BenchService::Reverse, BenchService::Http][data[0] as usize % 3];
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
        assert_eq!(whole.1, split.1, "verdict depends on how the answer was split");
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
