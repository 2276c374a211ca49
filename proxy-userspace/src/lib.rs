//! ebpf-proxy: a TCP relay whose bytes are forwarded inside the kernel by an sk_skb eBPF
//! program, with a tokio control plane that only sets connections up and tears them down.

pub mod config;
pub mod dataplane;
pub mod kernel;
mod server;
mod sys;

pub use server::{RelayError, choose_data_plane, run};
