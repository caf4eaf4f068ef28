//! The SSE parser (`src/sse.rs`): any bytes, split anywhere, give the same usage, model, end
//! flag and stripped output as the whole stream fed at once; nothing panics.
//!
//! Input: byte 0 picks the dialect (bits 0-1) and a small event cap (bit 2, to reach the
//! over-the-cap paths); byte 1 seeds the chunk sizes; the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::sse::{SseUsage, UsageChunkStripper, DEFAULT_EVENT_CAP};
use tollgate::usage::Dialect;

/// Chunk lengths 1..=17 from a xorshift seeded by `seed` (0 = one byte at a time).
fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut x = u32::from(seed) | 0x100;
    let mut rest = data;
    while !rest.is_empty() {
        let n = if seed == 0 {
            1
        } else {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + (x % 17) as usize
        };
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

type Seen = (
    Option<tollgate::usage::Usage>,
    Option<String>,
    bool,
    Vec<u8>,
);

fn run(parts: &[&[u8]], dialect: Dialect, cap: usize) -> Seen {
    let mut usage = SseUsage::with_event_cap(dialect, cap);
    let mut strip = UsageChunkStripper::with_event_cap(cap);
    let mut out = Vec::new();
    for p in parts {
        usage.feed(p);
        strip.feed(p, &mut out);
    }
    usage.finish();
    strip.finish(&mut out);
    (
        usage.usage(),
        usage.model().map(str::to_owned),
        usage.saw_done(),
        out,
    )
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let dialect = match data[0] & 3 {
        0 => Dialect::OpenAi,
        1 => Dialect::Anthropic,
        _ => Dialect::Generic,
    };
    let cap = if data[0] & 4 != 0 {
        48
    } else {
        DEFAULT_EVENT_CAP
    };
    let stream = &data[2..];
    let whole = run(&[stream], dialect, cap);
    let split = run(&chunks(stream, data[1]), dialect, cap);
    assert_eq!(whole, split, "split at seed {} differs from whole", data[1]);
    let bytes = run(&chunks(stream, 0), dialect, cap);
    assert_eq!(whole, bytes, "byte-at-a-time differs from whole");
    // The stripper only ever removes whole events; with no usage in sight it removes nothing.
    assert!(whole.3.len() <= stream.len());
    let may_name_usage = |needle: &[u8]| stream.windows(needle.len()).any(|w| w == needle);
    if !may_name_usage(b"usage") && !may_name_usage(b"\\u") {
        assert_eq!(whole.3, stream, "stripped an event that has no usage");
    }
});
