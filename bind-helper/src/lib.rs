//! The low-port bind helper's library: the wire protocol, the policy on
//! which addresses it binds, and the client the agent calls when its own
//! `bind` of a port below 1024 fails with `EACCES`.
//!
//! Why a helper: the desktop app must not carry file capabilities (they put
//! the process in secure-execution mode, and GLib may then refuse the
//! session bus), so only the tiny `k3s-local-agent-bind` binary gets
//! `cap_net_bind_service=+ep`, binds on the agent's behalf and passes each
//! listening socket back over a Unix socket.

pub mod client;
pub mod policy;
pub mod protocol;

pub use client::{bind_via_helper, BindHelper, BindHelperError};
