use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::Context as _;
use clap::Parser as _;
use ebpf_proxy::{
    cli::{Cli, Command},
    config::{Config, Overrides, Source, TlsSource},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not for journald or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Some(Command::Config { preset }) => {
            print!("{}", preset.text());
            Ok(())
        }
        Some(Command::Check { config }) => check(Source::File(config)).await,
        Some(Command::Flows) => ebpf_proxy::flows::table()
            .map(|text| print!("{text}"))
            .map_err(Into::into),
        Some(Command::Status { metrics }) => ebpf_proxy::metrics::status(metrics)
            .await
            .map(|text| print!("{text}"))
            .map_err(Into::into),
        None => {
            let source = cli.run.source();
            let overrides = cli.run.overrides;
            match Config::load(&source, &overrides) {
                Ok(config) => serve(config, source, overrides).await,
                Err(e) => Err(e.into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `ebpf-proxy check`: everything that can be verified without binding or connecting. A
/// name that does not resolve is a warning, not an error: the relay starts without it and
/// keeps asking.
async fn check(source: Source) -> anyhow::Result<()> {
    let config = Config::load(&source, &Overrides::default())?;
    match &config.tls {
        TlsSource::Files { cert, key } => ebpf_proxy::tls::check_files(cert, key)?,
        TlsSource::Acme(acme) => ebpf_proxy::acme::check(acme)?,
        TlsSource::SelfSigned => {}
    }
    let Source::File(path) = source else {
        unreachable!("check reads files")
    };
    for pool in &config.pools {
        for upstream in &pool.servers {
            let target = (upstream.host.as_str(), upstream.port);
            match tokio::time::timeout(RESOLVE_DEADLINE, tokio::net::lookup_host(target)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => eprintln!(
                    "warning: pool {}: upstream {upstream} does not resolve now ({e}); the relay starts anyway and keeps asking",
                    pool.name
                ),
                Err(_) => eprintln!(
                    "warning: pool {}: upstream {upstream} did not resolve within {RESOLVE_DEADLINE:?}; the relay starts anyway and keeps asking",
                    pool.name
                ),
            }
        }
    }
    println!(
        "{}: ok ({} listeners, {} pools)",
        path.display(),
        config.listeners.len(),
        config.pools.len()
    );
    Ok(())
}

/// How long `check` waits for each name.
const RESOLVE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs the relay: SIGHUP reloads, SIGTERM drains, SIGINT (or a second signal) stops.
async fn serve(config: Config, source: Source, overrides: Overrides) -> anyhow::Result<()> {
    let (tx, signals) = tokio::sync::mpsc::unbounded_channel();
    for (kind, name, meaning) in [
        (SignalKind::hangup(), "SIGHUP", ebpf_proxy::Signal::Reload),
        (
            SignalKind::terminate(),
            "SIGTERM",
            ebpf_proxy::Signal::Drain,
        ),
        (SignalKind::interrupt(), "SIGINT", ebpf_proxy::Signal::Stop),
    ] {
        let mut stream = signal(kind).with_context(|| format!("installing the {name} handler"))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                tracing::info!("{name} received");
                if tx.send(meaning).is_err() {
                    return;
                }
            }
        });
    }
    let load = move || Config::load(&source, &overrides);
    ebpf_proxy::run(config, load, signals).await?;
    Ok(())
}
