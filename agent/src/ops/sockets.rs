//! Who holds a TCP port on this machine: the listening socket's inode from
//! `/proc/net/tcp{,6}`, then the process whose descriptors include it; and
//! whose is a loopback connection: the uid that owns the peer's socket, from
//! the same tables. Linux only (elsewhere nothing is found); processes of
//! other users are seen only when running as root.

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
/// kernel's tables do not show it (not Linux, or the peer already left).
pub fn connection_owner(peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    use std::io::BufRead;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        // Line by line: with thousands of tunnels the table is large, and
        // this runs once per API connection.
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

/// Whether a `/proc/net/tcp{,6}` address (`0100007F:1F92`: the address's
/// bytes as the kernel's native-endian words, in hex, then the port) is
/// `want`; an IPv4 address matches its IPv4-mapped IPv6 form too.
fn same_endpoint(field: &str, want: SocketAddr) -> bool {
    let Some((address, port)) = field.split_once(':') else {
        return false;
    };
    if u16::from_str_radix(port, 16).ok() != Some(want.port()) {
        return false;
    }
    let words: Option<Vec<[u8; 4]>> = (0..address.len() / 8)
        .map(|i| {
            let word = address.get(i * 8..i * 8 + 8)?;
            u32::from_str_radix(word, 16).ok().map(u32::to_ne_bytes)
        })
        .collect();
    let Some(words) = words else {
        return false;
    };
    let found = match words.as_slice() {
        [one] => IpAddr::V4(Ipv4Addr::from(*one)),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(word);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return false,
    };
    canonical(found) == canonical(want.ip())
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
        let elsewhere = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(connection_owner(peer, elsewhere), None);
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
