//! What a tunnel counts: its connections and bytes, its failures by kind,
//! its current and last error, the time each connection took to reach the
//! pod, and the last minute the dashboard draws. Figures only: announcing a
//! change is the tunnel's (`shared.rs`).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, MutexGuard};
use prometheus_client::metrics::histogram::Histogram;

/// Why a connection through a tunnel failed, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// The pod refused the connection.
    Refused,
    /// The pod did not answer in time.
    Timeout,
    /// The connection broke mid-stream.
    Reset,
    /// No route to the pod.
    Unreachable,
    /// A Kubernetes API port-forward could not be opened (to the local
    /// mirror, or to the staging pod through the staging API).
    Cluster,
    Other,
}

impl ConnectErrorKind {
    pub const ALL: [ConnectErrorKind; 6] = [
        Self::Refused,
        Self::Timeout,
        Self::Reset,
        Self::Unreachable,
        Self::Cluster,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Unreachable => "unreachable",
            Self::Cluster => "cluster",
            Self::Other => "other",
        }
    }

    pub(super) fn of(err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::TimedOut => Self::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Reset,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Self::Unreachable,
            _ => Self::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Buckets for every latency histogram the agent keeps (a tunnel's connects,
/// the status reports): 100 µs to about 3.3 s. Here, beside the histogram
/// a tunnel keeps, so tunnels need nothing from the metrics endpoint.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16)
}

/// How often the dashboard's throughput samples are taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How far back the dashboard looks.
const RECENT: Duration = Duration::from_secs(60);
/// Most connection outcomes kept for the last minute's percentiles.
const RECENT_CONNECTS: usize = 512;

/// The last minute of a tunnel: throughput samples and connection outcomes.
#[derive(Debug, Default)]
struct Recent {
    throughput: VecDeque<u64>,
    /// When, how long the connect took (seconds), and whether it worked.
    connects: VecDeque<(Instant, f64, bool)>,
}

/// Live counters of one tunnel, moved by its connections as they go.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) open: AtomicU64,
    pub(super) total: AtomicU64,
    pub(super) to_pod: AtomicU64,
    pub(super) from_pod: AtomicU64,
}

/// A snapshot of a tunnel's counters and errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStats {
    pub open_connections: u64,
    pub total_connections: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    /// The problem right now: set by a failed connection to the pod, cleared by the next good one.
    pub current_error: Option<String>,
    /// The most recent error ever seen, with its time.
    pub last_error: Option<(String, DateTime<Utc>)>,
}

#[derive(Debug, Default)]
struct Errors {
    current: Option<String>,
    last: Option<(String, DateTime<Utc>)>,
}

/// Everything one tunnel counts. Kept with the tunnel's target rather than
/// its listener, so turning forwarding off and on keeps the history.
#[derive(Debug)]
pub(super) struct Figures {
    pub(super) counters: Counters,
    errors: Mutex<Errors>,
    /// Failed connections by kind (indexed by `ConnectErrorKind`).
    error_counts: [AtomicU64; ConnectErrorKind::ALL.len()],
    /// Time to reach the pod, one observation per connection.
    connect_latency: Histogram,
    recent: Mutex<Recent>,
    /// Bytes moved at the last throughput sample.
    sampled_bytes: AtomicU64,
    /// Whether every throughput sample of the last minute is zero.
    quiet: AtomicBool,
}

impl Default for Figures {
    fn default() -> Self {
        Self {
            counters: Counters::default(),
            errors: Mutex::new(Errors::default()),
            error_counts: Default::default(),
            connect_latency: Histogram::new(latency_buckets()),
            recent: Mutex::new(Recent::default()),
            sampled_bytes: AtomicU64::new(0),
            quiet: AtomicBool::new(true),
        }
    }
}

