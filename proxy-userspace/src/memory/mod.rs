//! What the relay holds in memory for its connections, against a limit. Every connection
//! has a [`Holding`]; a sampler measures them all (socket queues as the kernel charges
//! them, the kernel's redirect backlogs, which no socket is charged for, and userspace
//! buffers), publishes the sum, and acts as it nears the limit (`shed.rs`): new
//! connections stay out of the kernel, the biggest holders are throttled, and past the
//! limit the connections that hold much and drain slowly are reset.

mod holding;
mod limit;
mod shed;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

pub use holding::{Backlogs, Holding};
use shed::{Holder, Pressure};

use crate::{config::MemoryLimit, counters::ListenerMetrics, limits::client_key, notice::Notice};

/// How often every connection is measured: rarely while the relay holds little, since each
/// sample costs a few syscalls per connection (about 1.6% of a CPU per second for 3,000
/// kernel-mode connections), and often near the limit.
const SAMPLE_IDLE: Duration = Duration::from_secs(4);
const SAMPLE_CALM: Duration = Duration::from_secs(1);
const SAMPLE_PRESSED: Duration = Duration::from_millis(250);
/// Below this share of the limit, samples are [`SAMPLE_IDLE`] apart.
const IDLE_BELOW: (u64, u64) = (1, 8);

pub struct MemoryAccount {
    limit: AtomicU64,
    held: AtomicU64,
    pressure: Arc<AtomicU8>,
    holdings: Mutex<HashMap<u64, Arc<Holding>>>,
    next_id: AtomicU64,
    /// Connections registered since the sampler last looked.
    arrived: AtomicU64,
    kernel_closed_notice: Notice,
    throttle_notice: Notice,
    shed_notice: Notice,
}

/// A connection's place in the account, given up when dropped.
pub struct Registered {
    account: Arc<MemoryAccount>,
    pub holding: Arc<Holding>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.account
            .holdings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.holding.id);
    }
}

impl MemoryAccount {
    pub fn new(setting: MemoryLimit) -> Arc<Self> {
        let account = Arc::new(Self {
            limit: AtomicU64::new(0),
            held: AtomicU64::new(0),
            pressure: Arc::new(AtomicU8::new(Pressure::Calm as u8)),
            holdings: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            arrived: AtomicU64::new(0),
            kernel_closed_notice: Notice::default(),
            throttle_notice: Notice::default(),
            shed_notice: Notice::default(),
        });
        account.set_limit(setting);
        account
    }

