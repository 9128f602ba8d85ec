//! Tunnels: everything between a local port and a pod. This subsystem owns
//! the listening sockets, the forwarding threads (one runtime per core), each
//! connection's bytes (copy for small messages, splice for bulk), and the two
//! policies that place a tunnel: its port in the range and its own loopback
//! address in the block.
//!
//! May use: `events` (a tunnel announces its state and its traffic) and
//! `model`. Must never touch: the store or the disk (`state`), the names, the
//! cluster client (a `local` tunnel reaches its mirror only through the
//! [`LocalDialer`] it is given, a staging pod through the staging API only
//! through the [`StagingDialer`]), the HTTP API or the operator's tools.

mod accept;
mod address_ports;
mod addresses;
mod dial;
mod listen;
mod ports;
mod reach;
mod relay;
mod serve;
mod shards;
mod shared;
#[cfg(target_os = "linux")]
mod splice;
mod stats;
#[cfg(test)]
mod testing;

pub use accept::RunningTunnel;
pub use address_ports::AddressPorts;
pub use addresses::{AddressBlock, AddressBlockError, BlockFull, CannotListen};
pub use dial::{
    DialError, DialFuture, Dialers, LocalDialer, LocalStream, NoStagingCluster, StagingDialer,
};
pub use listen::bind_listener;
pub use ports::{PortPlan, PortRange};
pub use reach::{PodWays, StagingPod};
pub use shards::{default_count as default_forward_threads, ForwardShards, ShardLoads};
pub use shared::{combined_activity, Route, TunnelShared};
pub use stats::{latency_buckets, ConnectErrorKind, TunnelStats, SAMPLE_EVERY};
