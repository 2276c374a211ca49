//! `cargo xtask fuzz`: runs every cargo-fuzz target for a bounded time, installing
//! cargo-fuzz first if it is missing. Seeds are read from fuzz/corpus/TARGET; what the
//! fuzzer adds goes to fuzz/target/corpus/TARGET; crashes land in fuzz/artifacts/TARGET.

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::run;

pub const TARGETS: [&str; 3] = ["proxy_header", "config", "opening"];

pub fn fuzz(root: &Path, seconds: u32) -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz = root.join("fuzz");
    for target in TARGETS {
        let scratch = fuzz.join("target/corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        let seeds = fuzz.join("corpus").join(target);
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(&fuzz))?;
    }
    Ok(())
}
