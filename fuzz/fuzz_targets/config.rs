//! The configuration loader: any text gives a configuration or an error naming a line that
//! exists, never a panic.
#![no_main]

use ebpf_proxy::config::{Config, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse("fuzz.toml", text, &Overrides::default()) {
        if let Some(line) = e.line {
            assert!(line >= 1 && line <= text.split('\n').count(), "{e}");
        }
    }
});
