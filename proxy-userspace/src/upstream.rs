//! Upstream pools: servers in order, each with its resolved addresses and health; connects
//! fail over to the next server; a background task re-resolves names and runs health checks.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpStream, lookup_host},
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::config::{Balance, PoolConfig, Upstream};

/// `--resolve` answers, by lower-case host name, asked before DNS at every (re)resolve.
#[derive(Debug, Default)]
pub struct Pins(RwLock<BTreeMap<String, Vec<IpAddr>>>);

impl Pins {
    pub fn new(pins: BTreeMap<String, Vec<IpAddr>>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(pins)))
    }

    fn get(&self, host: &str) -> Option<Vec<IpAddr>> {
        let pins = self.0.read().unwrap_or_else(|e| e.into_inner());
        pins.get(&host.to_ascii_lowercase()).cloned()
    }

    #[cfg(test)]
    fn replace(&self, pins: BTreeMap<String, Vec<IpAddr>>) {
        *self.0.write().unwrap() = pins;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream} does not resolve: {reason} (check the name, or use an IP address)")]
pub struct ResolveError {
    pub upstream: String,
    pub reason: String,
}

pub struct Server {
    pub upstream: Upstream,
    addrs: Mutex<Vec<SocketAddr>>,
    up: AtomicBool,
}

impl Server {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a health change, logging only transitions.
    fn set_up(&self, pool: &str, up: bool, why: &dyn std::fmt::Display) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                info!("upstream {} (pool {pool}) is up", self.upstream);
            } else {
                warn!("upstream {} (pool {pool}) is down: {why}", self.upstream);
            }
        }
    }
}

pub struct Pool {
    pub name: String,
    config: PoolConfig,
    servers: Vec<Server>,
    next: AtomicUsize,
    pins: Arc<Pins>,
}

impl Pool {
    /// Resolves every server once. A server that does not resolve yet starts down and is
    /// retried with backoff ([`RETRY_FIRST`] doubling to [`RETRY_LAST`]) by `maintain`;
    /// meanwhile connects skip it, and a pool with no address at all refuses clients at
    /// once. Nothing here stops the relay: DNS may be down at boot, or tampered with.
    pub async fn resolve(config: &PoolConfig, pins: Arc<Pins>) -> Arc<Self> {
        let mut servers = Vec::with_capacity(config.servers.len());
        let mut errors = Vec::new();
        for upstream in &config.servers {
            let addrs = resolve(upstream, &pins).await.unwrap_or_else(|e| {
                errors.push(e);
                Vec::new()
            });
            servers.push(Server {
                upstream: upstream.clone(),
                up: AtomicBool::new(!addrs.is_empty()),
                addrs: Mutex::new(addrs),
            });
        }
        if !errors.is_empty() && errors.len() == servers.len() {
            warn!(
                "pool {} has no address yet, so its clients are refused until a name resolves (retrying with backoff): {}",
                config.name, errors[0]
            );
        } else {
            for e in errors {
                warn!("{e}; retrying with backoff");
            }
        }
        Arc::new(Self {
            name: config.name.clone(),
            config: config.clone(),
            servers,
            next: AtomicUsize::new(0),
            pins,
        })
    }

    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// Servers in the order to try: by the balance rule, healthy ones first (a server
    /// marked down is still tried last: it may be back before its next check).
    fn order(&self) -> Vec<&Server> {
        let start = match self.config.balance {
            Balance::Failover => 0,
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
        };
        let n = self.servers.len();
        let mut order: Vec<&Server> = (0..n).map(|i| &self.servers[(start + i) % n]).collect();
        order.sort_by_key(|s| !s.is_up());
        order
    }

