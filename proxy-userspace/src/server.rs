//! The control plane: one accept loop per `--forward`, one task per connection, a
//! connection limit, and a shutdown that stops accepting and closes everything down.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream, lookup_host},
    sync::{Semaphore, watch},
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, Upstream},
    dataplane::{DataPlane, DataPlaneChoice},
    kernel::{KernelDataPlane, KernelLoadError},
    sys,
};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot listen on {addr}{hint}", hint = bind_hint(source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "upstream {upstream} does not resolve: {reason} (check the name, or use an IP address)"
    )]
    Resolve { upstream: String, reason: String },
    #[error("--dataplane kernel unavailable")]
    Kernel(#[from] KernelLoadError),
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

/// Runs the relay until `shutdown` completes, then closes every connection and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
    let plane = choose_data_plane(&config)?;
    let mut listeners = Vec::with_capacity(config.forwards.len());
    for forward in &config.forwards {
        resolve(&forward.upstream).await?;
        let listener =
            TcpListener::bind(forward.listen)
                .await
                .map_err(|source| RelayError::Bind {
                    addr: forward.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: forward.listen,
            source,
        })?;
        info!(
            "listening on {addr} -> {} (dataplane {})",
            forward.upstream,
            plane.name()
        );
        listeners.push((listener, Arc::new(forward.upstream.clone())));
    }

    let limit = Arc::new(Semaphore::new(config.max_connections as usize));
    let open = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut accept_loops = tokio::task::JoinSet::new();
    for (listener, upstream) in listeners {
        let handler = Handler {
            upstream,
            plane: plane.clone(),
            connect_timeout: config.connect_timeout,
            stop: stop_rx.clone(),
        };
        accept_loops.spawn(accept_loop(
            listener,
            handler,
            Arc::clone(&limit),
            Arc::clone(&open),
        ));
    }
    let status = tokio::spawn(report_status_on_sigusr1(plane.clone(), Arc::clone(&open)));

    shutdown.await;
    info!("shutting down: closing listeners and connections");
    accept_loops.shutdown().await;
    status.abort();
    // Handlers see the flag, close their sockets and give their permits back.
    let _ = stop_tx.send(true);
    let _ = limit.acquire_many(config.max_connections).await;
    info!("all connections closed");
    Ok(())
}

async fn resolve(upstream: &Upstream) -> Result<Vec<SocketAddr>, RelayError> {
    let error = |reason: String| RelayError::Resolve {
        upstream: upstream.to_string(),
        reason,
    };
    let addrs: Vec<_> = lookup_host((upstream.host.as_str(), upstream.port))
        .await
        .map_err(|e| error(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(error("no addresses".into()));
    }
    Ok(addrs)
}

async fn accept_loop(
    listener: TcpListener,
    handler: Handler,
    limit: Arc<Semaphore>,
    open: Arc<AtomicUsize>,
) {
    loop {
        // Wait for a free slot before accepting: excess clients queue in the kernel backlog.
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((client, _peer)) => {
                let handler = handler.clone();
                let open = OpenConnection::count(&open);
                tokio::spawn(async move {
                    handler.handle(client).await;
                    drop((open, permit));
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

#[derive(Clone)]
struct Handler {
    upstream: Arc<Upstream>,
    plane: DataPlane,
    connect_timeout: Duration,
    stop: watch::Receiver<bool>,
}

impl Handler {
    async fn handle(mut self, client: TcpStream) {
        // Relays latency-sensitive chat traffic: never hold small writes back.
        let _ = client.set_nodelay(true);
        let upstream = match timeout(self.connect_timeout, connect(&self.upstream)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(e)) => {
                warn!(
                    "upstream {} unreachable ({e}): closing the client",
                    self.upstream
                );
                return reset(client);
            }
            Err(_) => {
                warn!(
                    "upstream {} did not answer within {:?}: closing the client",
                    self.upstream, self.connect_timeout
                );
                return reset(client);
            }
        };
        let _ = upstream.set_nodelay(true);
        tokio::select! {
            result = self.plane.relay(client, upstream) => match result {
                Ok(transfer) => debug!(?transfer, "connection closed"),
                Err(e) => debug!("connection reset: {e}"),
            },
            _ = self.stop.wait_for(|stop| *stop) => {}
        }
    }
}

async fn connect(upstream: &Upstream) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name has no addresses");
    for addr in lookup_host((upstream.host.as_str(), upstream.port)).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Tells the client the relay could not serve it, rather than a clean end of stream.
fn reset(client: TcpStream) {
    let _ = sys::set_linger_zero(&client);
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `kill -USR1 PID` logs one line an operator (or a test) can read.
async fn report_status_on_sigusr1(plane: DataPlane, open: Arc<AtomicUsize>) {
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
