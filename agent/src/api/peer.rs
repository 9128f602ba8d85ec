//! Who is on the other end of a loopback API connection: the user owning the
//! peer's socket, asked of the kernel only when a request needs to know
//! (`auth`), at most once per connection, and by at most
//! [`CONCURRENT_LOOKUPS`] connections at a time.
//!
//! A lookup is free to ask for: any local program can open connections
//! without a token. Open paths that show the same to everyone never ask, and
//! the bound keeps a flood of connections from taking the blocking threads
//! (and the CPU) every request shares.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{OnceCell, Semaphore};

/// How many connections' owners may be looked up at once; the rest wait.
pub const CONCURRENT_LOOKUPS: usize = 4;

/// How a connection's owner is found: `(peer, ours)` to the peer socket's uid.
pub type Lookup = Arc<dyn Fn(SocketAddr, SocketAddr) -> Option<u32> + Send + Sync>;

/// The lookups of one server: the kernel's answer, under one bound.
#[derive(Clone)]
pub struct PeerLookups {
    permits: Arc<Semaphore>,
    lookup: Lookup,
}

impl PeerLookups {
    /// Lookups through the kernel (`sock_diag`, one socket per query).
    pub fn kernel() -> Self {
        Self::with(Arc::new(crate::ops::connection_owner))
    }

    /// Lookups through `lookup`, bounded as every server's are.
    pub fn with(lookup: Lookup) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(CONCURRENT_LOOKUPS)),
            lookup,
        }
    }

    /// The peer of one accepted connection, not yet looked up.
    pub fn peer(&self, peer: SocketAddr, ours: SocketAddr) -> Peer {
        Peer(Arc::new(PeerInner {
            peer,
            ours,
            uid: OnceCell::new(),
            lookups: self.clone(),
        }))
    }
}

/// A loopback caller's connection, as a request sees it: its owner is found
/// on the first [`Peer::uid`] of any of its requests, then remembered.
#[derive(Clone)]
pub struct Peer(Arc<PeerInner>);

struct PeerInner {
    peer: SocketAddr,
    ours: SocketAddr,
    uid: OnceCell<Option<u32>>,
    lookups: PeerLookups,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("peer", &self.0.peer)
            .field("uid", &self.0.uid.get())
            .finish()
    }
}

impl Peer {
    /// The uid owning the peer's socket (`None`: the kernel did not show it,
    /// the caller having left, or no lookup could run).
    pub async fn uid(&self) -> Option<u32> {
        let inner = &self.0;
        *inner
            .uid
            .get_or_init(|| async {
                // A closed semaphore never happens (nothing closes it); if
                // it did, the caller would be unknown, so untrusted.
                let Ok(_permit) = inner.lookups.permits.acquire().await else {
                    return None;
                };
                let (peer, ours) = (inner.peer, inner.ours);
                let lookup = Arc::clone(&inner.lookups.lookup);
                tokio::task::spawn_blocking(move || lookup(peer, ours))
                    .await
                    .ok()
                    .flatten()
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};

    /// A lookup that counts its calls and the most running at once; each
    /// call waits for the gate to open.
    struct Counting {
        calls: AtomicUsize,
        running: AtomicUsize,
        most: AtomicUsize,
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl Counting {
        fn open(&self) {
            *self.open.lock().expect("gate") = true;
            self.opened.notify_all();
        }
    }

    fn counting() -> (Arc<Counting>, PeerLookups) {
        let counts = Arc::new(Counting {
            calls: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            open: Mutex::new(false),
            opened: Condvar::new(),
        });
        let seen = Arc::clone(&counts);
        let lookups = PeerLookups::with(Arc::new(move |_, _| {
            seen.calls.fetch_add(1, Ordering::SeqCst);
            let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
            seen.most.fetch_max(now, Ordering::SeqCst);
            // Held until the test opens the gate: lookups pile up.
            let open = seen.open.lock().expect("gate");
            drop(seen.opened.wait_while(open, |open| !*open));
            seen.running.fetch_sub(1, Ordering::SeqCst);
            Some(1000)
        }));
        (counts, lookups)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_is_looked_up_once_and_only_when_asked() {
        let (counts, lookups) = counting();
        counts.open();
        let idle = lookups.peer(addr(40000), addr(8082));
        let asked = lookups.peer(addr(40001), addr(8082));
        assert_eq!(counts.calls.load(Ordering::SeqCst), 0, "nothing asked yet");
        assert_eq!(asked.uid().await, Some(1000));
        assert_eq!(asked.clone().uid().await, Some(1000));
        assert_eq!(counts.calls.load(Ordering::SeqCst), 1);
        drop(idle);
        assert_eq!(counts.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_run_a_few_at_a_time() {
        let (counts, lookups) = counting();
        let asking: Vec<_> = (0..40)
            .map(|i| {
                let peer = lookups.peer(addr(41000 + i), addr(8082));
                tokio::spawn(async move { peer.uid().await })
            })
            .collect();
        // As many as the bound allows are inside the lookup, the rest wait.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while counts.running.load(Ordering::SeqCst) < CONCURRENT_LOOKUPS {
            assert!(
                tokio::time::Instant::now() < deadline,
                "lookups never started"
            );
            tokio::task::yield_now().await;
        }
        counts.open();
        for asked in asking {
            assert_eq!(asked.await.expect("task"), Some(1000));
        }
        assert_eq!(counts.calls.load(Ordering::SeqCst), 40);
        assert_eq!(counts.most.load(Ordering::SeqCst), CONCURRENT_LOOKUPS);
    }
}
