//! The PROXY header parser sees whatever a client sends first: it must never panic, and a
//! header it accepts must lie within the bytes received.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ebpf_proxy::proxy_protocol::check_invariants(data));
