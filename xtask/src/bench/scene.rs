//! Where the bench's processes run: over loopback or in three network namespaces joined by
//! veth pairs, with the endpoints on different CPUs or everything on one.

use std::{
    ffi::{OsStr, OsString},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Loopback,
    /// client | relay | server, each in its own namespace; the relay's namespace routes
    /// between the two veth pairs so that direct connections work too.
    Namespaces,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Client on CPU 0, server on CPU 1, the relay wherever the scheduler puts it.
    Spread,
    /// Client, relay and server all on CPU 0.
    OneCpu,
}

#[derive(Clone, Copy)]
pub enum Role {
    Client,
    Relay,
    Server,
}

const CLIENT_NS: &str = "epb-client";
const RELAY_NS: &str = "epb-relay";
const SERVER_NS: &str = "epb-server";

impl Topology {
    pub const ALL: [Self; 2] = [Self::Loopback, Self::Namespaces];

    pub fn name(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Namespaces => "namespaces",
        }
    }

    /// The address relays listen on, as the client reaches it.
    pub fn relay_ip(self) -> &'static str {
        match self {
            Self::Loopback => "127.0.0.1",
            Self::Namespaces => "10.77.1.2",
        }
    }

    pub fn server_ip(self) -> &'static str {
        match self {
            Self::Loopback => "127.0.0.1",
            Self::Namespaces => "10.77.2.2",
        }
    }

    fn namespace(self, role: Role) -> Option<&'static str> {
        match (self, role) {
            (Self::Loopback, _) => None,
            (Self::Namespaces, Role::Client) => Some(CLIENT_NS),
            (Self::Namespaces, Role::Relay) => Some(RELAY_NS),
            (Self::Namespaces, Role::Server) => Some(SERVER_NS),
        }
    }

    /// Creates what the topology needs; dropping the guard removes it.
    pub fn set_up(self) -> Result<Option<Namespaces>> {
        match self {
            Self::Loopback => Ok(None),
            Self::Namespaces => Namespaces::create().map(Some),
        }
    }
}

