//! The dashboard for browsers: the files of `ui/` (compiled into the binary,
//! so a headless agent needs nothing beside it), the current snapshot, and a
//! server-sent-events stream that pushes a fresh snapshot on every change.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::agent::Agent;
use crate::api::receiver::ApiError;
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
pub fn routes() -> Router<Agent> {
    Router::new()
        .route("/", get(|| asset("index.html")))
        // At the root, as in the desktop app, so the page's relative paths work in both.
        .route("/index.html", get(|| asset("index.html")))
        .route("/app.js", get(|| asset("app.js")))
        .route("/adapter.js", get(|| asset("adapter.js")))
        .route("/style.css", get(|| asset("style.css")))
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/events", get(events))
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
/// [`TRAFFIC_THROTTLE`], when only counters moved. Ends when the agent stops,
/// so a graceful shutdown never waits on an open dashboard.
async fn events(State(agent): State<Agent>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let watches = Watches {
        revisions: agent.events().watch_revision(),
        traffic: agent.events().watch_traffic(),
        last_sent: Instant::now(),
    };
    let stopped = agent.cancellation().clone().cancelled_owned();
    let first = stream::once({
        let agent = agent.clone();
        async move { snapshot_event(&agent) }
    });
    let changes = stream::unfold((agent, watches), |(agent, mut watches)| async move {
        watches.next_change().await?;
        let event = snapshot_event(&agent);
        Some((event, (agent, watches)))
    });
    let stream = first.chain(changes).take_until(stopped).map(Ok);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
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

fn snapshot_event(agent: &Agent) -> Event {
    match Event::default()
        .event("snapshot")
        .json_data(agent.snapshot())
    {
        Ok(event) => event,
        Err(err) => Event::default().event("error").data(err.to_string()),
    }
}
