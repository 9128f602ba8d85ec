//! The dashboard for browsers: the files of `ui/` (compiled into the binary,
//! so a headless agent needs nothing beside it), the current snapshot, and a
//! server-sent-events stream that pushes a fresh snapshot on every change.
//! Streams are capped, share one serialized snapshot per change, and a
//! stream whose client stopped reading is dropped.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures_util::stream::{self, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use crate::agent::Agent;
use crate::events::TrafficWatch;

/// The dashboard's files, by the name the page asks for.
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ui/index.html")),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ui/app.js")),
    ),
    (
        "adapter.js",
        "text/javascript; charset=utf-8",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ui/adapter.js")),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ui/style.css")),
    ),
];

/// Pings keep proxies and browsers from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A strict policy: the page loads only its own files and talks only to its agent.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Routes of the dashboard, merged into the agent's router.
pub fn routes(agent: &Agent) -> Router<Agent> {
    let streams = EventStreams::new(agent.config().max_event_streams);
    agent
        .tracker()
        .spawn(Arc::clone(&streams).drop_stalled(agent.cancellation().clone()));
    Router::new()
        .route("/", get(|| asset("index.html")))
        // At the root, as in the desktop app, so the page's relative paths work in both.
        .route("/index.html", get(|| asset("index.html")))
        .route("/app.js", get(|| asset("app.js")))
        .route("/adapter.js", get(|| asset("adapter.js")))
        .route("/style.css", get(|| asset("style.css")))
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/events", get(events))
        .layer(Extension(streams))
}

async fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(file, _, _)| *file == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => {
            ApiError::new(StatusCode::NOT_FOUND, format!("no such file: {name}")).into_response()
        }
    }
}

async fn snapshot(State(agent): State<Agent>) -> Response {
    Json(agent.snapshot()).into_response()
}

/// `event: snapshot` with the whole snapshot now, then after every burst of
/// changes (the revision watch coalesces them) and, at most once per
/// [`TRAFFIC_THROTTLE`], when only counters moved. A client that falls
/// behind gets the latest snapshot when it reads again, never a queue: a
/// snapshot is made when the stream is asked for its next event. Ends when
/// the agent stops, so a graceful shutdown never waits on an open dashboard.
async fn events(
    State(agent): State<Agent>,
    Extension(streams): Extension<Arc<EventStreams>>,
    closer: Option<Extension<ConnectionCloser>>,
) -> Response {
    let Some(slot) = streams.admit(closer.map(|Extension(closer)| closer)) else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many dashboard event streams are open ({}); close one, or raise \
                 --max-event-streams",
                streams.limit
            ),
        )
        .into_response();
    };
    let subscriber = Subscriber {
        watches: Watches {
            revisions: agent.events().watch_revision(),
            traffic: agent.events().watch_traffic(),
            last_sent: Instant::now(),
        },
        agent: agent.clone(),
        streams,
        slot,
        first: true,
    };
    let stopped = agent.cancellation().clone().cancelled_owned();
    let body = stream::unfold(subscriber, |mut subscriber| async move {
        subscriber.slot.state.reading();
        let frame = subscriber.next_frame().await?;
        subscriber.slot.state.delivered(subscriber.streams.now_ms());
        Some((stream::iter(frame.map(Ok::<Bytes, Infallible>)), subscriber))
    })
    .flatten()
    .take_until(stopped);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// One open event stream: what it waits on and its place among the open ones.
struct Subscriber {
    agent: Agent,
    watches: Watches,
    streams: Arc<EventStreams>,
    slot: Slot,
    first: bool,
}

impl Subscriber {
    /// The next frame to send: a snapshot (now, or after a change), or a
    /// keep-alive comment after a quiet while. `None` once the agent is gone.
    async fn next_frame(&mut self) -> Option<[Bytes; 3]> {
        if self.first {
            self.first = false;
        } else {
            tokio::select! {
                change = self.watches.next_change() => change?,
                _ = tokio::time::sleep(KEEP_ALIVE) => {
                    return Some([Bytes::from_static(b": keep-alive\n\n"), Bytes::new(), Bytes::new()]);
                }
            }
        }
        let revision = *self.watches.revisions.borrow();
        let json = self.streams.snapshot(&self.agent, revision).await;
        Some([
            Bytes::from_static(b"event: snapshot\ndata: "),
            json,
            Bytes::from_static(b"\n\n"),
        ])
    }
}

