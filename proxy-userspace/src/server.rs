//! The control plane: binds every listener, then for each client: per-IP limits, the PROXY
//! header and TLS handshake (bounded by the handshake timeout), an upstream from the pool,
//! the header sent upstream, and the relay on the chosen data plane.

use std::{
    fmt, io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    time::{Instant, timeout_at},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{
    config::{Config, ListenerConfig, Timeouts},
    dataplane::{DataPlane, DataPlaneChoice, Supervision, relay_streams},
    kernel::{KernelDataPlane, KernelLoadError},
    limits::ClientLimits,
    metrics::{self, ListenerMetrics, Metrics, Refusal},
    proxy_protocol::{self, Endpoints},
    sys,
    tls::{self, TlsError},
    upstream::{Pins, Pool, ResolveError},
};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot listen on {addr}{hint}", hint = bind_hint(source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("--dataplane kernel unavailable")]
    Kernel(#[from] KernelLoadError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => " (another process holds this port: stop it or pick another)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        io::ErrorKind::AddrNotAvailable => " (no local interface has this address)",
        _ => "",
    }
}

/// Picks the data plane; `auto` falls back to splice with one warning saying why.
pub fn choose_data_plane(config: &Config) -> Result<DataPlane, RelayError> {
    match config.dataplane {
        DataPlaneChoice::Copy => Ok(DataPlane::Copy),
        DataPlaneChoice::Splice => Ok(DataPlane::Splice),
        DataPlaneChoice::Kernel => Ok(DataPlane::Kernel(KernelDataPlane::load(
            config.max_sockets(),
        )?)),
        DataPlaneChoice::Auto => match KernelDataPlane::load(config.max_sockets()) {
            Ok(kernel) => Ok(DataPlane::Kernel(kernel)),
            Err(e) => {
                warn!("kernel data plane unavailable, relaying with splice instead: {e}");
                Ok(DataPlane::Splice)
            }
        },
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), RelayError> {
    let error = |source| RelayError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    Ok((listener, local))
}

/// Runs the relay until `shutdown` completes, then closes every connection and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
    let plane = choose_data_plane(&config)?;
    let pins = Pins::new(config.pins.clone());
    let mut pools = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        pools.push(Pool::resolve(pool, Arc::clone(&pins)).await?);
    }
    let tls = match config.listeners.iter().any(|l| l.tls) {
        true => Some(tls::acceptor(&config.tls)?),
        false => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        plane: plane.clone(),
        timeouts: config.timeouts,
        tls,
        client_limits: ClientLimits::new(&config.limits),
        log_clients: config.log_clients,
        stop: stop_rx,
    });

    let mut bound = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        let (socket, addr) = bind(listener.listen).await?;
        let pool = Arc::clone(&pools[listener.pool]);
        info!(
            "listening on {addr} -> pool {} [{}]{}{}{} (dataplane {})",
            pool.name,
            pool.servers()
                .iter()
                .map(|s| s.upstream.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if listener.accept_proxy {
                ", accepts PROXY"
            } else {
                ""
            },
            if listener.tls { ", TLS" } else { "" },
            match listener.send_proxy {
                crate::config::HeaderVersion::None => "",
                crate::config::HeaderVersion::V1 => ", sends PROXY v1",
                crate::config::HeaderVersion::V2 => ", sends PROXY v2",
            },
            if listener.tls {
                "userspace"
            } else {
                plane.name()
            },
        );
        let mut listener = listener.clone();
        listener.name.get_or_insert_with(|| addr.to_string());
        bound.push((socket, listener, pool));
    }

    let mut tasks = tokio::task::JoinSet::new();
    let listener_metrics: Vec<Arc<ListenerMetrics>> = bound
        .iter()
        .map(|(_, l, _)| Arc::new(ListenerMetrics::new(l.name.clone().unwrap_or_default())))
        .collect();
    if let Some(addr) = config.metrics {
        let (socket, local) = bind(addr).await?;
        if !addr.ip().is_loopback() {
            warn!("metrics are served on {local}, which is not loopback: firewall it");
        }
        info!("metrics on http://{local}/metrics");
        let metrics = Arc::new(Metrics {
            listeners: listener_metrics.clone(),
            pools: pools.clone(),
            plane: plane.clone(),
        });
        tasks.spawn(metrics::serve(socket, metrics));
    }
    for pool in &pools {
        tasks.spawn(Arc::clone(pool).maintain());
    }

    let limit = Arc::new(Semaphore::new(config.limits.max_connections as usize));
    let open = Arc::new(AtomicU64::new(0));
    for ((socket, config, pool), metrics) in bound.into_iter().zip(listener_metrics) {
        let listener = Arc::new(Listener {
            listener_limit: config
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            config,
            pool,
            metrics,
        });
        tasks.spawn(accept_loop(
            socket,
            listener,
            Arc::clone(&shared),
            Arc::clone(&limit),
            Arc::clone(&open),
        ));
    }
    tasks.spawn(report_status_on_sigusr1(plane.clone(), Arc::clone(&open)));
    info!("ready: {} listeners", config.listeners.len());

    shutdown.await;
    info!("shutting down: closing listeners and connections");
    tasks.shutdown().await;
    // Handlers see the flag, close their sockets and give their permits back.
    let _ = stop_tx.send(true);
    let _ = limit.acquire_many(config.limits.max_connections).await;
    info!("all connections closed");
    Ok(())
}