    /// Applies a (re)loaded limit to the next sample.
    pub fn set_limit(&self, setting: MemoryLimit) {
        let (bytes, basis) = match setting {
            MemoryLimit::Bytes(bytes) => (bytes, "set"),
            MemoryLimit::Auto => match limit::default_limit() {
                (bytes, limit::Basis::Machine) => (bytes, "a quarter of the machine's memory"),
                (bytes, limit::Basis::Cgroup) => (bytes, "a quarter of the cgroup's limit"),
            },
        };
        if self.limit.swap(bytes, Ordering::Relaxed) != bytes {
            info!(
                "memory limit for connections: {} MiB ({basis})",
                bytes >> 20
            );
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The estimate at the last sample.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Enters a new connection from `client`, accepted on `listener`.
    pub fn register(
        self: &Arc<Self>,
        client: IpAddr,
        listener: &Arc<ListenerMetrics>,
    ) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.arrived.fetch_add(1, Ordering::Relaxed);
        let holding = Arc::new(Holding::new(
            id,
            client_key(client),
            Some(Arc::clone(listener)),
            Arc::clone(&self.pressure),
        ));
        self.holdings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&holding));
        Registered {
            account: Arc::clone(self),
            holding,
        }
    }

    /// Measures every connection at its pace, until the task is dropped.
    pub async fn run(self: Arc<Self>, backlogs: Option<Arc<dyn Backlogs>>) {
        let mut pressure = Pressure::Calm;
        let mut sampled = Instant::now();
        loop {
            tokio::time::sleep(SAMPLE_PRESSED).await;
            // New connections may grow fast: an idle relay that gets some looks again soon.
            let arrived = self.arrived.swap(0, Ordering::Relaxed) > 0;
            let period = if pressure > Pressure::Calm {
                SAMPLE_PRESSED
            } else if !arrived && self.held() < shed::share(self.limit(), IDLE_BELOW) {
                SAMPLE_IDLE
            } else {
                SAMPLE_CALM
            };
            if sampled.elapsed() + SAMPLE_PRESSED / 2 < period {
                if arrived {
                    self.arrived.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            sampled = Instant::now();
            pressure = self.sample(backlogs.as_deref(), pressure);
        }
    }

    /// One sample: measure, publish, and act on the pressure it shows. `before` is the
    /// pressure of the previous sample: only under pressure is each connection's drain
    /// measured, which reset decisions need.
    fn sample(&self, backlogs: Option<&dyn Backlogs>, before: Pressure) -> Pressure {
        let holdings: Vec<Arc<Holding>> = self
            .holdings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let with_acked = before >= Pressure::Throttling;
        let now = Instant::now();
        let mut held = 0;
        let holders: Vec<Holder> = holdings
            .iter()
            .map(|holding| {
                let measured = holding.measure(backlogs, with_acked);
                held += measured.held;
                let mut last = holding.acked.lock().unwrap_or_else(|e| e.into_inner());
                let drained = match (*last, measured.acked) {
                    (Some((then, at)), Some(acked)) => Some((acked.saturating_sub(then), now - at)),
                    _ => None,
                };
                *last = measured.acked.map(|acked| (acked, now));
                Holder {
                    id: holding.id,
                    client: holding.client,
                    held: measured.held,
                    drained,
                }
            })
            .collect();
        self.held.store(held, Ordering::Relaxed);
        let limit = self.limit();
        let pressure = Pressure::of(held, limit);
        self.pressure.store(pressure as u8, Ordering::Relaxed);
        if pressure >= Pressure::KernelClosed
            && before == Pressure::Calm
            && let Some(times) = self.kernel_closed_notice.count()
        {
            info!(
                "memory: {} MiB held of a {} MiB limit: new connections are relayed in userspace until it falls below half ({times} time(s) since the last notice)",
                held >> 20,
                limit >> 20
            );
        }
        let by_id: HashMap<u64, &Arc<Holding>> = holdings.iter().map(|h| (h.id, h)).collect();
        if pressure >= Pressure::Throttling {
            let throttle = shed::to_throttle(&holders, held, limit);
            let newly = throttle
                .iter()
                .filter(|id| !by_id[id].throttled())
                .inspect(|id| by_id[id].set_throttled(true))
                .count() as u64;
            if newly > 0
                && let Some(count) = self.throttle_notice.count_by(newly)
            {
                info!(
                    "memory: {} MiB held of a {} MiB limit: throttled the {count} biggest holder(s) since the last notice",
                    held >> 20,
                    limit >> 20
                );
            }
        } else if pressure == Pressure::Calm {
            for holding in &holdings {
                holding.set_throttled(false);
            }
        }
        if pressure == Pressure::Shedding {
            self.shed(&holders, &by_id, held, limit);
        }
        pressure
    }

    fn shed(&self, holders: &[Holder], by_id: &HashMap<u64, &Arc<Holding>>, held: u64, limit: u64) {
        let chosen = shed::to_shed(holders, held, limit);
        let (mut newly, mut freed) = (0, 0);
        for id in &chosen {
            let holding = by_id[id];
            // One that was asked already is ending: it is not counted twice.
            if !holding.shed() {
                continue;
            }
            newly += 1;
            if let Some(listener) = &holding.listener {
                listener.count_shed();
            }
            freed += holders.iter().find(|h| h.id == *id).map_or(0, |h| h.held);
        }
        if newly > 0
            && let Some(count) = self.shed_notice.count_by(newly)
        {
            warn!(
                "memory: {} MiB held past the {} MiB limit: reset {count} connection(s) since the last notice that held much and drained slowly, heaviest client address first ({} MiB in this round)",
                held >> 20,
                limit >> 20,
                freed >> 20
            );
        }
    }
}
