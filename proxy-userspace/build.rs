//! Embeds the kernel object when `cargo xtask build` hands one over in PROXY_EBPF_OBJECT.
//! Plain `cargo build`/`check`/`clippy` work without the BPF toolchain and produce a binary
//! that says it has no kernel data plane; xtask rebuilds the object before every build, and
//! rustc tracks the included file, so the embedded object is never stale.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(embedded_bpf)");
    println!("cargo::rerun-if-env-changed=PROXY_EBPF_OBJECT");
    if let Ok(path) = std::env::var("PROXY_EBPF_OBJECT") {
        println!("cargo::rerun-if-changed={path}");
        println!("cargo::rustc-cfg=embedded_bpf");
        println!("cargo::rustc-env=PROXY_EBPF_OBJECT_PATH={path}");
    }
}
