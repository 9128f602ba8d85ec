//! The operator's tools around a running agent: `doctor` (what is wrong and
//! how to fix it; `staging_doctor` for the staging cluster), the CLI's client of the HTTP API, who holds a port on this
//! machine (`sockets`), the built-in demo, and the system changes the package
//! makes at install time (`system_setup`), and the desktop app's start-at-login
//! entry (`autostart`).
//!
//! May use: the core (`Agent`, `config`, `model`, `tunnel`'s policies).
//! Must never be used by the core: nothing in `agent`, `state`, `tunnel`,
//! `cluster` or `names` may import from here.

pub mod autostart;
pub mod client;
pub mod demo;
pub mod doctor;
#[cfg(target_os = "linux")]
mod sock_diag;
mod sockets;
pub mod staging_doctor;
pub mod system_setup;

pub use client::{AgentClient, ClientError};
pub use demo::{Demo, DemoError, DEMO_PODS};
pub(crate) use sockets::{connection_owner, listener_owner, own_uid};