/// What every connection of the process shares.
struct Shared {
    plane: DataPlane,
    timeouts: Timeouts,
    tls: Option<TlsAcceptor>,
    client_limits: Arc<ClientLimits>,
    log_clients: bool,
    stop: watch::Receiver<bool>,
}

/// One configured listener.
struct Listener {
    config: ListenerConfig,
    pool: Arc<Pool>,
    metrics: Arc<ListenerMetrics>,
    listener_limit: Option<Arc<Semaphore>>,
}

async fn accept_loop(
    socket: TcpListener,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    open: Arc<AtomicU64>,
) {
    loop {
        // Wait for free slots before accepting: excess clients queue in the kernel backlog.
        let listener_permit = match &listener.listener_limit {
            Some(semaphore) => match Arc::clone(semaphore).acquire_owned().await {
                Ok(permit) => Some(permit),
                Err(_) => return,
            },
            None => None,
        };
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        match socket.accept().await {
            Ok((client, peer)) => {
                listener.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                let client_slot = match shared.client_limits.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(reason) => {
                        listener.metrics.refuse(reason);
                        debug!(
                            "refused {} on {}: {}",
                            Client(peer, shared.log_clients),
                            listener.metrics.name,
                            reason.label()
                        );
                        reset(&client);
                        continue;
                    }
                };
                let connection = Connection {
                    listener: Arc::clone(&listener),
                    shared: Arc::clone(&shared),
                    peer,
                };
                let gauges = OpenGauges::count(&open, &listener.metrics);
                tokio::spawn(async move {
                    connection.serve(client).await;
                    drop((gauges, client_slot, permit, listener_permit));
                });
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning on the same error.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A client address as logs may show it: only with --log-clients.
struct Client(SocketAddr, bool);

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self(addr, true) => write!(f, "client {addr}"),
            Self(_, false) => f.write_str("a client"),
        }
    }
}

/// Accepted TCP bytes beyond a PROXY header are forwarded by userspace before the kernel
/// takes over; past this much the client is streaming, and the connection stays in
/// userspace (the kernel must never see a half-consumed segment).
const MAX_EARLY_BYTES: usize = 1 << 20;

