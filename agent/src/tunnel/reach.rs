//! How a pod's tunnels reach their staging pod, shared by its ports: the
//! pod's namespace and name (for the staging API's port-forward) and, for
//! `auto`, which way last worked: direct while the pod IP answers, the API
//! once it proved unreachable, and direct tried again now and then by one
//! connection while the others stay on the API.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::model::Way;

/// What an `auto` connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Try the pod IP (with a short timeout), the API if it is unreachable.
    TryDirect,
    /// Straight to the API: the pod IP was unreachable a moment ago.
    Api,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Learned {
    /// Nothing tried yet, or the pod IP answered last time.
    Direct,
    /// The pod IP was unreachable; direct is tried again after `since` + the retry.
    Api { since: Instant },
}

/// The staging pod a tunnel's API port-forward goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StagingPod {
    pub namespace: String,
    pub name: String,
    /// Its IP as last pushed: a pod replaced under the same name comes
    /// with a new one, and so gets port-forward sessions of its own.
    pub ip: IpAddr,
}

/// What a pod's tunnels share about reaching it.
#[derive(Debug)]
pub struct PodWays {
    pod: RwLock<StagingPod>,
    learned: Mutex<Learned>,
    direct_retry: Duration,
}

impl PodWays {
    pub fn new(pod: StagingPod, direct_retry: Duration) -> Self {
        Self {
            pod: RwLock::new(pod),
            learned: Mutex::new(Learned::Direct),
            direct_retry,
        }
    }

    /// The staging pod, as last pushed.
    pub fn pod(&self) -> StagingPod {
        self.pod.read().clone()
    }

    /// After a push: new connections go to the pod as it is now.
    pub fn set_pod(&self, pod: StagingPod) {
        *self.pod.write() = pod;
    }

    fn learned(&self) -> MutexGuard<'_, Learned> {
        self.learned.lock()
    }

    /// The way for one `auto` connection at `now`. When the API's time is
    /// up, this connection tries direct and the clock restarts, so one
    /// connection per retry period pays for the try, not every one.
    pub fn plan(&self, now: Instant) -> Plan {
        let mut learned = self.learned();
        match *learned {
            Learned::Direct => Plan::TryDirect,
            Learned::Api { since } if now.duration_since(since) >= self.direct_retry => {
                *learned = Learned::Api { since: now };
                Plan::TryDirect
            }
            Learned::Api { .. } => Plan::Api,
        }
    }

    /// The pod IP answered (or refused: it is routable either way).
    pub fn direct_worked(&self) {
        *self.learned() = Learned::Direct;
    }

    /// The pod IP is unreachable from here: the API it is, for a while.
    pub fn direct_unreachable(&self, now: Instant) {
        *self.learned() = Learned::Api { since: now };
    }

    /// The way an `auto` tunnel takes now.
    pub fn auto_way(&self) -> Way {
        match *self.learned() {
            Learned::Direct => Way::Direct,
            Learned::Api { .. } => Way::Api,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ways() -> PodWays {
        PodWays::new(
            StagingPod {
                namespace: "staging".into(),
                name: "web".into(),
                ip: IpAddr::from([10, 0, 1, 100]),
            },
            Duration::from_secs(30),
        )
    }

    #[test]
    fn direct_first_then_the_api_until_the_retry_is_due() {
        let ways = ways();
        let start = Instant::now();
        assert_eq!(ways.plan(start), Plan::TryDirect);
        assert_eq!(ways.auto_way(), Way::Direct);
        ways.direct_unreachable(start);
        assert_eq!(ways.auto_way(), Way::Api);
        assert_eq!(ways.plan(start + Duration::from_secs(29)), Plan::Api);
        // Due: one connection tries direct, the next ones stay on the API.
        let due = start + Duration::from_secs(30);
        assert_eq!(ways.plan(due), Plan::TryDirect);
        assert_eq!(ways.plan(due), Plan::Api);
        // It answered: direct again for everyone.
        ways.direct_worked();
        assert_eq!(ways.plan(due), Plan::TryDirect);
        assert_eq!(ways.auto_way(), Way::Direct);
    }

    #[test]
    fn a_push_moves_the_pod_the_api_reaches() {
        let ways = ways();
        let moved = StagingPod {
            namespace: "team-a".into(),
            name: "web-2".into(),
            ip: IpAddr::from([10, 0, 1, 101]),
        };
        ways.set_pod(moved.clone());
        assert_eq!(ways.pod(), moved);
    }
}