impl Figures {
    fn lock_recent(&self) -> MutexGuard<'_, Recent> {
        self.recent.lock()
    }

    fn lock_errors(&self) -> MutexGuard<'_, Errors> {
        self.errors.lock()
    }

    /// Counts one connection attempt: how long reaching the pod took, and
    /// whether it worked.
    pub(super) fn note_connect(&self, seconds: f64, worked: bool) {
        self.connect_latency.observe(seconds);
        let now = Instant::now();
        let mut recent = self.lock_recent();
        recent.connects.push_back((now, seconds, worked));
        while recent.connects.len() > RECENT_CONNECTS
            || recent
                .connects
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > RECENT)
        {
            recent.connects.pop_front();
        }
    }

    /// Takes a throughput sample (bytes per second since the last one);
    /// returns whether the tunnel's line changed, and whether its last
    /// minute is all zeros now.
    pub(super) fn sample_throughput(&self) -> (bool, bool) {
        let bytes = self.counters.to_pod.load(Ordering::Relaxed)
            + self.counters.from_pod.load(Ordering::Relaxed);
        let moved = bytes.saturating_sub(self.sampled_bytes.swap(bytes, Ordering::Relaxed));
        // An idle tunnel whose last minute is already all zeros has nothing
        // to add: most tunnels, most of the time.
        if moved == 0 && self.quiet.load(Ordering::Relaxed) {
            return (false, true);
        }
        let mut recent = self.lock_recent();
        recent
            .throughput
            .push_back(moved / SAMPLE_EVERY.as_secs().max(1));
        let keep = usize::try_from(RECENT.as_secs() / SAMPLE_EVERY.as_secs().max(1)).unwrap_or(30);
        while recent.throughput.len() > keep {
            recent.throughput.pop_front();
        }
        let quiet = recent.throughput.iter().all(|b| *b == 0);
        self.quiet.store(quiet, Ordering::Relaxed);
        // Moved now, or fell back to zero: either way the dashboard's line changed.
        (true, quiet)
    }

    /// Failed connections of `kind` so far.
    pub(super) fn error_count(&self, kind: ConnectErrorKind) -> u64 {
        self.error_counts[kind.index()].load(Ordering::Relaxed)
    }

    /// Time to reach the pod, one observation per connection.
    pub(super) fn connect_latency(&self) -> &Histogram {
        &self.connect_latency
    }

    pub(super) fn stats(&self) -> TunnelStats {
        let errors = self.lock_errors();
        TunnelStats {
            open_connections: self.counters.open.load(Ordering::Relaxed),
            total_connections: self.counters.total.load(Ordering::Relaxed),
            bytes_to_pod: self.counters.to_pod.load(Ordering::Relaxed),
            bytes_from_pod: self.counters.from_pod.load(Ordering::Relaxed),
            current_error: errors.current.clone(),
            last_error: errors.last.clone(),
        }
    }

    /// Records a failed connection as the current problem; returns whether
    /// the problem changed (a flood of the same refusal changes it once).
    pub(super) fn record_error(&self, kind: ConnectErrorKind, message: &str) -> bool {
        self.error_counts[kind.index()].fetch_add(1, Ordering::Relaxed);
        let mut errors = self.lock_errors();
        errors.last = Some((message.to_owned(), Utc::now()));
        let changed = errors.current.as_deref() != Some(message);
        errors.current = Some(message.to_owned());
        changed
    }

    /// Records a connection cut mid-stream: history (`last_error`), not the
    /// current problem, since the tunnel itself is fine.
    pub(super) fn record_dropped(&self, kind: ConnectErrorKind, message: String) {
        self.error_counts[kind.index()].fetch_add(1, Ordering::Relaxed);
        self.lock_errors().last = Some((message, Utc::now()));
    }

    /// Clears the current problem after a good connection; returns whether
    /// there was one.
    pub(super) fn record_success(&self) -> bool {
        self.lock_errors().current.take().is_some()
    }
}

