//! Status reports to the control plane: `POST {url}/api/v1/staging/status`
//! every sync interval and soon after any change, with backoff while the
//! control plane is away, one log line per outage, and never blocking anything
//! else.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::cluster::ClusterStatus;
use crate::config::Config;
use crate::events::{AgentEvent, EventBus};
use crate::model::{ControlPlaneHealth, StatusReport, TunnelState};
use crate::state::Store;
use crate::tunnel::latency_buckets;

/// Path of the status endpoint on the control plane.
pub const STATUS_PATH: &str = "api/v1/staging/status";
/// How long after a change the report goes out (changes in that window share it).
pub const CHANGE_DEBOUNCE: Duration = Duration::from_millis(250);
/// First retry delay after a failed report; doubles up to the sync interval.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The delays between failed reports: each between half the plain doubling
/// (1 s, 2 s, ... up to the sync interval) and all of it, at random. Every
/// agent of a control plane loses it at the same moment in an outage; the
/// randomness spreads their retries, which would otherwise arrive in lockstep
/// when it comes back. Never longer than the delay before it was random.
fn retry_delays(interval: Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    // backon adds between 0 and all of the delay again: halving both ends
    // gives [d/2, d). Its `std` feature seeds each process's generator apart.
    backon::ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF / 2)
        .with_max_delay(interval / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}
/// Per-request limit, so a slow control plane cannot hold a report forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The last report on the way out must not hold up the exit.
const FINAL_REPORT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Why the reporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("invalid control plane URL {base}: {source}")]
    Url {
        base: reqwest::Url,
        source: <reqwest::Url as std::str::FromStr>::Err,
    },
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Why one status report did not reach the control plane. The control
/// plane's health (`/health`, the dashboard) carries its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeliveryError {
    #[error("request timed out: no answer within {seconds}s")]
    Timeout { seconds: u64 },
    #[error("connection refused or unreachable")]
    Unreachable,
    #[error("control plane answered {status} {reason}")]
    Refused { status: u16, reason: String },
    #[error("{message}")]
    Other { message: String },
}

impl From<reqwest::Error> for DeliveryError {
    /// A short reason, without reqwest's nested noise.
    fn from(err: reqwest::Error) -> Self {
        if err.is_timeout() {
            Self::Timeout {
                seconds: REQUEST_TIMEOUT.as_secs(),
            }
        } else if err.is_connect() {
            Self::Unreachable
        } else {
            Self::Other {
                message: err.to_string(),
            }
        }
    }
}

/// Sends status reports; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reporter {
    inner: Arc<ReporterInner>,
}

#[derive(Debug)]
struct ReporterInner {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    agent_id: String,
    demo: bool,
    interval: Duration,
    store: Store,
    health: watch::Sender<ControlPlaneHealth>,
    cluster: watch::Receiver<ClusterStatus>,
    metrics: ReportMetrics,
}

impl Reporter {
    /// A reporter for `config`'s control plane, and a receiver of its view of
    /// the control plane's health (for `/health` and the UI).
    pub fn new(
        config: &Config,
        agent_id: String,
        store: Store,
        cluster: watch::Receiver<ClusterStatus>,
    ) -> Result<(Self, watch::Receiver<ControlPlaneHealth>), ReportError> {
        let mut base = config.control_plane_url.clone();
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let endpoint = base.join(STATUS_PATH).map_err(|source| ReportError::Url {
            base: base.clone(),
            source,
        })?;
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            .user_agent(concat!("k3s-local-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (health, health_rx) = watch::channel(ControlPlaneHealth {
            url: config.control_plane_url.to_string(),
            ..ControlPlaneHealth::default()
        });
        Ok((
            Self {
                inner: Arc::new(ReporterInner {
                    client,
                    endpoint,
                    agent_id,
                    demo: config.demo,
                    interval: config.sync_interval,
                    store,
                    health,
                    cluster,
                    metrics: ReportMetrics::default(),
                }),
            },
            health_rx,
        ))
    }

    fn events(&self) -> &EventBus {
        self.inner.store.events()
    }

    /// The report as it would go out now.
    pub fn build_report(&self, status: &str) -> StatusReport {
        let staging_pods = self.inner.store.redirections();
        let count = |state| staging_pods.values().filter(|r| r.status == state).count();
        StatusReport {
            agent_id: self.inner.agent_id.clone(),
            status: status.to_owned(),
            total_pods: staging_pods.len(),
            running_pods: count(TunnelState::Active),
            failed_pods: count(TunnelState::Failed),
            staging_pods,
            kind_cluster_status: self.inner.cluster.borrow().word().to_owned(),
            kind_cluster_reason: self.inner.cluster.borrow().reason(),
            last_sync: self.inner.health.borrow().last_sync,
            timestamp: Utc::now(),
            demo: self.inner.demo,
        }
    }

    /// The reporter's counters and latency histogram, for `/metrics`.
    pub fn metrics(&self) -> &ReportMetrics {
        &self.inner.metrics
    }

    async fn send(&self, status: &str) -> Result<DateTime<Utc>, DeliveryError> {
        let started = std::time::Instant::now();
        let sent = self.send_once(status).await;
        self.inner
            .metrics
            .observe(sent.is_ok(), started.elapsed().as_secs_f64());
        sent
    }

