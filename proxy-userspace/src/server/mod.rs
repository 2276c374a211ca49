//! The control plane's lifecycle: bind the listeners, run their accept loops, apply a new
//! configuration on reload (SIGHUP), and stop either at once or after draining (SIGTERM).

mod connection;
mod routing;
mod tls;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, watch},
    task::{JoinHandle, JoinSet},
};
use tracing::{info, warn};

use connection::{Current, Listener, Shared, accept_loop, current, report_status_on_sigusr1};
use tls::RunningTls;

use crate::{
    acme::AcmeError,
    config::{Config, ConfigError, DataPlaneChoice, HeaderVersion, ListenerConfig},
    counters::ListenerMetrics,
    dataplane::DataPlane,
    kernel::{KernelDataPlane, KernelLoadError},
    limits::ClientLimits,
    memory::{Backlogs, MemoryAccount},
    metrics::{self, Metrics},
    sys,
    tls::TlsError,
    upstream::{Pins, Pool},
};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot listen on {addr}{hint}", hint = bind_hint(source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--dataplane kernel unavailable")]
    Kernel(#[from] KernelLoadError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Acme(#[from] AcmeError),
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            " (something already listens on this port: `ss -ltnp` shows what; stop it or pick another port)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        io::ErrorKind::AddrNotAvailable => " (no local interface has this address)",
        _ => "",
    }
}

/// What the process was asked to do (main maps signals to these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Read the configuration again and apply it (SIGHUP).
    Reload,
    /// Stop accepting, let connections finish up to the drain timeout (SIGTERM).
    Drain,
    /// Close everything now (SIGINT, or a second signal while draining).
    Stop,
}

/// Picks the data plane; `auto` falls back to splice with one warning saying why.
pub fn choose_data_plane(config: &Config) -> Result<DataPlane, RelayError> {
    match config.dataplane {
        DataPlaneChoice::Copy => Ok(DataPlane::Copy),
        DataPlaneChoice::Splice => Ok(DataPlane::Splice),
        DataPlaneChoice::Kernel => Ok(DataPlane::Kernel {
            plane: KernelDataPlane::load(config.max_sockets())?,
            warm_up: false,
        }),
        DataPlaneChoice::Auto => match KernelDataPlane::load(config.max_sockets()) {
            Ok(plane) => Ok(DataPlane::Kernel {
                plane,
                warm_up: true,
            }),
            Err(e) => {
                warn!("kernel data plane unavailable, relaying with splice instead: {e}");
                Ok(DataPlane::Splice)
            }
        },
    }
}

