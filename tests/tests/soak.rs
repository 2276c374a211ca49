//! The soak, short form (the long one is `cargo xtask soak`): random sizes, half-closes in
//! both orders, resets from both sides; nothing lost or changed, nothing left behind.

use std::time::Duration;

use integration_tests::{
    Plane, Relay, bpf_required,
    soak::{self, Plan, SoakUpstream},
    wait_until,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SOAK_CONNECTIONS, SOAK_MINUTES and SOAK_MAX_MIB override the short defaults;
/// SOAK_BACKLOG_LIMIT runs the relay with that per-flow backlog limit, so that flows detach
/// from the kernel and resume, and then requires that they did.
pub fn soak_keeps_every_byte_and_leaks_nothing(plane: Plane) {
    let plan = Plan {
        connections: env_or("SOAK_CONNECTIONS", 400),
        duration: Duration::from_secs_f64(env_or("SOAK_MINUTES", 0.15) * 60.0),
        concurrency: env_or("SOAK_CONCURRENCY", 24),
        max_size: env_or("SOAK_MAX_MIB", 1) << 20,
        seed: env_or("SOAK_SEED", 20261122),
    };
    let backlog_limit: Option<u64> = std::env::var("SOAK_BACKLOG_LIMIT")
        .ok()
        .map(|v| v.parse().expect("SOAK_BACKLOG_LIMIT is a number of bytes"));
    let upstream = SoakUpstream::start();
    let upstream_addr = upstream.addr.to_string();
    let relay = match backlog_limit {
        None => Relay::start(plane, &upstream_addr, &["--max-connections", "20000"]),
        Some(bytes) => Relay::start_via(
            plane,
            &["env", &format!("EBPF_PROXY_BACKLOG_LIMIT={bytes}")],
            &upstream_addr,
            &["--max-connections", "20000"],
        ),
    };
    let Some(mut relay) = relay else {
        return;
    };
    let before = (relay.open_fds(), relay.status().tasks, relay.rss_kib());
    let report = soak::run(plan, relay.addr, &upstream);
    eprintln!(
        "{plane:?} soak: {} connections ({} client-first, {} upstream-first, {} both at once), {} client resets, {} upstream deaths, {:.1} MiB verified, {} broken",
        report.connections,
        report.by_order[0],
        report.by_order[1],
        report.by_order[2],
        report.client_resets,
        report.upstream_deaths,
        report.bytes_verified as f64 / f64::from(1 << 20),
        report.broken.len()
    );
    assert!(report.broken.is_empty(), "{plane:?}: {:#?}", report.broken);
    // Nothing left behind: connections, map entries, tasks, descriptors.
    assert!(
        wait_until(Duration::from_secs(10), || relay.status().connections == 0),
        "{plane:?}: connections left open"
    );
    let status = relay.status();
    if plane.uses_kernel() {
        eprintln!(
            "{plane:?} soak: directions detached from the kernel {} times, resumed {} times",
            status.detached.unwrap_or(0),
            status.resumed.unwrap_or(0)
        );
    }
    if bpf_required() && plane.uses_kernel() {
        if backlog_limit.is_some() {
            assert!(
                status.detached > Some(0) && status.resumed > Some(0),
                "the lowered backlog limit made no flow detach and resume: {status:?}"
            );
        }
        assert_eq!(
            status.sockets_in_map,
            Some(0),
            "sockhash entries left behind"
        );
        assert_eq!(status.flow_records, Some(0), "flow records left behind");
    }
    assert!(
        status.tasks <= before.1,
        "tasks grew from {} to {}",
        before.1,
        status.tasks
    );
    assert!(
        relay.open_fds() <= before.0,
        "descriptors grew from {} to {}",
        before.0,
        relay.open_fds()
    );
    let rss = relay.rss_kib();
    eprintln!(
        "{plane:?} soak: relay RSS {} KiB before, {rss} KiB after",
        before.2
    );
    assert!(
        rss < before.2 + 64 * 1024,
        "relay RSS grew from {} KiB to {rss} KiB",
        before.2
    );
}
