//! `ebpf-proxy flows`: the kernel-mode connections of every relay on this machine, read
//! from the program's maps by name (RELAY_FLOWS, RELAY_CONTROLS) as bpftool does, without
//! the relay's help. The two flows of a connection are paired by the peer cookie each
//! control record names; the client's flow is the one that carries the listener's port.
//! Connections relayed in userspace (TLS, auto's warm-up, splice, copy) are not in the maps.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData, MapError, loaded_maps};
use proxy_common::{CONTROLS_MAP, FLOWS_MAP, FlowControl, FlowState};

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("cannot read the kernel's maps ({0}): run as root, or with CAP_BPF")]
    Maps(#[from] MapError),
    #[error("no relay runs in kernel mode here: no map named {FLOWS_MAP}")]
    NoRelay,
}

/// One direction, as the program and userspace recorded it.
#[derive(Clone, Copy)]
struct Flow {
    state: FlowState,
    control: FlowControl,
}

/// Reads every relay's flow records and lays them out, a connection a row.
pub fn table() -> Result<String, FlowsError> {
    let (states, controls) = (
        read::<FlowState>(FLOWS_MAP)?,
        read::<FlowControl>(CONTROLS_MAP)?,
    );
    let flows: BTreeMap<u64, Flow> = states
        .into_iter()
        .filter_map(|(cookie, state)| {
            let control = *controls.get(&cookie)?;
            Some((cookie, Flow { state, control }))
        })
        .collect();
    Ok(render(&flows, sys::monotonic_coarse_ns()))
}

/// Every entry of every map named `name`, by key; NoRelay when there is no such map.
fn read<V: aya::Pod>(name: &str) -> Result<BTreeMap<u64, V>, FlowsError> {
    let mut entries = BTreeMap::new();
    let mut found = false;
    for info in loaded_maps() {
        let info = info?;
        if info.name_as_str() != Some(name) {
            continue;
        }
        found = true;
        let map = Map::from_map_data(MapData::from_id(info.id())?)?;
        let map: HashMap<_, u64, V> = HashMap::try_from(map)?;
        // An entry deleted while we iterate ends the walk early; what was read stands.
        entries.extend(map.iter().map_while(Result::ok));
    }
    if found {
        Ok(entries)
    } else {
        Err(FlowsError::NoRelay)
    }
}

fn render(flows: &BTreeMap<u64, Flow>, now_ns: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:>12} {:>12} {:>9}  {:<17} backlog bound of budget",
        "listener", "client", "to upstream", "to client", "idle", "state"
    );
    let mut rows = 0;
    for (cookie, up) in flows.iter().filter(|(_, f)| f.control.listener_port != 0) {
        let down = flows.get(&up.control.peer_cookie);
        let moved = |flow: Option<&Flow>| flow.map_or(0, |f| f.state.redirected_bytes);
        let last_active = down.map_or(up.state.last_active_ns, |d| {
            d.state.last_active_ns.max(up.state.last_active_ns)
        });
        let idle = Duration::from_nanos(now_ns.saturating_sub(last_active));
        let state = |flow: Option<&Flow>| match flow {
            None => "gone",
            Some(f) if f.control.outside_map != 0 => "userspace",
            Some(f) if f.state.detached != 0 => "detached",
            Some(_) => "kernel",
        };
        // The bound, and the budget it is checked against (0: the relay's global limit).
        let bound = |flow: Option<&Flow>| {
            flow.map_or_else(String::new, |f| {
                let bound = f
                    .state
                    .redirected_bytes
                    .saturating_sub(f.control.checkpoint_bytes);
                format!("{bound} of {}", f.control.backlog_limit)
            })
        };
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:>12} {:>12} {:>8.1}s  {:<17} {} / {}",
            up.control.listener_port,
            client(&up.control).unwrap_or_else(|| format!("(hidden) #{cookie}")),
            moved(Some(up)),
            moved(down),
            idle.as_secs_f64(),
            format!("{} / {}", state(Some(up)), state(down)),
            bound(Some(up)),
            bound(down),
        );
        rows += 1;
    }
    let _ = writeln!(
        out,
        "{rows} kernel-mode connection(s); bytes as the program redirected them; the client shows only under --log-clients"
    );
    out
}

/// The client's address, when the relay recorded it (`--log-clients`).
fn client(control: &FlowControl) -> Option<String> {
    if control.client_port == 0 {
        return None;
    }
    let ip = Ipv6Addr::from(control.client_ip);
    let ip = ip.to_ipv4_mapped().map_or(ip.into(), Into::into);
    Some(SocketAddr::new(ip, control.client_port).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(redirected: u64, listener_port: u16, peer_cookie: u64) -> Flow {
        Flow {
            state: FlowState {
                redirected_bytes: redirected,
                last_active_ns: 1_000_000_000,
                ..FlowState::default()
            },
            control: FlowControl {
                peer_cookie,
                listener_port,
                checkpoint_bytes: redirected / 2,
                backlog_limit: 1 << 20,
                ..FlowControl::default()
            },
        }
    }

    #[test]
    fn a_connection_is_one_row_with_both_directions() {
        let mut up = flow(100, 5222, 8);
        up.control.client_port = 40001;
        up.control.client_ip = std::net::Ipv4Addr::new(192, 0, 2, 7)
            .to_ipv6_mapped()
            .octets();
        let mut down = flow(3000, 0, 7);
        down.state.detached = 1;
        let flows = BTreeMap::from([(7, up), (8, down)]);
        let mut outside = up;
        outside.control.outside_map = 1;
        let table = render(&BTreeMap::from([(7, outside), (8, down)]), 3_500_000_000);
        assert!(table.contains("userspace / detached"), "{table}");
        let table = render(&flows, 3_500_000_000);
        let row = table.lines().nth(1).unwrap();
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            fields,
            [
                "5222",
                "192.0.2.7:40001",
                "100",
                "3000",
                "2.5s",
                "kernel",
                "/",
                "detached",
                "50",
                "of",
                "1048576",
                "/",
                "1500",
                "of",
                "1048576"
            ],
            "{table}"
        );
        assert!(table.contains("1 kernel-mode connection(s)"), "{table}");
    }

    #[test]
    fn a_hidden_client_shows_no_address() {
        let flows = BTreeMap::from([(7, flow(1, 443, 8)), (8, flow(2, 0, 7))]);
        let table = render(&flows, 1_000_000_000);
        assert!(table.contains("(hidden) #7"), "{table}");
    }
}
