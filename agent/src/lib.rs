//! K3s Local Agent: receives staging pods from a control plane, gives each a
//! local tunnel and a `<name>-staging.local` name, and reports back. This
//! library is the whole agent; the headless CLI and the tray app are thin
//! faces over [`agent::Agent`].

// The core: the agent and the subsystems it drives. None of these imports
// `api`, `ops` or `launch` (agent/tests/layers.rs holds the line).
pub mod agent; // the one owner and writer of state: start-up, operations, tunnel bookkeeping
pub mod cluster; // the local mirror: apply, garbage collection, watch, the port-forward dialer
pub mod names; // where pod names are written for the system's resolver
pub mod state; // the pod store in memory and the state dir on disk
pub mod tunnel; // listeners, forwarding threads, relaying bytes, port and address policy

// Shared by the core and its faces.
pub mod config; // settings: defaults, TOML, environment, flags
pub mod events; // what the agent announces: typed events and coalescing watches
pub mod model; // wire types and validation
pub mod notices; // what the desktop tells the user, decided from snapshots
pub mod report; // status reports to the control plane

// The faces and tools around the core.
pub mod api; // the HTTP face: router, auth, dashboard stream, metrics, server
pub mod launch; // starting the core with its HTTP face (and the demo)
pub mod ops; // operator tools: doctor, the CLI's client, sockets, the demo

pub use agent::{Agent, AgentError, ApplyOutcome};
pub use config::{Config, RunOverrides};
pub use launch::{launch, start, LaunchError};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in colour only on
/// a terminal; for the binaries (the CLI and the tray app).
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