/// Runs the relay until a Drain or Stop signal, reloading on each Reload with whatever
/// `load` returns; then closes every connection and returns.
pub async fn run(
    config: Config,
    load: impl Fn() -> Result<Config, ConfigError>,
    mut signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<(), RelayError> {
    let plane = choose_data_plane(&config)?;
    let mut relay = Relay::start(config, plane).await?;
    let drain = loop {
        match signals.recv().await {
            Some(Signal::Reload) => match load() {
                Ok(config) => relay.reload(config).await,
                Err(e) => warn!("reload failed, the running configuration stays: {e}"),
            },
            Some(Signal::Drain) => break true,
            Some(Signal::Stop) | None => break false,
        }
    };
    relay.stop_accepting().await;
    if drain {
        let timeout = relay.config.timeouts.drain;
        info!(
            "draining: no new connections; waiting up to {timeout:?} for {} open ones",
            relay.open.load(Ordering::Relaxed)
        );
        tokio::select! {
            () = relay.all_closed() => info!("drained"),
            _ = tokio::time::sleep(timeout) => {
                info!("drain timeout: closing {} connections", relay.open.load(Ordering::Relaxed));
            }
            _ = signals.recv() => info!("second signal: closing every connection now"),
        }
    }
    info!("shutting down: closing connections");
    relay.close_all().await;
    info!("all connections closed");
    Ok(())
}

/// A listener's socket and accept loop, and what it currently serves.
struct Running {
    local: SocketAddr,
    listener: Current<Listener>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops the accept loop and waits until its socket is closed.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A listener's identity across reloads: its configured address, and which of the listeners
/// configured with that address it is (several may ask for port 0).
type ListenKey = (SocketAddr, usize);

/// Keys for `listeners`, in order.
fn listen_keys(listeners: &[ListenerConfig]) -> Vec<ListenKey> {
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    listeners
        .iter()
        .map(|l| {
            let n = seen.entry(l.listen).or_default();
            *n += 1;
            (l.listen, *n - 1)
        })
        .collect()
}

/// The running relay: its configuration, listeners, pools and connection budget.
struct Relay {
    config: Config,
    plane: DataPlane,
    pins: Arc<Pins>,
    shared: Current<Shared>,
    tls: Option<Arc<RunningTls>>,
    client_limits: Arc<ClientLimits>,
    memory: Arc<MemoryAccount>,
    running: HashMap<ListenKey, Running>,
    pools: Vec<Arc<Pool>>,
    pool_tasks: JoinSet<()>,
    background: JoinSet<()>,
    metrics: Arc<Metrics>,
    limit: Arc<Semaphore>,
    /// Permits `limit` stands for: max_connections, or fewer if descriptors run short.
    permits: u32,
    /// Connections the descriptor limit leaves room for.
    fd_budget: u32,
    /// Connections the kernel maps were sized for at start.
    map_connections: u32,
    open: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl Relay {
    async fn start(config: Config, plane: DataPlane) -> Result<Self, RelayError> {
        let pins = Pins::new(config.pins.clone());
        let pools = resolve_pools(&config, &pins).await;
        let (stop, stop_rx) = watch::channel(false);
        let client_limits = ClientLimits::new(&config.limits);
        let memory = MemoryAccount::new(config.limits.memory);
        let tls = RunningTls::start(&config)?;
        let shared = Arc::new(RwLock::new(Arc::new(Shared {
            plane: plane.clone(),
            timeouts: config.timeouts,
            tls: tls.as_ref().map(|tls| Arc::clone(&tls.server)),
            client_limits: Arc::clone(&client_limits),
            memory: Arc::clone(&memory),
            log_clients: config.log_clients,
            stop: stop_rx,
        })));
        let fd_budget = fd_budget(&plane, config.listeners.len());
        let permits = config.limits.max_connections.min(fd_budget);
        let metrics = Arc::new(Metrics {
            listeners: RwLock::default(),
            pools: RwLock::new(pools.clone()),
            plane: plane.clone(),
            memory: Arc::clone(&memory),
            tls: RwLock::new(tls.as_ref().map(|tls| Arc::clone(&tls.server))),
        });
        let mut relay = Self {
            limit: Arc::new(Semaphore::new(permits as usize)),
            permits,
            fd_budget,
            map_connections: config.map_connections,
            config,
            plane,
            pins,
            shared,
            tls,
            client_limits,
            memory,
            running: HashMap::new(),
            pools: Vec::new(),
            pool_tasks: JoinSet::new(),
            background: JoinSet::new(),
            metrics,
            open: Arc::new(AtomicU64::new(0)),
            stop,
        };
        relay.use_pools(pools);
        let backlogs: Option<Arc<dyn Backlogs>> = match &relay.plane {
            DataPlane::Kernel { plane, .. } => Some(Arc::clone(plane) as Arc<dyn Backlogs>),
            _ => None,
        };
        relay
            .background
            .spawn(Arc::clone(&relay.memory).run(backlogs));
        relay.check_map_size();
        relay.check_fd_budget();
        let listeners = relay.config.listeners.clone();
        for (key, listener) in listen_keys(&listeners).into_iter().zip(listeners) {
            let (socket, local) = bind(listener.listen).await?;
            relay.serve(key, listener, socket, local);
        }
        relay.publish_listener_metrics();
        if let Some(addr) = relay.config.metrics {
            let (socket, local) = bind(addr).await?;
            if !addr.ip().is_loopback() {
                warn!("metrics are served on {local}, which is not loopback: firewall it");
            }
            info!("metrics on http://{local}/metrics");
            relay
                .background
                .spawn(metrics::serve(socket, Arc::clone(&relay.metrics)));
        }
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
            Ok(usr1) => {
                relay.background.spawn(report_status_on_sigusr1(
                    usr1,
                    relay.plane.clone(),
                    Arc::clone(&relay.open),
                ));
            }
            Err(e) => warn!("no status line on SIGUSR1: {e}"),
        }
        info!("ready: {} listeners", relay.running.len());
        Ok(relay)
    }

    /// Starts accepting on `socket` for `config`.
    fn serve(
        &mut self,
        key: ListenKey,
        config: ListenerConfig,
        socket: TcpListener,
        local: SocketAddr,
    ) {
        let listener = Arc::new(RwLock::new(self.listener(config, local, None)));
        log_listener(&current(&listener), local, &self.plane);
        let task = tokio::spawn(accept_loop(
            socket,
            Arc::clone(&listener),
            Arc::clone(&self.shared),
            Arc::clone(&self.limit),
            Arc::clone(&self.open),
        ));
        self.running.insert(
            key,
            Running {
                local,
                listener,
                task,
            },
        );
    }

    /// What a listener serves under the current pools, keeping the counters (and the limit's
    /// count, when unchanged) of the `previous` one.
    fn listener(
        &self,
        mut config: ListenerConfig,
        local: SocketAddr,
        previous: Option<&Listener>,
    ) -> Arc<Listener> {
        let name = config.name.get_or_insert_with(|| local.to_string()).clone();
        let metrics = match previous {
            Some(p) if p.metrics.name == name => Arc::clone(&p.metrics),
            _ => Arc::new(ListenerMetrics::new(name)),
        };
        let listener_limit = match previous {
            Some(p) if p.config.max_connections == config.max_connections => {
                p.listener_limit.clone()
            }
            _ => config
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
        };
        Arc::new(Listener {
            pool: Arc::clone(&self.pools[config.pool]),
            fallback: config.fallback.map(|pool| Arc::clone(&self.pools[pool])),
            config,
            metrics,
            listener_limit,
        })
    }

    fn use_pools(&mut self, pools: Vec<Arc<Pool>>) {
        // Connections keep the pool they started with; only new ones use the new pools.
        self.pool_tasks.abort_all();
        for pool in &pools {
            self.pool_tasks.spawn(Arc::clone(pool).maintain());
        }
        *self
            .metrics
            .pools
            .write()
            .unwrap_or_else(|e| e.into_inner()) = pools.clone();
        self.pools = pools;
    }

    fn publish_listener_metrics(&self) {
        let mut listeners: Vec<_> = self.running.values().collect();
        listeners.sort_by_key(|r| r.local);
        *self
            .metrics
            .listeners
            .write()
            .unwrap_or_else(|e| e.into_inner()) = listeners
            .iter()
            .map(|r| Arc::clone(&current(&r.listener).metrics))
            .collect();
    }

    /// Applies a new configuration: listeners added, changed and removed; pools, limits,
    /// timeouts and TLS replaced. Established connections are not touched. Anything that
    /// fails leaves the running configuration as it was.
    async fn reload(&mut self, config: Config) {
        let pools = resolve_pools(&config, &self.pins).await;
        let tls = match RunningTls::next(self.tls.as_ref(), &config) {
            Ok(tls) => tls,
            Err(e) => return warn!("reload failed, the running configuration stays: {e}"),
        };
        if config.dataplane != self.config.dataplane || config.metrics != self.config.metrics {
            warn!("the data plane and the metrics address change only with a restart");
        }
        self.resize_limit(config.limits.max_connections);
        self.client_limits.update(&config.limits);
        self.memory.set_limit(config.limits.memory);
        let stop = current(&self.shared).stop.clone();
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Shared {
            plane: self.plane.clone(),
            timeouts: config.timeouts,
            tls: tls.as_ref().map(|tls| Arc::clone(&tls.server)),
            client_limits: Arc::clone(&self.client_limits),
            memory: Arc::clone(&self.memory),
            log_clients: config.log_clients,
            stop,
        });
        *self.metrics.tls.write().unwrap_or_else(|e| e.into_inner()) =
            tls.as_ref().map(|tls| Arc::clone(&tls.server));
        self.tls = tls;
        self.use_pools(pools);

        let keys = listen_keys(&config.listeners);
        let removed: Vec<ListenKey> = self
            .running
            .keys()
            .filter(|key| !keys.contains(key))
            .copied()
            .collect();
        for key in &removed {
            if let Some(running) = self.running.remove(key) {
                let local = running.local;
                running.stop().await;
                info!("stopped listening on {local}");
            }
        }
        let mut added = 0;
        for (key, listener) in keys.into_iter().zip(&config.listeners) {
            if let Some(running) = self.running.get(&key) {
                let previous = current(&running.listener);
                let next = self.listener(listener.clone(), running.local, Some(&previous));
                *running.listener.write().unwrap_or_else(|e| e.into_inner()) = next;
                continue;
            }
            match bind(listener.listen).await {
                Ok((socket, local)) => {
                    self.serve(key, listener.clone(), socket, local);
                    added += 1;
                }
                Err(e) => warn!("reload: {e}; the other listeners are applied"),
            }
        }
        self.publish_listener_metrics();
        info!(
            "reloaded: {} listeners ({added} added, {} removed)",
            self.running.len(),
            removed.len()
        );
        self.config = config;
    }

    fn check_map_size(&self) {
        if let DataPlane::Kernel { .. } = self.plane
            && self.config.limits.max_connections > self.map_connections
        {
            warn!(
                "the kernel maps hold {} connections and max_connections is {}: the rest are relayed in userspace",
                self.map_connections, self.config.limits.max_connections
            );
        }
    }

    fn check_fd_budget(&self) {
        let max = self.config.limits.max_connections;
        if max > self.fd_budget {
            warn!(
                "the open-file limit leaves room for about {} connections, fewer than max_connections {max}: clients beyond that wait in the listen backlog (raise LimitNOFILE or ulimit -n)",
                self.fd_budget
            );
        }
    }

    /// Changes the global connection limit; permits held by open connections are taken
    /// out as those connections end.
    fn resize_limit(&mut self, max_connections: u32) {
        let (old, max) = (self.permits, max_connections.min(self.fd_budget));
        if max > old {
            self.limit.add_permits((max - old) as usize);
        } else if max < old {
            let owed = (old - max) as usize;
            let forgotten = self.limit.forget_permits(owed);
            if forgotten < owed {
                let limit = Arc::clone(&self.limit);
                let rest = (owed - forgotten) as u32;
                tokio::spawn(async move {
                    if let Ok(permits) = limit.acquire_many(rest).await {
                        permits.forget();
                    }
                });
            }
        }
        self.permits = max;
        self.config.limits.max_connections = max_connections;
        self.check_map_size();
        self.check_fd_budget();
    }

    async fn stop_accepting(&mut self) {
        for (_, running) in self.running.drain() {
            running.stop().await;
        }
        self.pool_tasks.abort_all();
    }

    /// Resolves once no connection is open.
    async fn all_closed(&self) {
        let _ = self.limit.acquire_many(self.permits).await;
    }

    async fn close_all(mut self) {
        // Handlers see the flag, close their sockets and give their permits back.
        let _ = self.stop.send(true);
        self.all_closed().await;
        self.background.shutdown().await;
    }
}

/// Descriptors kept for everything but relayed connections: listeners, the metrics
/// endpoint and its clients, health checks, logs, the eBPF maps.
const RESERVED_FDS: u64 = 64;

/// How many connections the open-file limit (raised to its hard maximum) leaves room for:
/// two sockets each, plus two pipes in splice mode.
fn fd_budget(plane: &DataPlane, listeners: usize) -> u32 {
    let per_connection = match plane {
        DataPlane::Splice => 6,
        DataPlane::Kernel { .. } | DataPlane::Copy => 2,
    };
    let (Ok(limit), Ok(open)) = (crate::sys::raise_fd_limit(), crate::sys::open_fds()) else {
        return u32::MAX;
    };
    let spare = limit.saturating_sub(open + listeners as u64 + RESERVED_FDS);
    u32::try_from(spare / per_connection)
        .unwrap_or(u32::MAX)
        .max(1)
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), RelayError> {
    let error = |source| RelayError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    // Relays latency-sensitive chat traffic: never hold small writes back. Accepted sockets
    // inherit it, which spares a setsockopt per connection.
    sys::set_no_delay(&listener).map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    Ok((listener, local))
}

async fn resolve_pools(config: &Config, pins: &Arc<Pins>) -> Vec<Arc<Pool>> {
    let mut pools = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        pools.push(Pool::resolve(pool, Arc::clone(pins)).await);
    }
    pools
}

fn log_listener(listener: &Listener, local: SocketAddr, plane: &DataPlane) {
    let config = &listener.config;
    let servers: Vec<String> = listener
        .pool
        .servers()
        .iter()
        .map(|s| s.upstream.to_string())
        .collect();
    let fallback = listener.fallback.as_ref().map(|pool| {
        let servers: Vec<String> = pool
            .servers()
            .iter()
            .map(|s| s.upstream.to_string())
            .collect();
        format!(", other openings to {}", servers.join(", "))
    });
    info!(
        "listening on {local} -> pool {} [{}]{}{}{}{} (dataplane {})",
        listener.pool.name,
        servers.join(", "),
        fallback.unwrap_or_default(),
        if config.accept_proxy {
            ", accepts PROXY"
        } else {
            ""
        },
        if config.tls { ", TLS" } else { "" },
        match config.send_proxy {
            HeaderVersion::None => "",
            HeaderVersion::V1 => ", sends PROXY v1",
            HeaderVersion::V2 => ", sends PROXY v2",
        },
        if config.tls {
            "userspace"
        } else {
            plane.name()
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_clients_never_hold_small_writes_back() {
        let (listener, local) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let _client = tokio::net::TcpStream::connect(local).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
