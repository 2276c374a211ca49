//! Checks of what operators deploy from `deploy/`: the Kubernetes manifests against the API
//! schemas (kubernetes-validate, from PyPI, in a virtualenv under target/), the compose file
//! as YAML, and the ConfigMap's configuration against the preset it copies.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{run, toolchain::capture};

const VALIDATOR: &str = "kubernetes-validate";

pub fn check(root: &Path) -> Result<()> {
    let venv = root.join("target/deploy-check");
    let bin = venv.join("bin");
    if !bin.join(VALIDATOR).exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(bin.join("pip")).args(["install", "--quiet", VALIDATOR]))?;
    }
    let kubernetes = root.join("deploy/kubernetes");
    let mut manifests: Vec<_> = fs::read_dir(&kubernetes)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    run(Command::new(bin.join(VALIDATOR))
        .args(["--strict", "--quiet"])
        .args(&manifests))?;
    capture(
        Command::new(bin.join("python"))
            .args(["-c", "import sys, yaml; yaml.safe_load(open(sys.argv[1]))"])
            .arg(root.join("deploy/compose.yaml")),
    )
    .context("deploy/compose.yaml is not valid YAML")?;
    let configmap = fs::read_to_string(kubernetes.join("configmap.yaml"))?;
    let preset = fs::read_to_string(root.join("proxy-userspace/src/config/whatsapp.toml"))?;
    if block_scalar(&configmap, "ebpf-proxy.toml: |") != preset {
        bail!("deploy/kubernetes/configmap.yaml no longer holds the preset: copy it again");
    }
    println!(
        "deploy/: {} manifests valid, compose file parses, ConfigMap holds the preset",
        manifests.len()
    );
    Ok(())
}

/// The text of the YAML block scalar introduced by `key`, its indentation removed.
fn block_scalar(yaml: &str, key: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(key))
        .skip(1);
    let Some(first) = lines.clone().find(|l| !l.trim().is_empty()) else {
        return String::new();
    };
    let indent = first.len() - first.trim_start().len();
    let mut text = String::new();
    for line in lines.by_ref() {
        if !line.trim().is_empty() && line.len() - line.trim_start().len() < indent {
            break;
        }
        text.push_str(line.get(indent..).unwrap_or(""));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_scalar_comes_back_as_written() {
        let yaml = "data:\n  file: |\n    a = 1\n\n    [b]\n    c = 2\nnext: x\n";
        assert_eq!(block_scalar(yaml, "file: |"), "a = 1\n\n[b]\nc = 2\n");
    }
}