    /// Connects to the first server that accepts within `limit` per attempt.
    pub async fn connect(&self, limit: Duration) -> Result<TcpStream, ConnectError> {
        let mut last = ConnectError::NoAddresses;
        for server in self.order() {
            for addr in server.addrs() {
                match timeout(limit, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        server.set_up(&self.name, true, &"");
                        return Ok(stream);
                    }
                    // Out of descriptors is this process's state, not the server's.
                    Ok(Err(e)) if is_local_shortage(&e) => return Err(ConnectError::Local(e)),
                    Ok(Err(e)) => {
                        server.set_up(&self.name, false, &e);
                        last = ConnectError::Refused(server.upstream.clone(), e);
                    }
                    Err(_) => {
                        server.set_up(&self.name, false, &"connect timed out");
                        last = ConnectError::TimedOut(server.upstream.clone(), limit);
                    }
                }
            }
        }
        Err(last)
    }

    /// Re-resolves names, retries those that never resolved, and runs health checks, for
    /// as long as the task lives.
    pub async fn maintain(self: Arc<Self>) {
        let mut resolve_tick = tokio::time::interval(self.config.resolve_interval);
        resolve_tick.reset();
        let mut health_tick = self.config.health_interval.map(tokio::time::interval);
        let mut retry_delay = RETRY_FIRST;
        let retry = tokio::time::sleep(retry_delay);
        tokio::pin!(retry);
        loop {
            let unresolved = self.servers.iter().any(|s| s.addrs().is_empty());
            tokio::select! {
                () = &mut retry, if unresolved => {
                    self.resolve_missing().await;
                    retry_delay = next_retry(retry_delay);
                    retry.as_mut().reset(tokio::time::Instant::now() + retry_delay);
                }
                _ = resolve_tick.tick() => self.re_resolve().await,
                _ = async { health_tick.as_mut().expect("guarded").tick().await }, if health_tick.is_some() => {
                    self.check_health().await;
                }
            }
        }
    }

    /// Asks again for the servers that have never resolved.
    async fn resolve_missing(&self) {
        for server in self.servers.iter().filter(|s| s.addrs().is_empty()) {
            match resolve(&server.upstream, &self.pins).await {
                Ok(addrs) => {
                    *server.addrs.lock().unwrap_or_else(|e| e.into_inner()) = addrs.clone();
                    server.set_up(&self.name, true, &"");
                    // Said once the server takes clients, so the line can be acted on.
                    info!("upstream {} resolves now, to {addrs:?}", server.upstream);
                }
                Err(e) => debug!("{e}; retrying"),
            }
        }
    }

    async fn re_resolve(&self) {
        for server in &self.servers {
            match resolve(&server.upstream, &self.pins).await {
                Ok(addrs) => {
                    let mut current = server.addrs.lock().unwrap_or_else(|e| e.into_inner());
                    if *current != addrs {
                        info!("upstream {} now resolves to {addrs:?}", server.upstream);
                        *current = addrs;
                    }
                }
                // Keep the last good answer: a DNS hiccup must not take the pool down.
                Err(e) => warn!("{e}; keeping the previous addresses"),
            }
        }
    }

    async fn check_health(&self) {
        for server in &self.servers {
            let Some(addr) = server.addrs().first().copied() else {
                server.set_up(&self.name, false, &"no addresses");
                continue;
            };
            match timeout(self.config.health_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(_probe)) => server.set_up(&self.name, true, &""),
                Ok(Err(e)) => server.set_up(&self.name, false, &e),
                Err(_) => server.set_up(&self.name, false, &"health check timed out"),
            }
        }
    }
}

/// The first retry of a name that did not resolve, and the longest wait between retries.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_LAST: Duration = Duration::from_secs(60);

/// The wait after one of `previous`: twice as long, up to [`RETRY_LAST`].
fn next_retry(previous: Duration) -> Duration {
    (previous * 2).min(RETRY_LAST)
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: no socket could be made at all.
pub fn is_local_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no socket for the upstream: {0}")]
    Local(io::Error),
    #[error("no server has an address yet (its names do not resolve)")]
    NoAddresses,
    #[error("{0} refused: {1}")]
    Refused(Upstream, io::Error),
    #[error("{0} did not answer within {1:?}")]
    TimedOut(Upstream, Duration),
}

