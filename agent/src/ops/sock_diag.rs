//! One TCP socket's owner, asked of the kernel by its addresses through
//! `sock_diag` netlink (`INET_DIAG`, as `ss` does): a single exact lookup,
//! where `/proc/net/tcp{,6}` would have to be read whole. Linux only.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// The kernel's "any socket cookie" (`INET_DIAG_NOCOOKIE`): without it an
/// exact lookup compares the cookie and answers `ESTALE`.
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// `TCP_LISTEN` in the kernel's TCP states.
const TCP_LISTEN: u8 = 10;

/// Why the kernel could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// No `sock_diag` here (the netlink family or `inet_diag` is missing).
    #[error("sock_diag is not available: {0}")]
    Unavailable(#[source] io::Error),
    #[error("sock_diag query failed: {0}")]
    Query(#[source] io::Error),
    #[error("sock_diag answer unreadable: {0}")]
    Decode(String),
}

/// What the kernel said about the socket asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub uid: u32,
    pub listening: bool,
    /// The socket's own address (for a listener, what it is bound to).
    pub local: SocketAddr,
}

/// The TCP socket whose local address is `local` and whose peer is
/// `remote`: for a connection, exactly that one; with `remote` unspecified
/// (address and port 0), the listener a new connection to `local` would
/// reach (bound to it or to a wildcard), as the kernel's own lookup picks
/// it. `Ok(None)` when there is none.
pub fn tcp_socket(local: SocketAddr, remote: SocketAddr) -> Result<Option<Found>, DiagError> {
    // An IPv4 connection to an IPv6 socket shows as IPv4-mapped on that
    // side; the kernel's lookup wants one family for both ends.
    let (local, remote) = match (local, remote) {
        (SocketAddr::V6(l), SocketAddr::V4(r)) => (
            SocketAddr::V6(l),
            SocketAddr::new(IpAddr::V6(r.ip().to_ipv6_mapped()), r.port()),
        ),
        (SocketAddr::V4(l), SocketAddr::V6(r)) => match r.ip().to_ipv4_mapped() {
            Some(v4) => (SocketAddr::V4(l), SocketAddr::new(IpAddr::V4(v4), r.port())),
            None if r.ip().is_unspecified() => (
                SocketAddr::V4(l),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), r.port()),
            ),
            None => return Ok(None),
        },
        same => same,
    };
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut socket_id = if local.is_ipv4() {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    socket_id.source_address = local.ip();
    socket_id.source_port = local.port();
    socket_id.destination_address = remote.ip();
    socket_id.destination_port = remote.port();
    socket_id.cookie = NO_COOKIE;
    let mut header = NetlinkHeader::default();
    // No NLM_F_DUMP: the kernel looks the one socket up in its hash tables.
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut request = vec![0; packet.buffer_len()];
    packet.serialize(&mut request);

    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Unavailable)?;
    socket.bind_auto().map_err(DiagError::Unavailable)?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(DiagError::Unavailable)?;
    socket.send(&request, 0).map_err(DiagError::Query)?;
    // The kernel answers a non-dump request within the send: one message,
    // the socket or an error.
    let (answer, _) = socket.recv_from_full().map_err(DiagError::Query)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&answer)
        .map_err(|err| DiagError::Decode(err.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            let id = &response.header.socket_id;
            Ok(Some(Found {
                uid: response.header.uid,
                listening: response.header.state == TCP_LISTEN,
                local: SocketAddr::new(id.source_address, id.source_port),
            }))
        }
        NetlinkPayload::Error(error) => match error.code.map(|code| -code.get()) {
            Some(libc::ENOENT) => Ok(None),
            // A kernel without `inet_diag` for this family.
            Some(libc::EINVAL | libc::EOPNOTSUPP | libc::EAFNOSUPPORT) => Err(
                DiagError::Unavailable(io::Error::from_raw_os_error(-error.raw_code())),
            ),
            Some(code) => Err(DiagError::Query(io::Error::from_raw_os_error(code))),
            None => Ok(None),
        },
        other => Err(DiagError::Decode(format!(
            "unexpected message type {}",
            other.message_type()
        ))),
    }
}

/// The connection `peer` → `ours`, seen from the peer's end: its socket's
/// owner, when that socket is still there.
pub fn connection_uid(peer: SocketAddr, ours: SocketAddr) -> Result<Option<u32>, DiagError> {
    Ok(tcp_socket(peer, ours)?
        .filter(|found| !found.listening)
        .map(|found| found.uid))
}

/// The listener a connection to `target` would reach: its owner and bound
/// address, `None` when nothing listens there.
pub fn listener_for(target: SocketAddr) -> Result<Option<Found>, DiagError> {
    let any = match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    Ok(tcp_socket(target, any)?.filter(|found| found.listening))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn own() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn a_connection_is_found_by_its_four_addresses() {
        for host in ["127.0.0.1", "[::1]"] {
            let listener = TcpListener::bind(format!("{host}:0")).expect("bind");
            let ours = listener.local_addr().expect("addr");
            let client = TcpStream::connect(ours).expect("connect");
            let (_accepted, peer) = listener.accept().expect("accept");
            assert_eq!(peer, client.local_addr().expect("addr"));
            assert_eq!(connection_uid(peer, ours).expect("sock_diag"), Some(own()));
            // The same ports, another address: no such socket.
            let other = SocketAddr::new(ours.ip(), 1);
            assert_eq!(connection_uid(peer, other).expect("sock_diag"), None);
        }
    }

    /// Needs root (as CI has) to act as `nobody`, through `setpriv`.
    #[test]
    fn a_connection_made_by_another_user_is_that_users() {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = listener.local_addr().expect("addr");
        let script = format!(
            "import socket, sys\n\
             s = socket.create_connection(('127.0.0.1', {}))\n\
             print('connected', flush=True)\n\
             sys.stdin.read()\n",
            ours.port()
        );
        let mut client = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv and python3 run");
        let mut line = String::new();
        BufReader::new(client.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "connected");
        let (_accepted, peer) = listener.accept().expect("accept");
        let found = connection_uid(peer, ours);
        drop(client.stdin.take());
        let _ = client.wait();
        assert_eq!(found.expect("sock_diag"), Some(65534));
    }

    #[test]
    fn an_ipv4_connection_to_a_dual_stack_listener_is_found() {
        let Ok(listener) = TcpListener::bind("[::]:0") else {
            return; // no IPv6 here
        };
        let port = listener.local_addr().expect("addr").port();
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (accepted, peer) = listener.accept().expect("accept");
        let ours = accepted.local_addr().expect("addr");
        assert_eq!(
            peer.ip().to_canonical(),
            client.local_addr().expect("addr").ip()
        );
        assert_eq!(connection_uid(peer, ours).expect("sock_diag"), Some(own()));
    }

    #[test]
    fn the_listener_a_connection_would_reach_is_found() {
        let specific = TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = specific.local_addr().expect("addr");
        let found = listener_for(at).expect("sock_diag").expect("a listener");
        assert_eq!((found.uid, found.local), (own(), at));

        // Bound to every address: reached through loopback too.
        let wildcard = TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = wildcard.local_addr().expect("addr").port();
        let found = listener_for(SocketAddr::from(([127, 0, 0, 1], port)))
            .expect("sock_diag")
            .expect("a listener");
        assert_eq!(found.local, SocketAddr::from(([0, 0, 0, 0], port)));

        drop(specific);
        assert_eq!(listener_for(at).expect("sock_diag"), None);
    }
}
