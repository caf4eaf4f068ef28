//! The JSON usage extractor (`src/usage.rs`): never panics on any body, in any dialect; the
//! chunked collector agrees with the whole-body extractor; token sums saturate, never wrap.
//!
//! Input: byte 0 picks the dialect (bits 0-1) and the chunk size (bits 2-7); the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::usage::{from_json, Dialect, JsonBodyCollector, JsonOutcome};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let dialect = match sel & 3 {
        0 => Dialect::OpenAi,
        1 => Dialect::Anthropic,
        _ => Dialect::Generic,
    };
    let whole = from_json(body, dialect);
    if let Some(u) = whole.usage {
        assert!(u.total_tokens() >= u.prompt_tokens());
        assert!(u.total_tokens() >= u.output_tokens);
    }
    if let Some(e) = &whole.error {
        assert!(
            e.len() <= 100,
            "provider error label not bounded: {} bytes",
            e.len()
        );
    }
    let step = usize::from(sel >> 2) + 1;
    let mut collector = JsonBodyCollector::new(body.len());
    for chunk in body.chunks(step) {
        collector.feed(chunk);
    }
    match collector.finish(dialect) {
        JsonOutcome::Parsed(e) => assert_eq!(e, whole),
        JsonOutcome::Invalid => assert_eq!(whole, Default::default()),
        JsonOutcome::TooLarge => panic!("a body of exactly the cap is not too large"),
    }
    if !body.is_empty() {
        let mut small = JsonBodyCollector::new(body.len() - 1);
        small.feed(body);
        assert_eq!(small.finish(dialect), JsonOutcome::TooLarge);
    }
});
