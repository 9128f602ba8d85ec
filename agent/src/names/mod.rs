//! Names: where `<name>-staging.local` and `<name>-staging.localhost` are
//! written so that the system's resolver finds each pod's address. One kind
//! today: a marked block in a hosts file (`/etc/hosts` when it is writable,
//! else a private file), replaced whole and atomically. A second kind of
//! resolver is a sibling of `hosts`, chosen where `HostsFile::choose` is.
//!
//! May use: `state` (crash-safe file writes) and `model`. Must never touch:
//! the store, the tunnels, the cluster, the HTTP API.

mod hosts;

pub use hosts::{
    count_blocks, parse_block, render, HostEntry, HostsFile, NamesError, BLOCK_BEGIN, BLOCK_END,
    SYSTEM_HOSTS,
};
