//! K3s Local Agent: receives staging pods from a control plane, gives each a
//! local tunnel and a `<name>-staging.local` name, and reports back. This
//! library is the whole agent; the headless CLI and the tray app are thin
//! faces over [`agent::Agent`].

pub mod addresses;
pub mod agent;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod doctor;
pub mod events;
pub mod forward;
pub mod fsio;
pub mod listen;
pub mod metrics;
pub mod model;
pub mod names;
pub mod notices;
pub mod persist;
pub mod ports;
pub mod receiver;
pub mod relay;
pub mod report;
pub mod serve;
pub mod shards;
pub mod sockets;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod store;
pub mod ui;

pub use agent::{Agent, AgentError, ApplyOutcome};
pub use config::{Config, RunOverrides};

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
