//! Forwarding threads: one single-threaded tokio runtime per core (or as many
//! as `--forward-threads` says). Each tunnel listens on every shard; a new
//! connection is placed once, on the shard that accepted it or on a clearly
//! quieter one, and lives its whole life there, so its two sockets and its
//! task never move between threads afterwards (the work-stealing scheduler's
//! hand-offs were the largest user-space cost per request; see BENCHMARKS.md).

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Most forwarding threads by default, however many cores there are.
const MAX_DEFAULT_SHARDS: usize = 8;

/// The default number of forwarding threads: one per available core, at
/// least one, at most eight.
pub fn default_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_DEFAULT_SHARDS)
}

/// The forwarding runtimes, each on its own thread; they stop when this is
/// dropped (the tasks still on them are dropped with them).
#[derive(Debug)]
pub struct ForwardShards {
    shards: Arc<ShardSet>,
    stop: CancellationToken,
}

/// How busy each shard is (open connections), and where a connection one
/// of them accepts should live. Every shard is woken for each new connection
/// and the first to call accept gets it, which alone can leave one core with
/// most of a burst of long-lived connections (seen as a keep-alive run whose
/// req/s and p99 swung by a third from one run to the next); a shard that
/// finds another clearly quieter hands the connection over, as haproxy does.
#[derive(Debug, Clone)]
pub struct Balance {
    shards: Arc<ShardSet>,
    me: usize,
}

/// The pipes bulk transfers borrow (Linux's splice path; nothing elsewhere).
#[cfg(target_os = "linux")]
pub type Pipes = Arc<crate::tunnel::splice::PipePool>;
#[cfg(not(target_os = "linux"))]
pub type Pipes = Arc<()>;

/// What the shards share: their runtimes, how many connections each holds,
/// and the pipes their bulk transfers borrow.
#[derive(Debug)]
struct ShardSet {
    pipes: Pipes,
    handles: Vec<Handle>,
    loads: Vec<AtomicUsize>,
    /// Connections placed on a shard other than the one that accepted them.
    handed_over: AtomicU64,
}

/// A read-only view of how many connections each shard carries (for
/// `/metrics`).
#[derive(Debug, Clone)]
pub struct ShardLoads(Arc<ShardSet>);

impl ShardLoads {
    /// Open connections on each shard, in shard order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.loads.iter().map(|load| load.load(Ordering::Relaxed))
    }

    /// Connections moved at accept to a quieter shard, since the start.
    pub fn handed_over(&self) -> u64 {
        self.0.handed_over.load(Ordering::Relaxed)
    }
}

/// How many more connections a shard must hold than the quietest before it
/// hands a new one over. One would move connections back and forth on every
/// short-lived burst; two keeps a long-lived set within one of even.
const HANDOFF_IMBALANCE: usize = 2;

impl Balance {
    /// The shard a connection accepted here should live on, when it is not
    /// this one.
    pub fn quieter_shard(&self) -> Option<usize> {
        let loads = &self.shards.loads;
        let mine = loads[self.me].load(Ordering::Relaxed);
        let (quietest, load) = loads
            .iter()
            .enumerate()
            .map(|(index, load)| (index, load.load(Ordering::Relaxed)))
            .min_by_key(|&(_, load)| load)?;
        (load + HANDOFF_IMBALANCE <= mine).then_some(quietest)
    }

    /// The pipes every shard's bulk transfers borrow.
    pub fn pipes(&self) -> Pipes {
        Arc::clone(&self.shards.pipes)
    }

    /// This shard's index.
    pub fn me(&self) -> usize {
        self.me
    }

    /// The runtime of shard `index`.
    pub fn handle(&self, index: usize) -> &Handle {
        &self.shards.handles[index]
    }

    /// Counts a connection on shard `index` until the guard is dropped.
    pub fn carry(&self, index: usize) -> LoadGuard {
        if index != self.me {
            self.shards.handed_over.fetch_add(1, Ordering::Relaxed);
        }
        self.shards.loads[index].fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            shards: Arc::clone(&self.shards),
            index,
        }
    }
}

/// One open connection on a shard.
#[derive(Debug)]
pub struct LoadGuard {
    shards: Arc<ShardSet>,
    index: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.shards.loads[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl ForwardShards {
    pub fn new(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let count = count.max(1);
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            // Not joined on drop (that may happen inside an async context,
            // which must not block): each thread ends as soon as its runtime
            // sees the token.
            std::thread::Builder::new()
                .name(format!("forward-{index}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
        }
        Ok(Self {
            shards: Arc::new(ShardSet {
                loads: (0..count).map(|_| AtomicUsize::new(0)).collect(),
                handles,
                handed_over: AtomicU64::new(0),
                pipes: Pipes::default(),
            }),
            stop,
        })
    }

    /// Open connections on each shard, in shard order.
    pub fn loads(&self) -> ShardLoads {
        ShardLoads(Arc::clone(&self.shards))
    }

    /// Tasks alive on all shards (accept loops and connections).
    pub fn alive_tasks(&self) -> usize {
        self.shards
            .handles
            .iter()
            .map(|handle| handle.metrics().num_alive_tasks())
            .sum()
    }

    /// The runtimes to run a tunnel's accept loops on, one each, with the
    /// balance each of them accepts by.
    pub fn shards(&self) -> impl Iterator<Item = (&Handle, Balance)> {
        self.shards.handles.iter().enumerate().map(|(me, handle)| {
            (
                handle,
                Balance {
                    shards: Arc::clone(&self.shards),
                    me,
                },
            )
        })
    }
}

impl Drop for ForwardShards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