struct Connection {
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl Connection {
    async fn serve(self, client: TcpStream) {
        let mut stop = self.shared.stop.clone();
        tokio::select! {
            () = self.relay(client) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }

    fn refuse(&self, reason: Refusal, why: &dyn fmt::Display) {
        self.listener.metrics.refuse(reason);
        debug!(
            "closed {} on {} ({}): {why}",
            Client(self.peer, self.shared.log_clients),
            self.listener.metrics.name,
            reason.label()
        );
    }

    async fn relay(&self, mut client: TcpStream) {
        // Relays latency-sensitive chat traffic: never hold small writes back.
        let _ = client.set_nodelay(true);
        let config = &self.listener.config;
        let timeouts = &self.shared.timeouts;
        let handshake_deadline = Instant::now() + timeouts.handshake;
        let local = client.local_addr().unwrap_or(config.listen);
        let mut endpoints = Endpoints {
            source: self.peer,
            destination: local,
        };
        if config.accept_proxy {
            match timeout_at(handshake_deadline, proxy_protocol::read_header(&mut client)).await {
                Ok(Ok(Some(header))) => endpoints = header,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return self.refuse(Refusal::ProxyHeader, &e),
                Err(_) => {
                    return self.refuse(Refusal::ProxyHeader, &"no complete header in time");
                }
            }
        }
        let Some(acceptor) = self.shared.tls.as_ref().filter(|_| config.tls) else {
            return self.relay_plain(client, endpoints).await;
        };
        let client = match timeout_at(handshake_deadline, acceptor.accept(client)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return self.refuse(Refusal::TlsHandshake, &e),
            Err(_) => return self.refuse(Refusal::TlsHandshake, &"handshake not done in time"),
        };
        let Some(upstream) = self.open_upstream(client.get_ref().0, endpoints).await else {
            return;
        };
        let sockets = (client.get_ref().0.as_raw_fd(), upstream.as_raw_fd());
        log_end(relay_streams(client, upstream, sockets, &self.supervision()).await);
    }

    async fn relay_plain(&self, client: TcpStream, endpoints: Endpoints) {
        let Some(upstream) = self.open_upstream(&client, endpoints).await else {
            return;
        };
        let supervision = self.supervision();
        let mut plane = &self.shared.plane;
        if self.listener.config.accept_proxy {
            match forward_early_bytes(&client, &upstream).await {
                Ok(early) => {
                    supervision.metrics.add_bytes(early.moved, 0);
                    if !early.drained {
                        plane = &DataPlane::Splice;
                    }
                }
                Err(e) => {
                    debug!("connection failed before relaying: {e}");
                    reset(&client);
                    return;
                }
            }
        }
        log_end(plane.relay(client, upstream, &supervision).await);
    }

    fn supervision(&self) -> Supervision {
        Supervision {
            idle: self.shared.timeouts.idle,
            half_closed: self.shared.timeouts.half_closed,
            metrics: Arc::clone(&self.listener.metrics),
        }
    }

    /// Connects to the pool and writes the configured PROXY header; on failure the client
    /// is reset and None returned.
    async fn open_upstream(&self, client: &TcpStream, endpoints: Endpoints) -> Option<TcpStream> {
        let mut upstream = match self
            .listener
            .pool
            .connect(self.shared.timeouts.connect)
            .await
        {
            Ok(upstream) => upstream,
            Err(e) => {
                self.refuse(Refusal::UpstreamUnavailable, &e);
                reset(client);
                return None;
            }
        };
        let _ = upstream.set_nodelay(true);
        let header = proxy_protocol::encode(
            self.listener.config.send_proxy,
            endpoints.source,
            endpoints.destination,
        );
        if !header.is_empty()
            && let Err(e) = upstream.write_all(&header).await
        {
            self.refuse(Refusal::UpstreamUnavailable, &e);
            reset(client);
            return None;
        }
        Some(upstream)
    }
}

/// What followed the PROXY header in the client's receive queue.
struct EarlyBytes {
    moved: u64,
    /// The queue was seen empty: no half-read segment is left for the kernel to see twice.
    drained: bool,
}

/// Moves the bytes that followed the PROXY header to the upstream until the client's
/// receive queue is empty, or gives up draining past MAX_EARLY_BYTES. Needed because the
/// verdict program is handed whole skbs (tcp_read_skb ignores what recv() already took
/// from the head one): without this, the preset test saw the 48 header bytes sent twice.
async fn forward_early_bytes(client: &TcpStream, upstream: &TcpStream) -> io::Result<EarlyBytes> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut moved = 0u64;
    loop {
        if moved > MAX_EARLY_BYTES as u64 {
            return Ok(EarlyBytes {
                moved,
                drained: false,
            });
        }
        let n = match client.try_read(&mut buf) {
            // EOF stays queued for the data plane to see.
            Ok(0) => {
                return Ok(EarlyBytes {
                    moved,
                    drained: true,
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(EarlyBytes {
                    moved,
                    drained: true,
                });
            }
            Err(e) => return Err(e),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            upstream.writable().await?;
            match upstream.try_write(rest) {
                Ok(sent) => rest = &rest[sent..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
    }
}

fn log_end(result: Result<crate::dataplane::Transfer, crate::dataplane::FlowError>) {
    match result {
        Ok(transfer) => debug!(?transfer, "connection closed"),
        Err(e) => debug!("connection ended: {e}"),
    }
}

/// Tells the client the relay could not serve it, rather than a clean end of stream.
fn reset(client: &TcpStream) {
    let _ = sys::set_linger_zero(client);
}

/// Counts a connection as open, in the process and its listener, for as long as it lives.
struct OpenGauges(Arc<AtomicU64>, Arc<ListenerMetrics>);

impl OpenGauges {
    fn count(all: &Arc<AtomicU64>, listener: &Arc<ListenerMetrics>) -> Self {
        all.fetch_add(1, Ordering::Relaxed);
        listener.open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(all), Arc::clone(listener))
    }
}

impl Drop for OpenGauges {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `kill -USR1 PID` logs one line an operator (or a test) can read.
async fn report_status_on_sigusr1(plane: DataPlane, open: Arc<AtomicU64>) {
    let Ok(mut usr1) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    else {
        return;
    };
    while usr1.recv().await.is_some() {
        let connections = open.load(Ordering::Relaxed);
        let kernel = match &plane {
            DataPlane::Kernel(kernel) => format!(
                " sockets_in_map={} userspace_fallbacks={}",
                kernel.socket_entries(),
                kernel.fallbacks()
            ),
            _ => String::new(),
        };
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        info!("status: connections={connections} tasks={tasks}{kernel}");
    }
}