async fn resolve(upstream: &Upstream, pins: &Pins) -> Result<Vec<SocketAddr>, ResolveError> {
    let error = |reason: String| ResolveError {
        upstream: upstream.to_string(),
        reason,
    };
    if let Some(ips) = pins.get(&upstream.host) {
        return Ok(ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, upstream.port))
            .collect());
    }
    let addrs: Vec<_> = lookup_host((upstream.host.as_str(), upstream.port))
        .await
        .map_err(|e| error(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(error("no addresses".into()));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Server i's name: a 64-byte label, which no resolver can encode, so without a pin
    /// the lookup fails here and no DNS query leaves the machine.
    fn name(i: usize) -> String {
        format!("{}{i}.example", "a".repeat(63))
    }

    async fn pool(balance: Balance, listeners: &[&tokio::net::TcpListener]) -> Arc<Pool> {
        let servers = (0..listeners.len())
            .map(|i| {
                format!("{}:{}", name(i), listeners[i].local_addr().unwrap().port())
                    .parse()
                    .unwrap()
            })
            .collect();
        let pins = (0..listeners.len())
            .map(|i| (name(i), vec![listeners[i].local_addr().unwrap().ip()]))
            .collect();
        let config = PoolConfig {
            name: "p".into(),
            servers,
            balance,
            health_interval: None,
            health_timeout: Duration::from_secs(1),
            resolve_interval: Duration::from_secs(60),
        };
        Pool::resolve(&config, Pins::new(pins)).await
    }

    async fn accepted_by(listeners: &[&tokio::net::TcpListener], stream: &TcpStream) -> usize {
        let local = stream.local_addr().unwrap();
        for (i, l) in listeners.iter().enumerate() {
            if let Ok(Ok((s, _))) = timeout(Duration::from_millis(200), l.accept()).await
                && s.peer_addr().unwrap() == local
            {
                return i;
            }
        }
        panic!("no listener accepted {local}");
    }

    #[tokio::test]
    async fn failover_prefers_the_first_and_skips_a_dead_server() {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(Balance::Failover, &[&a, &b]).await;
        let s = pool.connect(Duration::from_secs(1)).await.unwrap();
        assert_eq!(accepted_by(&[&a, &b], &s).await, 0);
        drop(a);
        let s = pool.connect(Duration::from_secs(1)).await.unwrap();
        assert_eq!(accepted_by(&[&b], &s).await, 0);
        assert!(!pool.servers()[0].is_up() && pool.servers()[1].is_up());
    }

    #[tokio::test]
    async fn re_resolution_follows_the_name_and_survives_a_failed_lookup() {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        let moved = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .unwrap();
        let pool = pool(Balance::Failover, &[&a]).await;
        let answer = |ip: &str| BTreeMap::from([(name(0), vec![ip.parse().unwrap()])]);
        pool.pins.replace(answer("127.0.0.2"));
        pool.re_resolve().await;
        let s = pool.connect(Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            accepted_by(&[&moved], &s).await,
            0,
            "connects follow the new address"
        );
        // No answer at all: keep the last good one.
        pool.pins.replace(BTreeMap::new());
        assert!(
            resolve(&pool.servers()[0].upstream, &pool.pins)
                .await
                .is_err()
        );
        pool.re_resolve().await;
        let s = pool.connect(Duration::from_secs(1)).await.unwrap();
        assert_eq!(accepted_by(&[&moved], &s).await, 0);
    }

    #[tokio::test]
    async fn health_checks_mark_servers_down_and_up() {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = a.local_addr().unwrap();
        let pool = pool(Balance::Failover, &[&a]).await;
        pool.check_health().await;
        assert!(pool.servers()[0].is_up());
        drop(a);
        pool.check_health().await;
        assert!(!pool.servers()[0].is_up());
        let _back = tokio::net::TcpListener::bind(addr).await.unwrap();
        pool.check_health().await;
        assert!(pool.servers()[0].is_up());
    }

    #[tokio::test]
    async fn a_pool_that_does_not_resolve_refuses_until_its_name_does() {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = PoolConfig {
            name: "p".into(),
            servers: vec![
                format!("{}:{}", name(0), a.local_addr().unwrap().port())
                    .parse()
                    .unwrap(),
            ],
            balance: Balance::Failover,
            health_interval: None,
            health_timeout: Duration::from_secs(1),
            resolve_interval: Duration::from_secs(60),
        };
        let pool = Pool::resolve(&config, Pins::default().into()).await;
        assert!(!pool.servers()[0].is_up());
        assert!(matches!(
            pool.connect(Duration::from_secs(1)).await,
            Err(ConnectError::NoAddresses)
        ));
        pool.resolve_missing().await;
        assert!(!pool.servers()[0].is_up(), "still no answer");
        pool.pins.replace(BTreeMap::from([(
            name(0),
            vec![a.local_addr().unwrap().ip()],
        )]));
        pool.resolve_missing().await;
        assert!(pool.servers()[0].is_up());
        let s = pool.connect(Duration::from_secs(1)).await.unwrap();
        assert_eq!(accepted_by(&[&a], &s).await, 0);
    }

    #[test]
    fn retries_back_off_to_the_longest_wait() {
        let waits: Vec<Duration> =
            std::iter::successors(Some(RETRY_FIRST), |d| Some(next_retry(*d)))
                .take(8)
                .collect();
        assert_eq!(waits[..3], [1, 2, 4].map(Duration::from_secs));
        assert_eq!(waits[7], RETRY_LAST);
    }

    #[tokio::test]
    async fn round_robin_alternates() {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(Balance::RoundRobin, &[&a, &b]).await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let s = pool.connect(Duration::from_secs(1)).await.unwrap();
            seen.push(accepted_by(&[&a, &b], &s).await);
        }
        assert_eq!(seen, [0, 1, 0, 1]);
    }
}
