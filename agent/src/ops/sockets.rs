//! Who holds a TCP port on this machine: the listening socket's inode from
//! `/proc/net/tcp{,6}`, then the process whose descriptors include it; whose
//! is a loopback connection (the uid that owns the peer's socket) and whose
//! the listener a connection would reach, each one socket asked of the
//! kernel through `sock_diag`. Linux only (elsewhere nothing is found);
//! processes of other users are seen only when running as root.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A process holding a port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    pub pid: u32,
    /// The process name (`/proc/<pid>/comm`).
    pub name: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.name)
    }
}

/// The processes listening on TCP `port` (any local address).
pub fn listeners_on(port: u16) -> Vec<Holder> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut holders = BTreeSet::new();
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds {
            let name = std::fs::read_to_string(process.path().join("comm"))
                .map(|n| n.trim().to_owned())
                .unwrap_or_else(|_| "?".to_owned());
            holders.insert(Holder { pid, name });
        }
    }
    holders.into_iter().collect()
}

/// Whether any socket listens on TCP `port`, whoever holds it.
pub fn is_listening(port: u16) -> bool {
    !listening_inodes(port).is_empty()
}

/// Inodes of sockets listening on `port`, from the kernel's TCP tables.
fn listening_inodes(port: u16) -> BTreeSet<u64> {
    const LISTEN: &str = "0A";
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if *state == LISTEN && local_port == Some(port) {
                if let Ok(inode) = inode.parse() {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

/// The uid owning the socket at `peer` that is connected to `ours`: for a
/// connection accepted on loopback, the user who made it. `None` when the
/// kernel does not show it (not Linux, or the peer already left).
///
/// One `sock_diag` query for that socket: reading `/proc/net/tcp{,6}` instead
/// costs a walk of every socket on the machine per call (with thousands of
/// tunnels, milliseconds each), which any local caller could make the agent
/// pay once per connection. The tables are read only where the kernel has no
/// `sock_diag` (built without `inet_diag`).
pub fn connection_owner(peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    #[cfg(target_os = "linux")]
    match super::sock_diag::connection_uid(peer, ours) {
        Ok(uid) => return uid,
        Err(super::sock_diag::DiagError::Unavailable(err)) => {
            tracing::debug!(error = %err, "no sock_diag: reading the socket tables");
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot ask the kernel whose a connection is");
            return None;
        }
    }
    connection_owner_from_tables(peer, ours)
}

/// [`connection_owner`] from the whole `/proc/net/tcp{,6}` tables: the
/// fallback for kernels without `sock_diag`.
fn connection_owner_from_tables(peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    use std::io::BufRead;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        for line in std::io::BufReader::new(file).lines().skip(1) {
            let Ok(line) = line else {
                break;
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
            let (Some(local), Some(remote), Some(uid)) =
                (fields.get(1), fields.get(2), fields.get(7))
            else {
                continue;
            };
            if same_endpoint(local, peer) && same_endpoint(remote, ours) {
                return uid.parse().ok();
            }
        }
    }
    None
}

/// The listening socket a connection to `target` would reach, and its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerOwner {
    pub uid: u32,
    /// The address it is bound to (`target`'s, or a wildcard).
    pub bound: SocketAddr,
}

/// Who owns the listener that a connection to `target` would reach, before
/// anything is sent to it. `None` when nothing listens there, or off Linux.
pub fn listener_owner(target: SocketAddr) -> Option<ListenerOwner> {
    #[cfg(target_os = "linux")]
    match super::sock_diag::listener_for(target) {
        Ok(found) => {
            return found.map(|found| ListenerOwner {
                uid: found.uid,
                bound: found.local,
            })
        }
        Err(err) => {
            // Kernels without `inet_diag`: the tables say the same, slower.
            tracing::debug!(error = %err, "no sock_diag: reading the socket tables");
        }
    }
    listener_owner_from_tables(target)
}

/// [`listener_owner`] from `/proc/net/tcp{,6}`: a listener on `target`'s
/// port bound to its address or to a wildcard (the specific one first, as
/// the kernel prefers it).
fn listener_owner_from_tables(target: SocketAddr) -> Option<ListenerOwner> {
    const LISTEN: &str = "0A";
    let mut wildcard = None;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(uid)) =
                (fields.get(1), fields.get(3), fields.get(7))
            else {
                continue;
            };
            let (Some(bound), Ok(uid)) = (parse_endpoint(local), uid.parse()) else {
                continue;
            };
            if *state != LISTEN || bound.port() != target.port() {
                continue;
            }
            if canonical(bound.ip()) == canonical(target.ip()) {
                return Some(ListenerOwner { uid, bound });
            }
            if bound.ip().is_unspecified() && wildcard.is_none() {
                wildcard = Some(ListenerOwner { uid, bound });
            }
        }
    }
    wildcard
}

