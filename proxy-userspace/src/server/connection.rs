//! One listener's accept loop and one connection's life: per-IP limits, the PROXY header
//! and TLS handshake (bounded by the handshake timeout), the route its first bytes decide
//! when the listener has a fallback, an upstream from the pool (or the fallback), the
//! header sent upstream, and the relay on the chosen data plane.

use std::{
    fmt, io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    time::{Instant, timeout_at},
};
use tracing::{debug, info};

use crate::{
    accept::{ACCEPT_BACKOFF, AcceptErrors},
    config::{Expect, HeaderVersion, ListenerConfig, Timeouts},
    counters::{ListenerMetrics, Refusal},
    dataplane::{DataPlane, relay_streams},
    limits::ClientLimits,
    memory::{Holding, MemoryAccount},
    proxy_protocol::{self, Endpoints},
    sys,
    tls::{Accepted, ServerTls},
    transfer::{ConnectionError, Handover, Supervision, Transfer},
    upstream::{ConnectError, Pool},
};

use super::routing::{self, Route};

/// A value replaced as a whole on reload; readers take the current one.
pub type Current<T> = Arc<RwLock<Arc<T>>>;

pub fn current<T>(value: &Current<T>) -> Arc<T> {
    Arc::clone(&value.read().unwrap_or_else(|e| e.into_inner()))
}

/// What every connection of the process shares.
pub struct Shared {
    pub plane: DataPlane,
    pub timeouts: Timeouts,
    pub tls: Option<Arc<ServerTls>>,
    pub client_limits: Arc<ClientLimits>,
    pub memory: Arc<MemoryAccount>,
    pub log_clients: bool,
    pub stop: watch::Receiver<bool>,
}

/// One configured listener.
pub struct Listener {
    pub config: ListenerConfig,
    pub pool: Arc<Pool>,
    /// Where clients go that do not open as the listener expects (`routing.rs`).
    pub fallback: Option<Arc<Pool>>,
    pub metrics: Arc<ListenerMetrics>,
    pub listener_limit: Option<Arc<Semaphore>>,
}

