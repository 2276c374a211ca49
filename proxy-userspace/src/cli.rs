//! The command line: run the relay (the default), or `check`, `config`, `status`.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{Forward, Overrides, Pin, Preset, Source, parse_duration},
    dataplane::DataPlaneChoice,
};

#[derive(Debug, Parser)]
#[command(
    name = "ebpf-proxy",
    version,
    about = "A TCP relay whose bytes move inside the kernel (sockmap + sk_skb eBPF).",
    after_help = "Without --forward or --config, runs the WhatsApp proxy preset.\n\
                  Examples:\n  ebpf-proxy --preset whatsapp\n  \
                  ebpf-proxy --config /etc/ebpf-proxy.toml\n  \
                  ebpf-proxy --forward 0.0.0.0:5222=upstream.example:5222",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file; errors name their line.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a preset as a configuration file to edit.
    Config {
        #[arg(long, value_enum, default_value_t = Preset::Whatsapp)]
        preset: Preset,
    },
    /// Print a running relay's connections, bytes and upstream health (from its metrics).
    Status {
        /// The relay's metrics address.
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:8199")]
        metrics: SocketAddr,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (see `ebpf-proxy config`).
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub config: Option<PathBuf>,

    /// Serve a built-in port table.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,

    /// Also listen on LISTEN (IP:PORT or [IPv6]:PORT) and relay to UPSTREAM (HOST:PORT).
    /// Repeatable.
    #[arg(long = "forward", value_name = "LISTEN=UPSTREAM")]
    pub forwards: Vec<Forward>,

    /// The address every configured listener binds to, instead of the file's.
    #[arg(long, value_name = "IP")]
    pub bind: Option<IpAddr>,

    /// Resolve HOST to IP without DNS. Repeatable (several IPs for one host are a list).
    #[arg(long = "resolve", value_name = "HOST=IP")]
    pub pins: Vec<Pin>,

    /// How bytes move: kernel (eBPF sockmap), splice, copy, or auto (kernel when the eBPF
    /// program loads, otherwise splice).
    #[arg(long, value_enum)]
    pub dataplane: Option<DataPlaneChoice>,

    /// Time the upstream has to accept (e.g. 5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Time a client has to finish its PROXY header and TLS handshake.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,

    /// Close a connection after this long without bytes in either direction.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Close a connection this long after one side finished sending.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub half_closed_timeout: Option<Duration>,

    /// After SIGTERM, how long open connections may take to finish (SIGINT closes at once).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Connections relayed at once; further clients wait in the listen backlog.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: Option<u32>,

    /// Connections the kernel maps hold (default: --max-connections); beyond it,
    /// connections are relayed in userspace and counted as fallbacks.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub map_connections: Option<u32>,

    /// Concurrent connections per client IP (IPv6: per /64); 0 for no limit.
    #[arg(long, value_name = "N")]
    pub per_ip_connections: Option<u32>,

    /// New connections per second per client IP (IPv6: per /64); 0 for no limit.
    #[arg(long, value_name = "N")]
    pub per_ip_rate: Option<u32>,

    /// Serve Prometheus metrics at http://IP:PORT/metrics (keep it on loopback).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<SocketAddr>,

    /// PEM certificate chain for TLS listeners (default: self-signed, made at start).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Write client addresses in logs (off by default, for the users' privacy).
    #[arg(long)]
    pub log_clients: bool,
}

impl RunArgs {
    /// The file or preset to read; the WhatsApp preset when nothing says otherwise.
    pub fn source(&self) -> Source {
        match (&self.config, self.preset) {
            (Some(path), _) => Source::File(path.clone()),
            (None, Some(preset)) => Source::Preset(preset),
            (None, None) if !self.forwards.is_empty() => Source::Forwards,
            (None, None) => Source::Preset(Preset::Whatsapp),
        }
    }

    pub fn overrides(&self) -> Overrides {
        Overrides {
            forwards: self.forwards.clone(),
            bind: self.bind,
            pins: self.pins.clone(),
            dataplane: self.dataplane,
            log_clients: self.log_clients,
            map_connections: self.map_connections,
            max_connections: self.max_connections,
            per_ip_connections: self.per_ip_connections,
            per_ip_rate: self.per_ip_rate,
            connect_timeout: self.connect_timeout,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            half_closed_timeout: self.half_closed_timeout,
            drain_timeout: self.drain_timeout,
            metrics: self.metrics,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_defaults() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["ebpf-proxy"], args].concat());
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.run.source(), Source::Preset(Preset::Whatsapp));
        let cli = parse(&["--forward", "127.0.0.1:1=a:2"]).unwrap();
        assert_eq!(cli.run.source(), Source::Forwards);
        let cli = parse(&["--preset", "whatsapp", "--forward", "127.0.0.1:1=a:2"]).unwrap();
        assert_eq!(cli.run.source(), Source::Preset(Preset::Whatsapp));
        let cli = parse(&["--config", "f.toml"]).unwrap();
        assert_eq!(cli.run.source(), Source::File("f.toml".into()));
        assert!(parse(&["--config", "f", "--preset", "whatsapp"]).is_err());
        assert!(parse(&["--dataplane", "magic"]).is_err());
        assert!(parse(&["--connect-timeout", "0"]).is_err());
        assert!(parse(&["--tls-cert", "c.pem"]).is_err());
        assert!(matches!(
            parse(&["check", "--config", "f"]).unwrap().command,
            Some(Command::Check { .. })
        ));
        assert!(parse(&["check", "--config", "f", "--forward", "x"]).is_err());
    }
}
