//! Helpers for the integration tests: start the real `ebpf-proxy` binary, run real TCP
//! peers against it over loopback, and read what the kernel says about the process.

pub mod pebble;
pub mod peers;
pub mod proxied;
pub mod raw;
pub mod relay;
pub mod soak;

pub use peers::*;
pub use proxied::*;
pub use relay::*;

use std::{
    process::Command,
    time::{Duration, Instant},
};

/// Polls `condition` until it holds or `deadline` passes; returns whether it held.
pub fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fields of /proc/meminfo, in KiB.
pub fn meminfo_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("/proc/meminfo has no {field}"))
}

/// Memory the machine has available, in KiB: MemAvailable plus the free pages parked on the
/// per-CPU lists. MemFree leaves those out, and since Linux 6.7 the lists grow with the
/// rate pages are freed (up to `high_max` in /proc/zoneinfo), so MemAvailable alone moves
/// by hundreds of MiB as network traffic starts and stops.
pub fn available_kib() -> u64 {
    let zoneinfo = std::fs::read_to_string("/proc/zoneinfo").expect("/proc/zoneinfo");
    // SAFETY: sysconf has no preconditions.
    let page_kib = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64 / 1024;
    meminfo_kib("MemAvailable") + per_cpu_free_pages(&zoneinfo) * page_kib
}

/// The sum of the per-CPU page lists' `count:` lines in a /proc/zoneinfo text.
fn per_cpu_free_pages(zoneinfo: &str) -> u64 {
    zoneinfo
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("count:"))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// The send buffers (`ss` skmem `tb`, the kernel's sk_sndbuf) of the established sockets whose
/// local port is `port`: on a relay's listening port, the sockets it accepted.
pub fn send_buffers_on_port(port: u16) -> Vec<u64> {
    let output = std::process::Command::new("ss")
        .args([
            "-tmnH",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("running ss (iproute2)");
    String::from_utf8_lossy(&output.stdout)
        .split("tb")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// What the sockets with local port `local` or remote port `remote` hold, as the kernel
/// charges them (`ss` skmem: receive queue `r`, write queue `w`, backlog `bl`), in bytes:
/// on a relay's listening port and its upstream's port, the relay's own sockets.
pub fn socket_memory_on_ports(local: u16, remote: u16) -> u64 {
    let output = std::process::Command::new("ss")
        .args([
            "-tmnHa",
            "sport",
            "=",
            &format!(":{local}"),
            "or",
            "dport",
            "=",
            &format!(":{remote}"),
        ])
        .output()
        .expect("running ss (iproute2)");
    String::from_utf8_lossy(&output.stdout)
        .split("skmem:(")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .flat_map(|fields| fields.split(','))
        .filter_map(|field| {
            let digits_at = field.find(|c: char| c.is_ascii_digit())?;
            let (name, value) = field.split_at(digits_at);
            matches!(name, "r" | "w" | "bl").then(|| value.parse::<u64>().ok())?
        })
        .sum()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The eBPF program and map ids process `pid` holds descriptors for.
pub fn bpf_ids(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut programs, mut maps) = (Vec::new(), Vec::new());
    let fdinfo = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("relay fdinfo");
    for entry in fdinfo.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            let id = |prefix| line.strip_prefix(prefix)?.trim().parse::<u32>().ok();
            programs.extend(id("prog_id:"));
            maps.extend(id("map_id:"));
        }
    }
    // The same object can sit behind more than one descriptor.
    for ids in [&mut programs, &mut maps] {
        ids.sort_unstable();
        ids.dedup();
    }
    (programs, maps)
}

/// The name `bpftool OBJECT show id ID` gives, or None once the object is gone.
pub fn bpftool_name(object: &str, id: u32) -> Option<String> {
    let output = Command::new("bpftool")
        .args([object, "show", "id", &id.to_string()])
        .output()
        .expect("bpftool is needed for this test (apt-get install bpftool)");
    if !output.status.success() {
        return None;
    }
    let listing = String::from_utf8_lossy(&output.stdout).into_owned();
    let after = listing.split_once(" name ")?.1;
    Some(after.split_whitespace().next()?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::per_cpu_free_pages;

    #[test]
    fn per_cpu_free_pages_sums_every_zone_and_cpu() {
        let zoneinfo = "Node 0, zone   Normal\n  pages free     5000\n  pagesets\n    cpu: 0\n              count:    9989\n              high:     10207\n    cpu: 1\n              count:    11\n  node_unreclaimable:  0\nNode 0, zone    DMA32\n    cpu: 0\n              count: 2\n";
        assert_eq!(per_cpu_free_pages(zoneinfo), 10002);
    }
}
