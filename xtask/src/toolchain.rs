//! The eBPF toolchain, bootstrapped inside the project: nightly's rust-src, and bpf-linker
//! built against the nightly's own libLLVM (no packaged LLVM matches it), kept under
//! target/bpf-linker and rebuilt when the nightly changes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Returns the path of a bpf-linker matching the installed nightly, building it if needed.
pub fn ensure_bpf_toolchain(root: &Path) -> Result<PathBuf> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .context("rustup with a nightly toolchain is required (rustup toolchain install nightly)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }

    let version = capture(Command::new("rustc").arg(format!("+{NIGHTLY}")).arg("-vV"))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_owned();
    let dir = root.join("target/bpf-linker");
    let linker = dir.join("bin/bpf-linker");
    let stamp = dir.join("built-for");
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}\n{version}");
    if linker.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(linker);
    }

    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about a minute, once)"
    );
    let sysroot = capture(
        Command::new("rustc")
            .arg(format!("+{NIGHTLY}"))
            .args(["--print", "sysroot"]),
    )?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&sysroot_lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM shared library in {}", sysroot_lib.display()))?;
    // llvm-sys links -lLLVM; the loader then wants the library's soname, which is the name
    // rustup ships it under (libLLVM.so.<ver>-rust-<ver>-nightly). Point both at it.
    let prefix = dir.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    let soname = soname(&libllvm)?;
    for name in ["libLLVM.so".to_owned(), soname] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("rustup")
        .args([
            "run",
            NIGHTLY,
            "cargo",
            "install",
            "bpf-linker",
            "--locked",
            "--force",
        ])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
        .arg("--features")
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(&dir)
        .env("LLVM_PREFIX", &prefix)
        .env_remove("CARGO_TARGET_DIR"))?;
    fs::write(&stamp, wanted)?;
    Ok(linker)
}

/// Where `build_ebpf` leaves the object.
pub fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/bpf")
        .join(BPF_TARGET)
        .join("release/proxy-ebpf")
}

/// Builds proxy-ebpf for the BPF target (incremental: a no-op when nothing changed).
pub fn build_ebpf(root: &Path, linker: &Path) -> Result<PathBuf> {
    run(Command::new("rustup")
        .args([
            "run",
            NIGHTLY,
            "cargo",
            "build",
            "--release",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--manifest-path")
        .arg(root.join("proxy-ebpf/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/bpf"))
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", linker)
        // BTF lets bpftool show the program's types and aya relocate its globals.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR"))?;
    let object = ebpf_object(root);
    if !object.exists() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(object)
}

/// Runs `command` and returns its standard output; fails with its standard error.
pub fn capture(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

fn soname(library: &Path) -> Result<String> {
    let name = library
        .file_name()
        .and_then(|n| n.to_str())
        .context("library name")?;
    Ok(name.to_owned())
}