/// The last minute of several tunnels' figures together (a pod's ports):
/// their throughput added sample by sample (the newest samples aligned),
/// their connections pooled for the percentiles.
pub(super) fn combined<'a>(figures: impl Iterator<Item = &'a Figures>) -> crate::model::Activity {
    let now = Instant::now();
    let mut throughput: Vec<u64> = Vec::new();
    let mut worked: Vec<f64> = Vec::new();
    let (mut connections, mut errors) = (0u64, 0u64);
    for tunnel in figures {
        let recent = tunnel.lock_recent();
        let samples = recent.throughput.len();
        if samples > throughput.len() {
            let mut longer = vec![0; samples - throughput.len()];
            longer.append(&mut throughput);
            throughput = longer;
        }
        let offset = throughput.len() - samples;
        for (sum, sample) in throughput[offset..].iter_mut().zip(&recent.throughput) {
            *sum += sample;
        }
        for (at, seconds, ok) in &recent.connects {
            if now.duration_since(*at) > RECENT {
                continue;
            }
            connections += 1;
            if *ok {
                worked.push(seconds * 1000.0);
            } else {
                errors += 1;
            }
        }
    }
    worked.sort_by(f64::total_cmp);
    let percentile = |p: f64| -> Option<f64> {
        let last = worked.len().checked_sub(1)?;
        // Nearest rank: the smallest value at or above p of the samples.
        let rank = ((p * worked.len() as f64).ceil() as usize).clamp(1, last + 1) - 1;
        worked.get(rank).copied()
    };
    crate::model::Activity {
        throughput,
        sample_seconds: SAMPLE_EVERY.as_secs(),
        connect_p50_ms: percentile(0.50),
        connect_p99_ms: percentile(0.99),
        connections,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_counted_by_the_kind_the_metrics_name() {
        let cases = [
            (io::ErrorKind::ConnectionRefused, ConnectErrorKind::Refused),
            (io::ErrorKind::TimedOut, ConnectErrorKind::Timeout),
            (io::ErrorKind::ConnectionReset, ConnectErrorKind::Reset),
            (io::ErrorKind::ConnectionAborted, ConnectErrorKind::Reset),
            (io::ErrorKind::BrokenPipe, ConnectErrorKind::Reset),
            (
                io::ErrorKind::HostUnreachable,
                ConnectErrorKind::Unreachable,
            ),
            (
                io::ErrorKind::NetworkUnreachable,
                ConnectErrorKind::Unreachable,
            ),
            (io::ErrorKind::PermissionDenied, ConnectErrorKind::Other),
        ];
        for (io_kind, kind) in cases {
            assert_eq!(
                ConnectErrorKind::of(&io::Error::from(io_kind)),
                kind,
                "{io_kind:?}"
            );
        }
        // Each kind has its own slot and its own label.
        let labels: std::collections::BTreeSet<_> = ConnectErrorKind::ALL
            .iter()
            .map(|kind| kind.as_str())
            .collect();
        assert_eq!(labels.len(), ConnectErrorKind::ALL.len());
        for (index, kind) in ConnectErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), index, "{kind:?}");
        }
    }

    #[test]
    fn the_same_error_again_is_counted_but_changes_nothing() {
        let figures = Figures::default();
        assert!(figures.record_error(ConnectErrorKind::Refused, "refused"));
        assert!(!figures.record_error(ConnectErrorKind::Refused, "refused"));
        assert!(figures.record_error(ConnectErrorKind::Timeout, "silent"));
        assert_eq!(figures.error_count(ConnectErrorKind::Refused), 2);
        assert_eq!(figures.error_count(ConnectErrorKind::Timeout), 1);
        assert_eq!(figures.error_count(ConnectErrorKind::Other), 0);
        let stats = figures.stats();
        assert_eq!(stats.current_error.as_deref(), Some("silent"));
        assert_eq!(
            stats.last_error.map(|(message, _)| message).as_deref(),
            Some("silent")
        );
    }

    #[test]
    fn a_good_connection_clears_the_problem_and_keeps_the_history() {
        let figures = Figures::default();
        assert!(!figures.record_success(), "nothing to recover from");
        figures.record_error(ConnectErrorKind::Refused, "refused");
        assert!(figures.record_success());
        assert!(!figures.record_success());
        let stats = figures.stats();
        assert_eq!(stats.current_error, None);
        assert_eq!(
            stats.last_error.map(|(message, _)| message).as_deref(),
            Some("refused")
        );
    }

    #[test]
    fn a_connection_cut_mid_stream_is_history_not_the_current_problem() {
        let figures = Figures::default();
        figures.record_dropped(ConnectErrorKind::Reset, "cut".into());
        let stats = figures.stats();
        assert_eq!(stats.current_error, None);
        assert_eq!(
            stats.last_error.map(|(message, _)| message).as_deref(),
            Some("cut")
        );
        assert_eq!(figures.error_count(ConnectErrorKind::Reset), 1);
        // The same error afterwards is news: the current problem was clear.
        assert!(figures.record_error(ConnectErrorKind::Reset, "cut"));
    }

    #[test]
    fn counters_show_in_the_snapshot() {
        let figures = Figures::default();
        figures.counters.open.store(2, Ordering::Relaxed);
        figures.counters.total.store(7, Ordering::Relaxed);
        figures.counters.to_pod.store(100, Ordering::Relaxed);
        figures.counters.from_pod.store(250, Ordering::Relaxed);
        assert_eq!(
            figures.stats(),
            TunnelStats {
                open_connections: 2,
                total_connections: 7,
                bytes_to_pod: 100,
                bytes_from_pod: 250,
                current_error: None,
                last_error: None,
            }
        );
    }

    #[test]
    fn throughput_is_sampled_per_second_and_an_idle_minute_is_skipped() {
        let figures = Figures::default();
        // Idle from the start: nothing to draw.
        assert_eq!(figures.sample_throughput(), (false, true));
        figures.counters.to_pod.store(300, Ordering::Relaxed);
        figures.counters.from_pod.store(100, Ordering::Relaxed);
        assert_eq!(figures.sample_throughput(), (true, false));
        // Nothing moved since, but the line falls back to zero once.
        assert_eq!(figures.sample_throughput(), (true, false));
        let activity = combined(std::iter::once(&figures));
        assert_eq!(activity.throughput, vec![400 / SAMPLE_EVERY.as_secs(), 0]);
        assert_eq!(activity.sample_seconds, SAMPLE_EVERY.as_secs());
        // A minute of zeros: quiet again, and skipped from then on.
        let samples = RECENT.as_secs() / SAMPLE_EVERY.as_secs();
        for _ in 0..samples {
            figures.sample_throughput();
        }
        assert!(figures.quiet.load(Ordering::Relaxed));
        assert_eq!(figures.sample_throughput(), (false, true));
        let kept = combined(std::iter::once(&figures)).throughput.len();
        assert_eq!(kept as u64, samples);
    }

    #[test]
    fn a_pods_ports_add_up_newest_samples_aligned() {
        let (older, newer) = (Figures::default(), Figures::default());
        older.counters.to_pod.store(20, Ordering::Relaxed);
        older.sample_throughput();
        older.counters.to_pod.store(60, Ordering::Relaxed);
        older.sample_throughput();
        newer.counters.from_pod.store(100, Ordering::Relaxed);
        newer.sample_throughput();
        let per_second = |bytes: u64| bytes / SAMPLE_EVERY.as_secs();
        let activity = combined([&older, &newer].into_iter());
        assert_eq!(
            activity.throughput,
            vec![per_second(20), per_second(40) + per_second(100)]
        );
    }

    #[test]
    fn connect_times_give_percentiles_of_the_ones_that_worked() {
        let figures = Figures::default();
        for millis in 1..=100 {
            figures.note_connect(f64::from(millis) / 1000.0, true);
        }
        figures.note_connect(5.0, false);
        let activity = combined(std::iter::once(&figures));
        assert_eq!(activity.connections, 101);
        assert_eq!(activity.errors, 1);
        let p50 = activity.connect_p50_ms.expect("p50");
        let p99 = activity.connect_p99_ms.expect("p99");
        assert!((p50 - 50.0).abs() < 1e-9, "{p50}");
        assert!((p99 - 99.0).abs() < 1e-9, "{p99}");
        // None at all: no percentile rather than a zero.
        let idle = combined(std::iter::once(&Figures::default()));
        assert_eq!((idle.connect_p50_ms, idle.connections), (None, 0));
    }

    #[test]
    fn only_the_latest_connects_are_kept() {
        let figures = Figures::default();
        for _ in 0..RECENT_CONNECTS + 10 {
            figures.note_connect(0.001, true);
        }
        let activity = combined(std::iter::once(&figures));
        assert_eq!(activity.connections, RECENT_CONNECTS as u64);
    }
}
