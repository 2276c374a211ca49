//! The maps every kernel-mode connection shares, used without a lock. aya's writes take
//! `&mut self`, which made every connection task queue behind one mutex held across each
//! bpf(2) call; the kernel needs no such lock. So lookups go through aya (`&self`), and
//! writes through bpf(2) on the maps' descriptors, a connection's two flow entries in one
//! batch call per map.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::maps::{HashMap, IterableMap as _, MapData, SockHash};
use proxy_common::{FlowControl, FlowState};

// Commands of bpf(2), from include/uapi/linux/bpf.h. The batch ones are Linux 5.6+, older
// than the verdict-only sk_skb programs this plane needs (5.13).
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_MAP_UPDATE_BATCH: libc::c_int = 26;
const BPF_MAP_DELETE_BATCH: libc::c_int = 27;

pub struct FlowMaps {
    sockets: SockHash<MapData, u64>,
    flows: HashMap<MapData, u64, FlowState>,
    controls: HashMap<MapData, u64, FlowControl>,
}

impl FlowMaps {
    pub fn new(
        sockets: SockHash<MapData, u64>,
        flows: HashMap<MapData, u64, FlowState>,
        controls: HashMap<MapData, u64, FlowControl>,
    ) -> Self {
        Self {
            sockets,
            flows,
            controls,
        }
    }

    /// The program's record of the flow reading from `cookie`'s socket; None once removed.
    pub fn state(&self, cookie: u64) -> Option<FlowState> {
        self.flows.get(&cookie, 0).ok()
    }

    /// How many bytes from `cookie`'s socket may still wait in the kernel outside any
    /// buffer: the program's bound on its redirect queue (see FlowControl), plus what a
    /// detached flow kept and userspace has not moved (they may wait in the psock's queue);
    /// 0 without a record.
    pub fn backlog_bound(&self, cookie: u64) -> u64 {
        let (Some(state), Ok(control)) = (self.state(cookie), self.controls.get(&cookie, 0)) else {
            return 0;
        };
        let redirected = state
            .redirected_bytes
            .saturating_sub(control.checkpoint_bytes);
        redirected + state.passed_bytes.saturating_sub(control.passed_moved)
    }

    /// Creates both flows' records of a connection: its state and control per socket.
    pub fn install(
        &self,
        cookies: [u64; 2],
        flows: [(FlowState, FlowControl); 2],
    ) -> io::Result<()> {
        let states = flows.map(|(state, _)| state);
        let controls = flows.map(|(_, control)| control);
        update_batch(map_fd(&self.flows), &cookies, &states)
            .and_then(|()| update_batch(map_fd(&self.controls), &cookies, &controls))
            .map_err(name_full)
    }

    /// Replaces what userspace tells the program about the flow reading from `cookie`.
    pub fn publish(&self, cookie: u64, control: &FlowControl) -> io::Result<()> {
        update(map_fd(&self.controls), &cookie, control)
    }

    pub fn insert_socket(&self, cookie: u64, socket: BorrowedFd<'_>) -> io::Result<()> {
        let fd: u32 = socket.as_raw_fd() as u32;
        update(self.sockets.fd().as_fd(), &cookie, &fd).map_err(name_full)
    }

    /// Takes a socket that stays open out of the sockhash (closing one does it by itself).
    pub fn remove_socket(&self, cookie: u64) -> io::Result<()> {
        delete(self.sockets.fd().as_fd(), &cookie)
    }

    /// Deletes the flow records of `cookies`, whichever of them exist.
    pub fn remove_flows(&self, cookies: &[u64]) -> io::Result<()> {
        delete_batch(map_fd(&self.flows), cookies)?;
        delete_batch(map_fd(&self.controls), cookies)
    }

    /// Entries in the sockhash: what leak checks compare against 0.
    pub fn socket_entries(&self) -> usize {
        self.sockets.keys().filter(Result::is_ok).count()
    }

    /// Flow records (states and controls) in the maps: what leak checks compare against 0.
    pub fn flow_records(&self) -> usize {
        self.flows.keys().filter(Result::is_ok).count()
            + self.controls.keys().filter(Result::is_ok).count()
    }
}

/// E2BIG is how a map says it is full; say it in words an operator can act on.
fn name_full(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::E2BIG) {
        io::Error::new(
            io::ErrorKind::StorageFull,
            "the kernel maps are full (they hold map_connections, --map-connections, connections)",
        )
    } else {
        e
    }
}

fn map_fd<V: aya::Pod>(map: &HashMap<MapData, u64, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// bpf_attr as the BPF_MAP_*_ELEM commands read it.
#[repr(C)]
struct ElementAttr {
    map_fd: u32,
    _padding: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// bpf_attr as the BPF_MAP_*_BATCH commands read it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<A>(command: libc::c_int, attr: &mut A) -> io::Result<()> {
    // SAFETY: attr is a bpf_attr prefix of its own size, valid for the call; the kernel reads
    // no further than that size and zero-fills the rest.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<A>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn element_attr<K>(map: BorrowedFd<'_>, key: &K, value: u64) -> ElementAttr {
    ElementAttr {
        map_fd: map.as_raw_fd() as u32,
        _padding: 0,
        key: std::ptr::from_ref(key) as u64,
        value,
        flags: 0,
    }
}

fn update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let value = std::ptr::from_ref(value) as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut element_attr(map, key, value))
}

fn delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    bpf(BPF_MAP_DELETE_ELEM, &mut element_attr(map, key, 0))
}

/// `values`: the address of as many values as there are keys, or 0 for commands without.
fn batch_attr(map: BorrowedFd<'_>, keys: &[u64], values: u64) -> BatchAttr {
    BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    }
}

fn update_batch<V>(map: BorrowedFd<'_>, keys: &[u64], values: &[V]) -> io::Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    let values = values.as_ptr() as u64;
    bpf(BPF_MAP_UPDATE_BATCH, &mut batch_attr(map, keys, values))
}

/// Deletes every key of `keys` that is in the map. The kernel stops a batch at the first
/// key it cannot delete, and reports how many it did before: a missing one is skipped.
fn delete_batch(map: BorrowedFd<'_>, mut keys: &[u64]) -> io::Result<()> {
    while !keys.is_empty() {
        let mut attr = batch_attr(map, keys, 0);
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT) && (attr.count as usize) < keys.len() =>
            {
                keys = &keys[attr.count as usize + 1..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_have_the_kernel_layout() {
        // include/uapi/linux/bpf.h: the element commands' struct ends at flags (32 bytes),
        // the batch commands' at flags (56 bytes), with count at 32 and map_fd at 36.
        assert_eq!(size_of::<ElementAttr>(), 32);
        assert_eq!(std::mem::offset_of!(ElementAttr, key), 8);
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
    }
}
