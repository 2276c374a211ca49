//! Embeds the kernel object when `cargo xtask build` hands one over in PROXY_EBPF_OBJECT.
//! Plain `cargo build`/`check`/`clippy` work without the BPF toolchain and produce a binary
//! that says it has no kernel data plane; xtask rebuilds the object before every build, and
//! rustc tracks the included file, so the embedded object is never stale. Also writes what
//! `--version` says: the version, the commit xtask names in EBPF_PROXY_COMMIT, and whether
//! the object is embedded.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(embedded_bpf)");
    println!("cargo::rerun-if-env-changed=PROXY_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=EBPF_PROXY_COMMIT");
    let object = std::env::var("PROXY_EBPF_OBJECT").ok();
    if let Some(path) = &object {
        println!("cargo::rerun-if-changed={path}");
        println!("cargo::rustc-cfg=embedded_bpf");
        println!("cargo::rustc-env=PROXY_EBPF_OBJECT_PATH={path}");
    }
    let commit = std::env::var("EBPF_PROXY_COMMIT").unwrap_or_else(|_| "unknown".to_owned());
    let embedded = match object {
        Some(_) => "eBPF object embedded",
        None => "no eBPF object: build with cargo xtask build",
    };
    println!(
        "cargo::rustc-env=EBPF_PROXY_VERSION={} (commit {commit}, {embedded})",
        std::env::var("CARGO_PKG_VERSION").expect("cargo sets it")
    );
}
