//! The config loader (`src/config.rs` + `src/settings.rs`): any text is parsed and validated
//! without a panic, only `Ok` or an error naming the file (and a line within it, when there is
//! one).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tollgate::settings::Settings;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/nonexistent/tollgate-fuzz");
    if let Err(e) = Settings::from_text(text, "fuzz.toml", base, None) {
        assert_eq!(e.path, "fuzz.toml");
        let lines = text.lines().count();
        assert!(
            e.line <= lines + 1,
            "line {} of a {lines}-line file",
            e.line
        );
        assert!(!e.message.is_empty(), "an error without a message: {e}");
    }
    // The database URL from the environment goes through the same validation.
    if let Some(url) = text.lines().next() {
        let _ = Settings::from_text("", "fuzz.toml", base, Some(url.to_string()));
    }
});
