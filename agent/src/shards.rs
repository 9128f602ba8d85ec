//! Forwarding threads: one single-threaded tokio runtime per core. Each
//! tunnel listens on every shard, and a connection lives its whole life on
//! the shard that accepted it, so its two sockets and its task never move
//! between threads (the work-stealing scheduler's hand-offs were the largest
//! user-space cost per request; see BENCHMARKS.md).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Most forwarding threads, however many cores there are.
const MAX_SHARDS: usize = 8;

/// The forwarding runtimes, each on its own thread; they stop when this is
/// dropped (the tasks still on them are dropped with them).
#[derive(Debug)]
pub struct ForwardShards {
    handles: Vec<Handle>,
    loads: Arc<[AtomicUsize]>,
    stop: CancellationToken,
}

/// How busy each shard is (open connections), so that a busier shard can let
/// a quieter one take the next connection: every shard is woken for each new
/// connection and the first to call accept gets it, which alone can leave
/// one core with most of a burst of long-lived connections.
#[derive(Debug, Clone)]
pub struct Balance {
    loads: Arc<[AtomicUsize]>,
    me: usize,
}

impl Balance {
    /// Whether another shard holds fewer connections than this one.
    pub fn others_are_quieter(&self) -> bool {
        let mine = self.loads[self.me].load(Ordering::Relaxed);
        self.loads
            .iter()
            .any(|load| load.load(Ordering::Relaxed) < mine)
    }

    /// Counts a connection on this shard until the guard is dropped.
    pub fn carry(&self) -> LoadGuard {
        self.loads[self.me].fetch_add(1, Ordering::Relaxed);
        LoadGuard(self.clone())
    }
}

/// One open connection on a shard.
#[derive(Debug)]
pub struct LoadGuard(Balance);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.loads[self.0.me].fetch_sub(1, Ordering::Relaxed);
    }
}

impl ForwardShards {
    /// One shard per available core (at least one, at most eight).
    pub fn per_core() -> io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(cores.clamp(1, MAX_SHARDS))
    }

    pub fn new(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let count = count.max(1);
        let mut shards = Self {
            loads: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            handles: Vec::with_capacity(count),
            stop: stop.clone(),
        };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            shards.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            // Not joined on drop (that may happen inside an async context,
            // which must not block): each thread ends as soon as its runtime
            // sees the token.
            std::thread::Builder::new()
                .name(format!("forward-{index}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
        }
        Ok(shards)
    }

    /// Tasks alive on all shards (accept loops and connections).
    pub fn alive_tasks(&self) -> usize {
        self.handles
            .iter()
            .map(|handle| handle.metrics().num_alive_tasks())
            .sum()
    }

    /// The runtimes to run a tunnel's accept loops on, one each, with the
    /// balance each of them accepts by.
    pub fn shards(&self) -> impl Iterator<Item = (&Handle, Balance)> {
        self.handles.iter().enumerate().map(|(me, handle)| {
            (
                handle,
                Balance {
                    loads: Arc::clone(&self.loads),
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
