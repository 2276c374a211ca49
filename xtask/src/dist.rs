//! `cargo xtask dist`: the release archive an operator downloads. A static x86_64 binary
//! (musl) with the eBPF object embedded, the systemd unit, the preset as a configuration
//! file, the README and SHA256SUMS, in target/dist/ebpf-proxy-VERSION-x86_64-linux.tar.gz.
//! The binary is checked before it is packed: static, and saying it embeds the object.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    host_cargo, packages, run,
    toolchain::{self, capture},
};

const TARGET: &str = "x86_64-unknown-linux-musl";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Builds and packs the archive; returns the folder it packed.
pub fn dist(root: &Path) -> Result<PathBuf> {
    // ring's C and assembly build with the musl toolchain's compiler.
    packages::ensure(&[("musl-gcc", "musl-tools")])?;
    let targets = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t == TARGET) {
        run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    let linker = toolchain::ensure_bpf_toolchain(root)?;
    let object = toolchain::build_ebpf(root, &linker)?;
    run(host_cargo(&object)
        .args(["build", "--release", "--target", TARGET])
        .args(["--package", "proxy-userspace"])
        // An operator's binary needs no debug info: a third of the size.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .current_dir(root))?;
    let binary = root.join("target").join(TARGET).join("release/ebpf-proxy");
    check_static(&binary)?;
    let version = capture(Command::new(&binary).arg("--version"))?;
    if !version.contains("eBPF object embedded") {
        bail!("{} --version says {version:?}", binary.display());
    }

    let name = format!("ebpf-proxy-{VERSION}-x86_64-linux");
    let dist = root.join("target/dist");
    let stage = dist.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(&stage)?;
    let preset = capture(Command::new(&binary).args(["config", "--preset", "whatsapp"]))?;
    fs::write(stage.join("ebpf-proxy.toml"), preset)?;
    for (from, to) in [
        (binary.as_path(), "ebpf-proxy"),
        (&root.join("dist/ebpf-proxy.service"), "ebpf-proxy.service"),
        (&root.join("README.md"), "README.md"),
    ] {
        fs::copy(from, stage.join(to)).with_context(|| format!("copying {}", from.display()))?;
    }
    let sums = capture(
        Command::new("sha256sum")
            .args([
                "ebpf-proxy",
                "ebpf-proxy.service",
                "ebpf-proxy.toml",
                "README.md",
            ])
            .current_dir(&stage),
    )?;
    fs::write(stage.join("SHA256SUMS"), sums)?;
    let archive = dist.join(format!("{name}.tar.gz"));
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "-czf"])
        .arg(&archive)
        .args(["-C", dist.to_str().context("a UTF-8 path")?, &name]))?;
    println!("{}\n{}", version.trim(), archive.display());
    Ok(stage)
}

/// Fails unless `binary` is a static ELF executable: no program interpreter to load it.
fn check_static(binary: &Path) -> Result<()> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(binary)?;
    let field = |at: usize, len: usize| -> Result<u64> {
        let bytes = elf.get(at..at + len).context("a truncated ELF header")?;
        Ok(bytes.iter().rev().fold(0, |n, b| n << 8 | u64::from(*b)))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", binary.display());
    }
    let (table, entry_size, entries) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..entries {
        if field((table + i * entry_size) as usize, 4)? == u64::from(PT_INTERP) {
            bail!("{} is dynamically linked", binary.display());
        }
    }
    Ok(())
}
