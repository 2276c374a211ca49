//! The opening classifier sees whatever a client sends first on a listener with a fallback:
//! it must never panic, never change a decision as bytes come, and never ask for more than
//! it may buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ebpf_proxy::opening::check_invariants(data));
