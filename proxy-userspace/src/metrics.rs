//! Counters per listener and upstream, served as Prometheus text on a loopback HTTP
//! endpoint, and read back by `ebpf-proxy status` for a person.

use std::{
    fmt::Write as _,
    io,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tracing::debug;

use crate::{
    accept::AcceptErrors,
    counters::{ListenerMetrics, Refusal, Timeout},
    dataplane::DataPlane,
    memory::MemoryAccount,
    tls::{ServerTls, date},
    upstream::Pool,
};

/// Everything /metrics shows; the lists change on reload.
pub struct Metrics {
    pub listeners: RwLock<Vec<Arc<ListenerMetrics>>>,
    pub pools: RwLock<Vec<Arc<Pool>>>,
    pub plane: DataPlane,
    pub memory: Arc<MemoryAccount>,
    /// What the TLS listeners serve; None without any.
    pub tls: RwLock<Option<Arc<ServerTls>>>,
}

impl Metrics {
    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pools = self.pools.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = String::new();
        let mut family =
            |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
                let _ = writeln!(
                    out,
                    "# HELP ebpf_proxy_{name} {help}\n# TYPE ebpf_proxy_{name} {kind}"
                );
                for (labels, value) in rows {
                    let _ = writeln!(out, "ebpf_proxy_{name}{{{labels}}} {value}");
                }
            };
        let listener = |l: &ListenerMetrics| format!("listener=\"{}\"", escape(&l.name));
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            "connections_open",
            "gauge",
            "Connections being relayed.",
            &mut listeners.iter().map(|l| (listener(l), load(&l.open))),
        );
        family(
            "connections_total",
            "counter",
            "Connections accepted.",
            &mut listeners.iter().map(|l| (listener(l), load(&l.accepted))),
        );
        family(
            "connections_refused_total",
            "counter",
            "Connections closed before relaying, by reason.",
            &mut listeners.iter().flat_map(|l| {
                Refusal::ALL.iter().map(move |r| {
                    (
                        format!("{},reason=\"{}\"", listener(l), r.label()),
                        l.refused(*r),
                    )
                })
            }),
        );
        family(
            "bytes_total",
            "counter",
            "Bytes relayed, by direction (kernel-mode bytes as counted by the eBPF program).",
            &mut listeners.iter().flat_map(|l| {
                [
                    ("client_to_upstream", load(&l.bytes_to_upstream)),
                    ("upstream_to_client", load(&l.bytes_to_client)),
                ]
                .into_iter()
                .map(move |(d, v)| (format!("{},direction=\"{d}\"", listener(l)), v))
            }),
        );
        family(
            "connections_shed_total",
            "counter",
            "Connections reset because the relay held more memory than its limit, by reason.",
            &mut listeners
                .iter()
                .map(|l| (format!("{},reason=\"memory\"", listener(l)), l.shed())),
        );
        family(
            "connections_timed_out_total",
            "counter",
            "Connections the relay closed because a timeout expired, by timeout.",
            &mut listeners.iter().flat_map(|l| {
                Timeout::ALL.iter().map(move |t| {
                    (
                        format!("{},reason=\"{}\"", listener(l), t.label()),
                        l.timed_out(*t),
                    )
                })
            }),
        );
        family(
            "fallback_total",
            "counter",
            "Connections relayed to the listener's fallback: their first bytes were not what the listener expects.",
            &mut listeners
                .iter()
                .map(|l| (listener(l), l.sent_to_fallback())),
        );
        family(
            "memory_held_bytes",
            "gauge",
            "What the relay holds for its connections, as last measured: socket queues, the kernel's redirect backlogs, userspace buffers.",
            &mut std::iter::once((String::new(), self.memory.held())),
        );
        family(
            "memory_limit_bytes",
            "gauge",
            "The memory limit for connections (--memory-limit).",
            &mut std::iter::once((String::new(), self.memory.limit())),
        );
        let tls = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        let not_after = tls.and_then(|tls| tls.certificates().not_after());
        family(
            "tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the TLS listeners' certificate stops being valid, in seconds since 1970.",
            &mut not_after
                .map(|at| {
                    (
                        String::new(),
                        u64::try_from(at.unix_timestamp()).unwrap_or(0),
                    )
                })
                .into_iter(),
        );
        family(
            "upstream_up",
            "gauge",
            "1 when the upstream server answered its last health check or connect.",
            &mut pools.iter().flat_map(|pool| {
                pool.servers().iter().map(move |server| {
                    (
                        format!(
                            "pool=\"{}\",server=\"{}\"",
                            escape(&pool.name),
                            escape(&server.upstream.to_string())
                        ),
                        u64::from(server.is_up()),
                    )
                })
            }),
        );
        let (sockets, fallbacks, trimmed, promoted, detached, resumed, kept_resets) =
            match &self.plane {
                DataPlane::Kernel { plane, .. } => (
                    plane.socket_entries() as u64,
                    plane.fallbacks(),
                    plane.trimmed_bytes(),
                    plane.promotions(),
                    plane.detachments(),
                    plane.resumptions(),
                    plane.kept_resets(),
                ),
                _ => (0, 0, 0, 0, 0, 0, 0),
            };
        family(
            "dataplane_info",
            "gauge",
            "The data plane in use.",
            &mut std::iter::once((format!("dataplane=\"{}\"", self.plane.name()), 1)),
        );
        family(
            "kernel_sockets",
            "gauge",
            "Sockets in the eBPF sockhash.",
            &mut std::iter::once((String::new(), sockets)),
        );
        family(
            "kernel_fallbacks_total",
            "counter",
            "Connections relayed in userspace because the sockhash did not take them.",
            &mut std::iter::once((String::new(), fallbacks)),
        );
        family(
            "kernel_promoted_total",
            "counter",
            "Connections (auto) that moved into the kernel after their userspace warm-up.",
            &mut std::iter::once((String::new(), promoted)),
        );
        family(
            "kernel_detached_total",
            "counter",
            "Times a direction of a kernel-relayed connection left the kernel for userspace, because its destination fell too far behind or its socket left the map (closed connections).",
            &mut std::iter::once((String::new(), detached)),
        );
        family(
            "kernel_resumed_total",
            "counter",
            "Times a detached direction came back into the kernel, once userspace had moved every byte kept for it (closed connections).",
            &mut std::iter::once((String::new(), resumed)),
        );
        family(
            "kernel_kept_resets_total",
            "counter",
            "Connections reset because a detached direction had more than 64 MiB waiting in the kernel while its destination read nothing.",
            &mut std::iter::once((String::new(), kept_resets)),
        );
        family(
            "kernel_retransmitted_bytes_trimmed_total",
            "counter",
            "Bytes of retransmitted segments that repeated bytes already relayed, cut off by the program (closed connections).",
            &mut std::iter::once((String::new(), trimmed)),
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The most a request may be; anything longer is not a scrape.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers `GET /metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let mut errors = AcceptErrors::new("metrics endpoint".into());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                errors.succeeded();
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &metrics).await {
                        debug!("metrics request failed: {e}");
                    }
                });
            }
            Err(e) => errors.failed(&e).await,
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let head_complete = |r: &[u8]| r.windows(4).any(|w| w == b"\r\n\r\n");
    while !head_complete(&request) {
        let n = timeout(REQUEST_TIMEOUT, stream.read(&mut buf))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/metrics")) => {
            respond(&mut stream, "200 OK", &metrics.render()).await
        }
        (Some(b"GET"), _) => respond(&mut stream, "404 Not Found", "try /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the relay's metrics at {addr} ({source}): is it running with --metrics {addr}?"
    )]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("reading metrics from {addr}: {reason}")]
    Read { addr: SocketAddr, reason: String },
}

/// Fetches /metrics from a running relay and lays it out for a person.
pub async fn status(addr: SocketAddr) -> Result<String, StatusError> {
    let read_error = |reason: String| StatusError::Read { addr, reason };
    let fetch = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| StatusError::Connect { addr, source })?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| read_error(e.to_string()))?;
        Ok(response)
    };
    let response = timeout(REQUEST_TIMEOUT, fetch)
        .await
        .map_err(|_| read_error("no answer within 5 s".into()))??;
    let body = match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body,
        _ => return Err(read_error("not a metrics response".into())),
    };
    Ok(summarize(body))
}

/// One `name{labels} value` line, the name without its `ebpf_proxy_` prefix.
type Sample<'a> = (&'a str, Vec<(&'a str, &'a str)>, u64);

/// Parses `name{labels} value` lines.
fn samples(body: &str) -> Vec<Sample<'_>> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let labels = labels
                .trim_end_matches('}')
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            Some((
                name.strip_prefix("ebpf_proxy_")?,
                labels,
                value.parse().ok()?,
            ))
        })
        .collect()
}

fn summarize(body: &str) -> String {
    let samples = samples(body);
    let label = |labels: &[(&str, &str)], key: &str| {
        labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    let mut listeners: Vec<String> = Vec::new();
    for (name, labels, _) in &samples {
        let l = label(labels, "listener");
        if *name == "connections_total" && !listeners.contains(&l) {
            listeners.push(l);
        }
    }
    let value = |metric: &str, listener: &str, extra: Option<(&str, &str)>| -> u64 {
        samples
            .iter()
            .filter(|(n, labels, _)| {
                *n == metric
                    && label(labels, "listener") == listener
                    && extra.is_none_or(|(k, v)| label(labels, k) == v)
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    let mut out = String::new();
    if let Some((_, labels, _)) = samples.iter().find(|(n, _, _)| *n == "dataplane_info") {
        let sockets = value("kernel_sockets", "", None);
        let _ = writeln!(
            out,
            "data plane: {} (sockets in the kernel map: {sockets})",
            label(labels, "dataplane")
        );
    }
    if let Some((_, _, limit)) = samples.iter().find(|(n, _, _)| *n == "memory_limit_bytes") {
        let shed: u64 = samples
            .iter()
            .filter(|(n, _, _)| *n == "connections_shed_total")
            .map(|(_, _, v)| v)
            .sum();
        let _ = writeln!(
            out,
            "memory held for connections: {} of a {} limit ({shed} connections shed)",
            human_bytes(value("memory_held_bytes", "", None)),
            human_bytes(*limit)
        );
    }
    if let Some((_, _, expiry)) = samples
        .iter()
        .find(|(n, _, _)| *n == "tls_certificate_expiry_timestamp_seconds")
        && let Ok(at) = time::OffsetDateTime::from_unix_timestamp(*expiry as i64)
    {
        let left = (at - time::OffsetDateTime::now_utc()).whole_days();
        let _ = writeln!(
            out,
            "TLS certificate valid until {} ({left} days left)",
            date(at)
        );
    }
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>8} {:>14} {:>14}  refused",
        "listener", "open", "total", "to upstream", "to client"
    );
    for l in &listeners {
        let refused: Vec<String> = Refusal::ALL
            .iter()
            .filter_map(|r| {
                let n = value("connections_refused_total", l, Some(("reason", r.label())));
                (n > 0).then(|| format!("{} {n}", r.label()))
            })
            .collect();
        let _ = writeln!(
            out,
            "{l:<24} {:>6} {:>8} {:>14} {:>14}  {}",
            value("connections_open", l, None),
            value("connections_total", l, None),
            human_bytes(value(
                "bytes_total",
                l,
                Some(("direction", "client_to_upstream"))
            )),
            human_bytes(value(
                "bytes_total",
                l,
                Some(("direction", "upstream_to_client"))
            )),
            if refused.is_empty() {
                "-".to_owned()
            } else {
                refused.join(", ")
            }
        );
    }
    let sent_to_fallback: Vec<String> = listeners
        .iter()
        .filter_map(|l| {
            let n = value("fallback_total", l, None);
            (n > 0).then(|| format!("{l} {n}"))
        })
        .collect();
    if !sent_to_fallback.is_empty() {
        let _ = writeln!(
            out,
            "sent to the fallback (opened otherwise than WhatsApp): {}",
            sent_to_fallback.join(", ")
        );
    }
    let timed_out: Vec<String> = listeners
        .iter()
        .flat_map(|l| Timeout::ALL.iter().map(move |t| (l, *t)))
        .filter_map(|(l, t)| {
            let n = value(
                "connections_timed_out_total",
                l,
                Some(("reason", t.label())),
            );
            (n > 0).then(|| format!("{l} {} {n}", t.label()))
        })
        .collect();
    if !timed_out.is_empty() {
        let _ = writeln!(out, "closed by a timeout: {}", timed_out.join(", "));
    }
    for (name, labels, up) in &samples {
        if *name == "upstream_up" {
            let _ = writeln!(
                out,
                "upstream {} {}: {}",
                label(labels, "pool"),
                label(labels, "server"),
                if *up == 1 { "up" } else { "DOWN" }
            );
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::MemoryLimit;

    #[test]
    fn status_reads_back_what_render_writes() {
        let web = Arc::new(ListenerMetrics::new("0.0.0.0:443".into()));
        web.accepted.store(5, Ordering::Relaxed);
        web.open.store(2, Ordering::Relaxed);
        web.add_bytes(1000, 3 << 20);
        web.refuse(Refusal::PerIpRate);
        web.count_sent_to_fallback();
        web.count_timeout(Timeout::Idle);
        let metrics = Metrics {
            listeners: RwLock::new(vec![web]),
            pools: RwLock::default(),
            plane: DataPlane::Copy,
            memory: MemoryAccount::new(MemoryLimit::Bytes(256 << 20)),
            tls: RwLock::new(Some(Arc::new(
                ServerTls::new(&crate::config::TlsSource::SelfSigned).unwrap(),
            ))),
        };
        let text = metrics.render();
        assert!(text.contains("ebpf_proxy_bytes_total{listener=\"0.0.0.0:443\",direction=\"client_to_upstream\"} 1000"), "{text}");
        assert!(text.contains("ebpf_proxy_connections_refused_total{listener=\"0.0.0.0:443\",reason=\"per_ip_rate\"} 1"));
        assert!(text.contains("ebpf_proxy_fallback_total{listener=\"0.0.0.0:443\"} 1"));
        assert!(text.contains(
            "ebpf_proxy_connections_timed_out_total{listener=\"0.0.0.0:443\",reason=\"idle\"} 1"
        ));
        assert!(text.contains(
            "ebpf_proxy_connections_timed_out_total{listener=\"0.0.0.0:443\",reason=\"half_closed\"} 0"
        ));
        let summary = summarize(&text);
        assert!(summary.contains("data plane: copy"), "{summary}");
        assert!(
            summary
                .contains("sent to the fallback (opened otherwise than WhatsApp): 0.0.0.0:443 1"),
            "{summary}"
        );
        assert!(
            summary.contains("closed by a timeout: 0.0.0.0:443 idle 1\n"),
            "{summary}"
        );
        assert!(
            summary.contains("memory held for connections: 0 B of a 256.0 MiB limit"),
            "{summary}"
        );
        // The self-signed certificate: ten years, less the moment since it was made.
        assert!(
            summary.contains("TLS certificate valid until ")
                && summary.contains("(3649 days left)"),
            "{summary}"
        );
        let row = summary
            .lines()
            .find(|l| l.starts_with("0.0.0.0:443"))
            .expect(&summary);
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &fields[..8],
            [
                "0.0.0.0:443",
                "2",
                "5",
                "1000",
                "B",
                "3.0",
                "MiB",
                "per_ip_rate"
            ],
            "{row}"
        );
    }
}