impl Placement {
    pub const ALL: [Self; 2] = [Self::Spread, Self::OneCpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Spread => "endpoints on different CPUs",
            Self::OneCpu => "all on one CPU",
        }
    }

    pub fn short_name(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::OneCpu => "one-cpu",
        }
    }

    fn cpu(self, role: Role) -> Option<u32> {
        match (self, role) {
            (Self::Spread, Role::Client) | (Self::OneCpu, _) => Some(0),
            (Self::Spread, Role::Server) => Some(1),
            (Self::Spread, Role::Relay) => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Scene {
    pub topology: Topology,
    pub placement: Placement,
}

impl Scene {
    /// Every topology with every placement, in the report's order.
    pub fn all() -> Vec<Self> {
        Topology::ALL
            .into_iter()
            .flat_map(|topology| {
                Placement::ALL.map(|placement| Self {
                    topology,
                    placement,
                })
            })
            .collect()
    }

    /// How `--scenes` names it: `loopback-spread`, `namespaces-one-cpu`, ...
    pub fn key(&self) -> String {
        format!("{}-{}", self.topology.name(), self.placement.short_name())
    }

    /// `program` as `role` runs in this scene: in its namespace, on its CPU. Both wrappers
    /// exec, so the child's pid is the program's.
    pub fn command(&self, role: Role, program: impl AsRef<OsStr>) -> Command {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = self.topology.namespace(role) {
            argv.extend(["ip", "netns", "exec", ns].map(OsString::from));
        }
        if let Some(cpu) = self.placement.cpu(role) {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
        }
        argv.push(program.as_ref().to_owned());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command
    }

    pub fn label(&self) -> String {
        format!("{}, {}", self.topology.name(), self.placement.name())
    }
}

/// The three namespaces and their veth pairs: 10.77.1.0/24 between client and relay,
/// 10.77.2.0/24 between relay and server. Removed on drop.
pub struct Namespaces(());

impl Namespaces {
    fn create() -> Result<Self> {
        remove_namespaces();
        let guard = Self(());
        for ns in [CLIENT_NS, RELAY_NS, SERVER_NS] {
            ip(&format!("netns add {ns}"))?;
            ip(&format!("-n {ns} link set lo up"))?;
        }
        for (end, relay_end, ns) in [
            ("epb-c", "epb-rc", CLIENT_NS),
            ("epb-s", "epb-rs", SERVER_NS),
        ] {
            ip(&format!(
                "link add {end} netns {ns} type veth peer name {relay_end} netns {RELAY_NS}"
            ))?;
            ip(&format!("-n {ns} link set {end} up"))?;
            ip(&format!("-n {RELAY_NS} link set {relay_end} up"))?;
        }
        ip(&format!("-n {CLIENT_NS} addr add 10.77.1.1/24 dev epb-c"))?;
        ip(&format!("-n {RELAY_NS} addr add 10.77.1.2/24 dev epb-rc"))?;
        ip(&format!("-n {RELAY_NS} addr add 10.77.2.1/24 dev epb-rs"))?;
        ip(&format!("-n {SERVER_NS} addr add 10.77.2.2/24 dev epb-s"))?;
        ip(&format!("-n {CLIENT_NS} route add default via 10.77.1.2"))?;
        ip(&format!("-n {SERVER_NS} route add default via 10.77.2.1"))?;
        sysctl(RELAY_NS, "net.ipv4.ip_forward=1")?;
        // The connection-rate run opens tens of thousands of short connections: let the
        // ends that close first reuse their TIME_WAIT ports, as loopback does by default.
        for ns in [CLIENT_NS, RELAY_NS] {
            sysctl(ns, "net.ipv4.tcp_tw_reuse=1")?;
            sysctl(ns, "net.ipv4.ip_local_port_range=1024 65000")?;
        }
        Ok(guard)
    }

    /// With `spread`, RPS on the relay namespace's veth ends: their packets are received on
    /// a CPU picked by flow hash, as a multi-queue NIC's RSS spreads them, instead of on
    /// the CPU that sent them (what veth does by default, and where in-kernel forwarding
    /// then runs). Without, RPS off.
    pub fn steer_receive(&self, spread: bool) -> Result<()> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mask = if spread { cpu_mask(cpus) } else { "0".into() };
        for device in ["epb-rc", "epb-rs"] {
            let path = format!("/sys/class/net/{device}/queues/rx-0/rps_cpus");
            // `ip netns exec` mounts the namespace's own /sys, where its devices are.
            let status = Command::new("ip")
                .args(["netns", "exec", RELAY_NS, "sh", "-c"])
                .arg(format!("echo {mask} > {path}"))
                .status()
                .context("running sh")?;
            if !status.success() {
                bail!("setting {path} in {RELAY_NS} failed");
            }
        }
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        remove_namespaces();
    }
}

fn remove_namespaces() {
    for ns in [CLIENT_NS, RELAY_NS, SERVER_NS] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The sysfs bitmap of CPUs 0..cpus: hex, 32 CPUs per comma-separated group.
fn cpu_mask(cpus: usize) -> String {
    let mut groups: Vec<String> = (0..cpus.div_ceil(32))
        .map(|group| {
            let bits = (cpus - group * 32).min(32);
            format!("{:x}", u32::MAX >> (32 - bits))
        })
        .collect();
    groups.reverse();
    groups.join(",")
}

/// Runs `ip` with the words of `args`.
fn ip(args: &str) -> Result<()> {
    let status = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .context("running ip (apt-get install iproute2)")?;
    if !status.success() {
        bail!("ip {args} failed");
    }
    Ok(())
}

fn sysctl(ns: &str, setting: &str) -> Result<()> {
    let status = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-q", "-w", setting])
        .status()
        .context("running sysctl")?;
    if !status.success() {
        bail!("sysctl {setting} in {ns} failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cpu_mask;

    #[test]
    fn the_cpu_mask_has_one_bit_per_cpu_in_32_bit_groups() {
        assert_eq!(cpu_mask(1), "1");
        assert_eq!(cpu_mask(2), "3");
        assert_eq!(cpu_mask(32), "ffffffff");
        assert_eq!(cpu_mask(36), "f,ffffffff");
    }
}
