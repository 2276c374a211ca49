//! The command line: run the relay (the default), or `check`, `config`, `flows`, `status`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{Overrides, Preset, Source};

#[derive(Debug, Parser)]
#[command(
    name = "ebpf-proxy",
    version = env!("EBPF_PROXY_VERSION"),
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
    /// Print every kernel-mode connection on this machine, from the kernel's maps (as root).
    Flows,
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

    #[command(flatten)]
    pub overrides: Overrides,
}

impl RunArgs {
    /// The file or preset to read; the WhatsApp preset when nothing says otherwise.
    pub fn source(&self) -> Source {
        match (&self.config, self.preset) {
            (Some(path), _) => Source::File(path.clone()),
            (None, Some(preset)) => Source::Preset(preset),
            (None, None) if !self.overrides.forwards.is_empty() => Source::Forwards,
            (None, None) => Source::Preset(Preset::Whatsapp),
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
        assert!(parse(&["--max-connections", "0"]).is_err());
        assert!(parse(&["--tls-key", "k.pem"]).is_err());
        // A flag given is a value in the command line's layer; one not given is none.
        let cli = parse(&["--log-clients", "--idle-timeout", "7s"]).unwrap();
        let settings = &cli.run.overrides.settings;
        assert_eq!(settings.relay.log_clients, Some(true));
        assert_eq!(
            settings.timeouts.idle,
            Some(std::time::Duration::from_secs(7))
        );
        assert_eq!(
            parse(&[]).unwrap().run.overrides.settings.relay.log_clients,
            None
        );
    }
}
