//! The agent's state: the pod store (the single source of truth in memory,
//! and the views read from it) and the state dir on disk (agent id, bearer
//! token, pods in SQLite, the desktop's settings), every file written
//! crash-safely.
//!
//! May use: `tunnel` (a pod's entry holds its tunnel's shared half and its
//! listeners), `events` and `model`. Must never touch: the HTTP API, the
//! cluster, the names, the operator's tools. Only `Agent` writes to it.

mod entry;
pub(crate) mod fsio;
mod persist;
mod store;

pub use entry::{PodEntry, PortTunnel};
pub use persist::{
    DesktopSettings, Identity, PersistError, RememberedPort, StateDb, StoredPod, WindowSize,
};
pub use store::{PodMap, Store, StoreWrite};