/// A stream that has been sent something and not asked for more for this
/// long has a client that stopped reading: it is dropped.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);
/// How often open streams are checked for stalls.
const STALL_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Closes the connection a request came on (the server puts one in every
/// request): how a stalled stream, which the server no longer polls, is
/// dropped.
#[derive(Debug, Clone)]
pub struct ConnectionCloser(pub CancellationToken);

/// The event streams of one router: how many are open (at most `limit`),
/// the snapshot they share, and the stall check.
#[derive(Debug)]
pub(super) struct EventStreams {
    limit: usize,
    open: parking_lot::Mutex<Vec<Weak<StreamState>>>,
    /// Serialized once and shared by every stream that wants it: the last
    /// snapshot, its revision and when it was made.
    cache: tokio::sync::Mutex<Option<CachedSnapshot>>,
    epoch: Instant,
}

/// A snapshot as JSON, shared by the streams.
#[derive(Debug)]
struct CachedSnapshot {
    revision: u64,
    taken: Instant,
    json: Bytes,
}

/// What the stall check knows of one stream.
#[derive(Debug)]
struct StreamState {
    /// When it last handed out a frame (ms since `epoch`), while the server
    /// has not asked for the next; 0 while it waits for a change.
    delivered_at_ms: AtomicU64,
    closer: Option<ConnectionCloser>,
}

impl StreamState {
    fn reading(&self) {
        self.delivered_at_ms.store(0, Ordering::Relaxed);
    }

    fn delivered(&self, now_ms: u64) {
        self.delivered_at_ms.store(now_ms.max(1), Ordering::Relaxed);
    }
}

/// A stream's place among the open ones; freed when the stream ends.
struct Slot {
    state: Arc<StreamState>,
    streams: Arc<EventStreams>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.streams.lock_open().retain(|weak| {
            weak.upgrade()
                .is_some_and(|state| !Arc::ptr_eq(&state, &self.state))
        });
    }
}

impl EventStreams {
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: parking_lot::Mutex::new(Vec::new()),
            cache: tokio::sync::Mutex::new(None),
            epoch: Instant::now(),
        })
    }

    fn lock_open(&self) -> parking_lot::MutexGuard<'_, Vec<Weak<StreamState>>> {
        self.open.lock()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A place for one more stream, unless `limit` are open.
    fn admit(self: &Arc<Self>, closer: Option<ConnectionCloser>) -> Option<Slot> {
        let mut open = self.lock_open();
        open.retain(|weak| weak.strong_count() > 0);
        if open.len() >= self.limit {
            return None;
        }
        let state = Arc::new(StreamState {
            delivered_at_ms: AtomicU64::new(0),
            closer,
        });
        open.push(Arc::downgrade(&state));
        Some(Slot {
            state,
            streams: Arc::clone(self),
        })
    }

    /// The snapshot as JSON for a stream that has seen `revision`: one made
    /// at that revision (so it holds every change the stream was woken
    /// for) within the traffic throttle (so its counters are fresh enough)
    /// serves every stream, and is made once.
    async fn snapshot(&self, agent: &Agent, revision: u64) -> Bytes {
        let mut cache = self.cache.lock().await;
        if let Some(cached) = cache.as_ref() {
            if cached.revision == revision && cached.taken.elapsed() < TRAFFIC_THROTTLE {
                return cached.json.clone();
            }
        }
        let taken = Instant::now();
        let json = match serde_json::to_vec(&agent.snapshot()) {
            Ok(json) => Bytes::from(json),
            Err(err) => Bytes::from(format!("{{\"error\":{:?}}}", err.to_string())),
        };
        *cache = Some(CachedSnapshot {
            revision,
            taken,
            json: json.clone(),
        });
        json
    }

    /// Closes the connection of every stream that handed out a frame more
    /// than [`STALL_LIMIT`] ago and was not asked for the next: its client
    /// is not reading, and what the server holds for it would only grow.
    pub(super) async fn drop_stalled(self: Arc<Self>, cancel: CancellationToken) {
        let mut every = tokio::time::interval(STALL_CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limit_ms = u64::try_from(STALL_LIMIT.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let now = self.now_ms();
            let stalled: Vec<Arc<StreamState>> = self
                .lock_open()
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|state| {
                    let at = state.delivered_at_ms.load(Ordering::Relaxed);
                    at != 0 && now.saturating_sub(at) > limit_ms
                })
                .collect();
            for state in stalled {
                if let Some(ConnectionCloser(closer)) = &state.closer {
                    tracing::info!(
                        "dropping a dashboard event stream whose client stopped reading"
                    );
                    closer.cancel();
                }
            }
        }
    }
}

/// The most often a dashboard is sent fresh counters.
pub const TRAFFIC_THROTTLE: Duration = Duration::from_millis(500);

/// What one event stream waits on.
struct Watches {
    revisions: watch::Receiver<u64>,
    traffic: TrafficWatch,
    last_sent: Instant,
}

impl Watches {
    /// Waits until a snapshot is due; `None` once the agent is gone.
    async fn next_change(&mut self) -> Option<()> {
        tokio::select! {
            changed = self.revisions.changed() => changed.ok()?,
            changed = self.traffic.changed() => {
                changed.ok()?;
                // Counters alone: wait out the throttle, but a real change
                // arriving meanwhile goes out at once.
                let due = self.last_sent + TRAFFIC_THROTTLE;
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    changed = self.revisions.changed() => changed.ok()?,
                }
            }
        }
        self.revisions.mark_unchanged();
        self.traffic.mark_unchanged();
        self.last_sent = Instant::now();
        Some(())
    }
}
