//! The agent's HTTP face: the router (the seed's API, the dashboard's
//! files, snapshot and event stream, `/metrics`), who may call it, and the
//! server loop under it.
//!
//! May use: `Agent` (every handler is a call into it), `model`, `events`,
//! and the read-only views of the core (`state`, `tunnel`, `cluster`,
//! `report`) that `/metrics` collects from. Must never be imported by the
//! core: the agent knows nothing of HTTP. Whoever starts an agent serves
//! this on a listener of its own ([`serve`]).

mod auth;
mod error;
mod metrics;
mod peer;
mod receiver;
mod server;
mod ui;

use tokio::net::TcpListener;

use crate::agent::Agent;

pub use error::ApiError;
pub use receiver::{
    parse_push, router, ParsedPush, MAX_BODY_BYTES, MAX_PODS_PER_PUSH, REQUEST_TIMEOUT,
};
pub use server::HEADER_READ_TIMEOUT;

/// Serves the agent's API on `listener` until the agent stops, as a task of
/// the agent's own tracker, so shutdown waits for open requests to finish.
pub fn serve(agent: &Agent, listener: TcpListener) {
    let router = router(agent.clone());
    let cancel = agent.cancellation().clone();
    agent
        .tracker()
        .spawn(server::serve(listener, router, cancel));
}
