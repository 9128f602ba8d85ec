//! The built-in demo (`run --demo`): a stand-in control plane that records the
//! agent's status reports, and three small HTTP servers on loopback that play
//! staging pods, pushed into the agent so a first run shows working tunnels.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::agent::{Agent, AgentError};
use crate::model::{Action, PodSpec};

/// The demo's pods: name and what the page says about it.
pub const DEMO_PODS: [(&str, &str); 3] = [
    ("demo-web", "the web front end"),
    ("demo-api", "the JSON API"),
    ("demo-docs", "the documentation site"),
];

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot listen for the demo on loopback: {0}")]
    Bind(#[from] std::io::Error),
    #[error("cannot push the demo pods: {0}")]
    Push(#[from] AgentError),
}

/// The demo's sockets, bound before the agent starts so that the agent can be
/// pointed at the stand-in control plane.
#[derive(Debug)]
pub struct Demo {
    control_plane: TcpListener,
    pods: Vec<(String, String, TcpListener)>,
}

/// The last report the stand-in control plane received.
type LastReport = Arc<Mutex<Option<Value>>>;

impl Demo {
    pub async fn bind() -> Result<Self, DemoError> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let control_plane = TcpListener::bind(loopback).await?;
        let mut pods = Vec::new();
        for (name, role) in DEMO_PODS {
            pods.push((
                name.to_owned(),
                role.to_owned(),
                TcpListener::bind(loopback).await?,
            ));
        }
        Ok(Self {
            control_plane,
            pods,
        })
    }

    /// Where the stand-in control plane listens.
    pub fn control_plane_url(&self) -> Result<String, DemoError> {
        Ok(format!("http://{}", self.control_plane.local_addr()?))
    }

    /// Serves the stand-in control plane and the demo pods on the agent's
    /// tracker (they stop with it) and pushes the pods into the agent.
    pub async fn start(self, agent: &Agent) -> Result<Vec<PodSpec>, DemoError> {
        let last_report: LastReport = Arc::default();
        let control_plane = Router::new()
            .route(
                "/api/v1/staging/status",
                get(last_status).post(record_status),
            )
            .with_state(last_report);
        spawn_server(agent, self.control_plane, control_plane);

        let mut specs = Vec::new();
        for (index, (name, role, listener)) in self.pods.into_iter().enumerate() {
            let port = listener.local_addr()?.port();
            let page = pod_page(&name, &role);
            let app = Router::new().fallback(get(move || {
                let page = page.clone();
                async move { ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response() }
            }));
            spawn_server(agent, listener, app);
            specs.push(PodSpec {
                id: format!("demo-pod-{}", index + 1),
                name,
                namespace: "staging".into(),
                image: "demo/http-server:local".into(),
                status: "running".into(),
                ip: Ipv4Addr::LOCALHOST.into(),
                node_name: "demo-node".into(),
                labels: [("app".to_owned(), "demo".to_owned())].into(),
                created_at: Some(chrono::Utc::now()),
                updated_at: Some(chrono::Utc::now()),
                ports: vec![crate::model::PortSpec::tcp(port)],
            });
        }
        agent
            .apply(Action::Sync, specs.clone(), Vec::new(), BTreeSet::new())
            .await?;
        Ok(specs)
    }
}

fn spawn_server(agent: &Agent, listener: TcpListener, app: Router) {
    let cancel = agent.cancellation().clone();
    agent.tracker().spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::warn!(error = %err, "demo server stopped");
        }
    });
}

async fn record_status(
    State(last): State<LastReport>,
    Json(report): Json<Value>,
) -> impl IntoResponse {
    tracing::debug!("demo control plane received a status report");
    if let Ok(mut slot) = last.lock() {
        *slot = Some(report);
    }
    Json(serde_json::json!({"status": "ok", "demo": true}))
}

async fn last_status(State(last): State<LastReport>) -> impl IntoResponse {
    let report = last.lock().ok().and_then(|slot| slot.clone());
    Json(serde_json::json!({"demo": true, "last_report": report}))
}

fn pod_page(name: &str, role: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{name} (demo)</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\">\
         <h1>{name}</h1><p>This is <b>{role}</b> of the K3s Local Agent demo: a small HTTP \
         server on loopback playing a staging pod. You reached it through the agent's tunnel.</p>\
         <p>DEMO MODE: no real staging cluster is involved.</p></body></html>"
    )
}