    async fn send_once(&self, status: &str) -> Result<DateTime<Utc>, DeliveryError> {
        let report = self.build_report(status);
        tracing::Span::current().record("pods", report.total_pods);
        let response = self
            .inner
            .client
            .post(self.inner.endpoint.clone())
            .header("X-Agent-ID", &self.inner.agent_id)
            .json(&report)
            .send()
            .await?;
        let code = response.status();
        if code.is_success() {
            Ok(report.timestamp)
        } else {
            Err(DeliveryError::Refused {
                status: code.as_u16(),
                reason: code.canonical_reason().unwrap_or_default().to_owned(),
            })
        }
    }

    /// Reports until `cancel`: at start, every interval, and soon after each change.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut changes = self.events().watch_revision();
        let mut next = Instant::now();
        let mut backoff = retry_delays(self.inner.interval);
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // While the control plane is away, the backoff decides.
                    if failures == 0 {
                        next = next.min(Instant::now() + CHANGE_DEBOUNCE);
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            changes.mark_unchanged();
            // One span per attempt: its warnings name the control plane and
            // which attempt of an outage this is.
            let span = tracing::info_span!(
                "report",
                endpoint = %self.inner.endpoint,
                attempt = failures + 1,
                pods = tracing::field::Empty,
            );
            async {
                match self.send("running").await {
                    Ok(at) => {
                        if failures > 0 {
                            tracing::info!(failed_attempts = failures, "control plane reachable again");
                        }
                        let was_reachable = self.inner.health.borrow().reachable;
                        self.inner.health.send_modify(|h| {
                            h.reachable = Some(true);
                            h.last_sync = Some(at);
                            h.last_error = None;
                        });
                        if was_reachable != Some(true) {
                            self.events().publish(AgentEvent::ControlPlane {
                                reachable: true,
                                error: None,
                            });
                            // Our own event bumped the revision; it is not news to report.
                            changes.mark_unchanged();
                        }
                        failures = 0;
                        backoff = retry_delays(self.inner.interval);
                        next = Instant::now() + self.inner.interval;
                    }
                    Err(error) => {
                        if failures == 0 {
                            tracing::warn!(
                                endpoint = %self.inner.endpoint,
                                %error,
                                "control plane unreachable; retrying with backoff"
                            );
                            self.inner.health.send_modify(|h| {
                                h.reachable = Some(false);
                                h.last_error = Some(error.to_string());
                            });
                            self.events().publish(AgentEvent::ControlPlane {
                                reachable: false,
                                error: Some(error.to_string()),
                            });
                            changes.mark_unchanged();
                        } else {
                            tracing::debug!(%error, attempt = failures + 1, "status report failed again");
                            self.inner
                                .health
                                .send_modify(|h| h.last_error = Some(error.to_string()));
                        }
                        failures = failures.saturating_add(1);
                        // Never ends (no most attempts); the interval if it did.
                        next = Instant::now() + backoff.next().unwrap_or(self.inner.interval);
                    }
                }
            }
            .instrument(span)
            .await;
        }
    }

    /// One last report saying we stopped; bounded so the exit is prompt.
    pub async fn send_final(&self) {
        match tokio::time::timeout(FINAL_REPORT_TIMEOUT, self.send("stopped")).await {
            Ok(Ok(_)) => tracing::info!("told the control plane we stopped"),
            Ok(Err(error)) => tracing::debug!(%error, "final status report not delivered"),
            Err(_) => tracing::debug!("final status report timed out"),
        }
    }
}

/// The status reporter's figures.
#[derive(Debug, Clone)]
pub struct ReportMetrics {
    pub(crate) outcomes: Family<[(&'static str, &'static str); 1], Counter>,
    pub(crate) latency: Histogram,
}

impl Default for ReportMetrics {
    fn default() -> Self {
        Self {
            outcomes: Family::default(),
            latency: Histogram::new(latency_buckets()),
        }
    }
}

impl ReportMetrics {
    /// Counts one report and how long the control plane took.
    pub fn observe(&self, delivered: bool, seconds: f64) {
        let result = if delivered { "success" } else { "failure" };
        self.outcomes.get_or_create(&[("result", result)]).inc();
        self.latency.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each delay lies between half the plain doubling and all of it, the
    /// last ones under the sync interval; two reporters draw different ones.
    #[test]
    fn retry_delays_double_with_jitter_up_to_the_interval() {
        let interval = Duration::from_secs(30);
        let drawn: Vec<Duration> = retry_delays(interval).take(8).collect();
        let plain = [1, 2, 4, 8, 16, 30, 30, 30].map(Duration::from_secs);
        for (delay, plain) in drawn.iter().zip(plain) {
            assert!(
                *delay >= plain / 2 && *delay < plain,
                "{delay:?} outside [{:?}, {plain:?}): {drawn:?}",
                plain / 2
            );
        }
        let others: Vec<Vec<Duration>> = (0..4)
            .map(|_| retry_delays(interval).take(8).collect())
            .collect();
        assert!(
            others.iter().any(|other| *other != drawn),
            "five reporters drew the same delays: {drawn:?}"
        );
    }

    #[test]
    fn a_refused_report_names_the_status_and_serializes_by_kind() {
        let refused = DeliveryError::Refused {
            status: 500,
            reason: "Internal Server Error".to_owned(),
        };
        assert_eq!(
            refused.to_string(),
            "control plane answered 500 Internal Server Error"
        );
        let json = serde_json::to_value(&refused).expect("serializes");
        assert_eq!(json["kind"], "refused");
        assert_eq!(json["status"], 500);
        assert_eq!(
            DeliveryError::Timeout { seconds: 10 }.to_string(),
            "request timed out: no answer within 10s"
        );
    }
}
