//! ebpf-proxy: a TCP relay whose bytes are forwarded inside the kernel by an sk_skb eBPF
//! program, with a tokio control plane that sets connections up (limits, PROXY headers,
//! TLS, upstream pools) and tears them down.

mod accept;
pub mod acme;
pub mod cli;
pub mod config;
pub mod counters;
pub mod dataplane;
pub mod flows;
pub mod kernel;
mod limits;
pub mod memory;
pub mod metrics;
mod notice;
pub mod opening;
mod peek;
pub mod proxy_protocol;
mod server;
mod sys;
pub mod tls;
pub mod transfer;
pub mod upstream;

pub use server::{RelayError, Signal, choose_data_plane, run};