/// This process's effective uid (`None` off Linux).
pub fn own_uid() -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        Some(nix::unistd::geteuid().as_raw())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// A `/proc/net/tcp{,6}` address (`0100007F:1F92`: the address's bytes as
/// the kernel's native-endian words, in hex, then the port).
fn parse_endpoint(field: &str) -> Option<SocketAddr> {
    let (address, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..address.len() / 8)
        .map(|i| {
            let word = address.get(i * 8..i * 8 + 8)?;
            u32::from_str_radix(word, 16).ok().map(u32::to_ne_bytes)
        })
        .collect();
    let ip = match words?.as_slice() {
        [one] => IpAddr::V4(Ipv4Addr::from(*one)),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(word);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a `/proc/net/tcp{,6}` address is `want`; an IPv4 address matches
/// its IPv4-mapped IPv6 form too.
fn same_endpoint(field: &str, want: SocketAddr) -> bool {
    parse_endpoint(field).is_some_and(|found| {
        found.port() == want.port() && canonical(found.ip()) == canonical(want.ip())
    })
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn finds_this_process_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let holders = listeners_on(port);
        assert!(
            holders.iter().any(|h| h.pid == std::process::id()),
            "{holders:?}"
        );
        drop(listener);
        assert!(listeners_on(port).is_empty());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_loopback_connection_is_owned_by_the_user_who_made_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(ours).expect("connect");
        let (_accepted, peer) = listener.accept().expect("accept");
        assert_eq!(peer, client.local_addr().expect("addr"));
        assert_eq!(connection_owner(peer, ours), own_uid());
        assert_eq!(connection_owner_from_tables(peer, ours), own_uid());
        let elsewhere = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(connection_owner(peer, elsewhere), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_listeners_owner_is_the_same_from_the_kernel_and_the_tables() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = listener.local_addr().expect("addr");
        let own = own_uid().expect("uid");
        let expected = Some(ListenerOwner {
            uid: own,
            bound: at,
        });
        assert_eq!(listener_owner(at), expected);
        assert_eq!(listener_owner_from_tables(at), expected);
        drop(listener);
        assert_eq!(listener_owner(at), None);
        assert_eq!(listener_owner_from_tables(at), None);
    }

    #[test]
    fn kernel_addresses_read_back() {
        let v4 = SocketAddr::from(([127, 0, 0, 1], 8082));
        let word = u32::from_ne_bytes([127, 0, 0, 1]);
        assert!(same_endpoint(&format!("{word:08X}:1F92"), v4));
        assert!(!same_endpoint(&format!("{word:08X}:1F93"), v4));
        let mapped: Vec<String> = [
            [0u8, 0, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0xff, 0xff],
            [127, 0, 0, 1],
        ]
        .iter()
        .map(|bytes| format!("{:08X}", u32::from_ne_bytes(*bytes)))
        .collect();
        assert!(same_endpoint(&format!("{}:1F92", mapped.concat()), v4));
    }
}
