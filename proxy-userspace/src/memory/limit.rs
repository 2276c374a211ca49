//! The default memory limit: a share of the machine's memory, or of the memory cgroup's
//! limit when that is lower (a container, a systemd MemoryMax=).

use std::{fs, path::Path};

/// The share of the machine's (or the cgroup's) memory the relay may hold for its
/// connections by default: the rest is the kernel's, the relay's own and the machine's.
pub const DEFAULT_SHARE: u64 = 4;

/// Where the default limit came from, for the log line that states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    Machine,
    Cgroup,
}

/// A quarter ([`DEFAULT_SHARE`]) of the lower of MemTotal and the memory cgroup's limit.
pub fn default_limit() -> (u64, Basis) {
    let total = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text))
        .unwrap_or(1 << 30);
    let cgroup = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_limit(&text, Path::new("/sys/fs/cgroup")));
    match cgroup {
        Some(limit) if limit < total => (limit / DEFAULT_SHARE, Basis::Cgroup),
        _ => (total / DEFAULT_SHARE, Basis::Machine),
    }
}

/// MemTotal from /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// The memory limit of this process's cgroup, v2 (`memory.max`) or v1
/// (`memory.limit_in_bytes`, under the `memory` controller's hierarchy); None when there is
/// none ("max", or v1's page-rounded i64::MAX).
fn cgroup_limit(self_cgroup: &str, root: &Path) -> Option<u64> {
    let mut candidates = Vec::new();
    for line in self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(path).join("memory.limit_in_bytes"));
        } else if controllers.is_empty() {
            // v2: the unified hierarchy, mounted at the root or at unified/ (hybrid).
            candidates.push(root.join(path).join("memory.max"));
            candidates.push(root.join("unified").join(path).join("memory.max"));
        }
    }
    candidates
        .iter()
        .filter_map(|file| fs::read_to_string(file).ok())
        .filter_map(|text| text.trim().parse::<u64>().ok())
        // v1 says "no limit" with a huge number instead of "max".
        .filter(|&limit| limit < 1 << 60)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       24683568 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total(text), Some(24683568 << 10));
        assert_eq!(mem_total("nothing"), None);
    }

    #[test]
    fn the_cgroup_limit_is_found_in_v1_and_v2_layouts() {
        let root = std::env::temp_dir().join(format!("ebpf-proxy-cgroup-{}", std::process::id()));
        let v1 = root.join("memory/app");
        let v2 = root.join("unified/svc");
        fs::create_dir_all(&v1).unwrap();
        fs::create_dir_all(&v2).unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        fs::write(v2.join("memory.max"), "max\n").unwrap();
        let hybrid = "4:memory:/app\n0::/svc\n";
        assert_eq!(cgroup_limit(hybrid, &root), None, "no limit set anywhere");
        fs::write(v1.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        assert_eq!(cgroup_limit(hybrid, &root), Some(1 << 30));
        fs::write(v2.join("memory.max"), "536870912\n").unwrap();
        assert_eq!(
            cgroup_limit(hybrid, &root),
            Some(512 << 20),
            "the lower one"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