/// Accepts until aborted. The listener and shared settings are read afresh for each
/// connection, so a reload applies to the next one.
pub async fn accept_loop(
    socket: TcpListener,
    listener_now: Current<Listener>,
    shared_now: Current<Shared>,
    limit: Arc<Semaphore>,
    open: Arc<AtomicU64>,
) {
    let mut errors = AcceptErrors::new(current(&listener_now).metrics.name.clone());
    // Read once: what kernel-mode connections record as their listener (ebpf-proxy flows).
    let listener_port = socket.local_addr().map_or(0, |addr| addr.port());
    loop {
        // Wait for free slots before accepting: excess clients queue in the kernel backlog.
        let listener_limit = current(&listener_now).listener_limit.clone();
        let listener_permit = match listener_limit {
            Some(semaphore) => match semaphore.acquire_owned().await {
                Ok(permit) => Some(permit),
                Err(_) => return,
            },
            None => None,
        };
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let accepted = socket.accept().await;
        // Whatever a reload changed while this loop waited applies to this connection.
        let (listener, shared) = (current(&listener_now), current(&shared_now));
        match accepted {
            Ok((client, peer)) => {
                errors.succeeded();
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
                let registered = shared.memory.register(peer.ip(), &listener.metrics);
                let connection = Connection {
                    holding: Arc::clone(&registered.holding),
                    listener: Arc::clone(&listener),
                    shared: Arc::clone(&shared),
                    peer,
                    listener_port,
                };
                let gauges = OpenGauges::count(&open, &listener.metrics);
                tokio::spawn(async move {
                    connection.serve(client).await;
                    drop((registered, gauges, client_slot, permit, listener_permit));
                });
            }
            Err(e) => errors.failed(&e).await,
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
    /// The port the client connected to.
    listener_port: u16,
    /// Its entry in the memory account.
    holding: Arc<Holding>,
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
        // TCP_NODELAY came with the socket, from the listener (see `bind`).
        let config = &self.listener.config;
        let timeouts = &self.shared.timeouts;
        let handshake_deadline = Instant::now() + timeouts.handshake;
        // What the client's PROXY header says; None: the socket's own addresses apply.
        let mut endpoints = None;
        if config.accept_proxy {
            match timeout_at(handshake_deadline, proxy_protocol::read_header(&mut client)).await {
                Ok(Ok(header)) => endpoints = header,
                Ok(Err(e)) => return self.refuse(Refusal::ProxyHeader, &e),
                Err(_) => {
                    return self.refuse(Refusal::ProxyHeader, &"no complete header in time");
                }
            }
        }
        let Some(acceptor) = self.shared.tls.as_ref().filter(|_| config.tls) else {
            let route = match self.listener.fallback {
                Some(_) => {
                    match routing::peek_route(&client, config.expect, handshake_deadline).await {
                        Ok(route) => route,
                        Err(e) => return debug!("connection failed before relaying: {e}"),
                    }
                }
                None => Route::Pool,
            };
            return self.relay_plain(client, endpoints, route).await;
        };
        // What does not open with a ClientHello cannot be a client of this listener: the
        // fallback gets it as it came, as a web server would have.
        if self.listener.fallback.is_some() {
            match routing::peek_route(&client, Expect::Tls, handshake_deadline).await {
                Ok(Route::Pool) => {}
                Ok(Route::Fallback) => {
                    return self.relay_plain(client, endpoints, Route::Fallback).await;
                }
                Err(e) => return debug!("connection failed before relaying: {e}"),
            }
        }
        let mut client = match timeout_at(handshake_deadline, acceptor.accept(client)).await {
            Ok(Ok(Accepted::Client(stream))) => *stream,
            Ok(Ok(Accepted::Validation)) => return debug!("answered an ACME CA's validation"),
            Ok(Err(e)) => return self.refuse(Refusal::TlsHandshake, &e),
            Err(_) => return self.refuse(Refusal::TlsHandshake, &"handshake not done in time"),
        };
        let (route, opening) = match self.listener.fallback {
            Some(_) => {
                match routing::read_route(&mut client, config.expect, handshake_deadline).await {
                    Ok(read) => read,
                    Err(e) => return debug!("connection failed before relaying: {e}"),
                }
            }
            None => (Route::Pool, Vec::new()),
        };
        let Some(mut upstream) = self
            .open_upstream(client.get_ref().0, endpoints, route)
            .await
        else {
            return;
        };
        // What deciding the route read comes first.
        if let Err(e) = upstream.write_all(&opening).await {
            return debug!("connection failed before relaying: {e}");
        }
        self.holding.watch(client.get_ref().0, &upstream);
        let sockets = (client.get_ref().0.as_raw_fd(), upstream.as_raw_fd());
        log_end(relay_streams(client, upstream, sockets, &self.supervision()).await);
    }

    async fn relay_plain(&self, client: TcpStream, endpoints: Option<Endpoints>, route: Route) {
        let Some(upstream) = self.open_upstream(&client, endpoints, route).await else {
            return;
        };
        self.holding.watch(&client, &upstream);
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
        let handover = if self.listener.config.accept_proxy {
            Handover::AfterReads
        } else {
            Handover::Untouched
        };
        log_end(plane.relay(client, upstream, &supervision, handover).await);
    }

    fn supervision(&self) -> Supervision {
        Supervision {
            idle: self.shared.timeouts.idle,
            half_closed: self.shared.timeouts.half_closed,
            metrics: Arc::clone(&self.listener.metrics),
            listener_port: self.listener_port,
            client: self.shared.log_clients.then_some(self.peer),
            holding: Arc::clone(&self.holding),
        }
    }

    /// Connects to the pool, or the fallback, and writes the configured PROXY header (never
    /// to the fallback, an ordinary server); on failure the client is reset and None
    /// returned.
    async fn open_upstream(
        &self,
        client: &TcpStream,
        endpoints: Option<Endpoints>,
        route: Route,
    ) -> Option<TcpStream> {
        let (pool, send_proxy) = match (route, &self.listener.fallback) {
            (Route::Fallback, Some(fallback)) => {
                self.listener.metrics.count_sent_to_fallback();
                (fallback, HeaderVersion::None)
            }
            _ => (&self.listener.pool, self.listener.config.send_proxy),
        };
        let limit = self.shared.timeouts.connect;
        let deadline = Instant::now() + limit;
        let mut upstream = loop {
            match pool.connect(limit).await {
                Ok(upstream) => break upstream,
                // Out of descriptors: wait for some to free up, as accepting does.
                Err(ConnectError::Local(_)) if Instant::now() + ACCEPT_BACKOFF < deadline => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                Err(e) => {
                    self.refuse(Refusal::UpstreamUnavailable, &e);
                    reset(client);
                    return None;
                }
            }
        };
        let _ = upstream.set_nodelay(true);
        // getsockname only when a header is sent and the client did not name the addresses.
        let endpoints = match (send_proxy, endpoints) {
            (HeaderVersion::None, _) => None,
            (_, Some(endpoints)) => Some(endpoints),
            (_, None) => Some(Endpoints {
                source: self.peer,
                destination: client.local_addr().unwrap_or(self.listener.config.listen),
            }),
        };
        let header = endpoints
            .map(|e| proxy_protocol::encode(send_proxy, e.source, e.destination))
            .unwrap_or_default();
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

fn log_end(result: Result<Transfer, ConnectionError>) {
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
/// The handler is installed by the caller, before it says it is ready: a SIGUSR1 that came
/// before would otherwise end the process (the default action).
pub async fn report_status_on_sigusr1(
    mut usr1: tokio::signal::unix::Signal,
    plane: DataPlane,
    open: Arc<AtomicU64>,
) {
    while usr1.recv().await.is_some() {
        let connections = open.load(Ordering::Relaxed);
        let kernel = match &plane {
            DataPlane::Kernel { plane, .. } => format!(
                " sockets_in_map={} flow_records={} userspace_fallbacks={} promoted={} detached={} resumed={}",
                plane.socket_entries(),
                plane.flow_records(),
                plane.fallbacks(),
                plane.promotions(),
                plane.detachments(),
                plane.resumptions()
            ),
            _ => String::new(),
        };
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        info!("status: connections={connections} tasks={tasks}{kernel}");
    }
}
