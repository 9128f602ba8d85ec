//! Listening sockets: how a tunnel's port is bound, and how each forwarding
//! shard waits on it and accepts a connection without registering it, so
//! the shard the connection is placed on registers it once.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pending connections the kernel queues per listener before refusing.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listening socket for a tunnel: address reuse (so a toggle can
/// re-listen at once despite connections in TIME_WAIT), a deep backlog, and
/// `TCP_NODELAY`, which Linux hands down to every accepted connection (one
/// system call per listener instead of one per connection). Fails with
/// `AddrInUse` when another process holds the port.
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// One shard's view of a tunnel's listening socket: woken by this shard's
/// reactor when a connection waits, and accepting it *without* registering
/// the new socket anywhere, so the shard the connection is placed on
/// registers it once. (tokio's `TcpListener` registers every accepted socket
/// with the accepting thread's reactor; placing it elsewhere then cost an
/// `epoll_ctl` delete and a second add per moved connection, 3 to 5 % of the
/// new-connection rate.)
///
/// tokio's one safe way to be told a descriptor is ready is through its own
/// socket types (registering a bare descriptor is `unsafe`), and a
/// `TcpStream`'s readiness is exactly epoll's readiness of the descriptor it
/// holds: for a listening socket, "readable" means a connection waits. So
/// the listening socket is held as one, and nothing of `TcpStream`'s own API
/// but that readiness is used on it.
#[derive(Debug)]
pub struct SharedListener {
    readiness: TcpStream,
}

impl SharedListener {
    /// Registers `listener` with the reactor of the runtime entered.
    pub fn register(listener: std::net::TcpListener) -> io::Result<Self> {
        let readiness = TcpStream::from_std(Socket::from(listener).into())?;
        Ok(Self { readiness })
    }

    /// Waits for a connection and accepts it, unregistered and non-blocking.
    pub async fn accept(&self) -> io::Result<std::net::TcpStream> {
        loop {
            self.readiness.readable().await?;
            match self
                .readiness
                .try_io(Interest::READABLE, || accept_unregistered(&self.readiness))
            {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                accepted => return accepted,
            }
        }
    }
}

/// `accept4` with the new socket non-blocking from the start (one system call).
#[cfg(target_os = "linux")]
fn accept_unregistered(listener: &TcpStream) -> io::Result<std::net::TcpStream> {
    use nix::sys::socket::{accept4, SockFlag};
    let accepted = accept4(listener, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)?;
    Ok(std::net::TcpStream::from(accepted))
}

/// `accept`, then the new socket made non-blocking.
#[cfg(not(target_os = "linux"))]
fn accept_unregistered(listener: &TcpStream) -> io::Result<std::net::TcpStream> {
    let (accepted, _peer) = socket2::SockRef::from(listener).accept()?;
    accepted.set_nonblocking(true)?;
    Ok(accepted.into())
}

/// Whether an accept failed only because that one connection was already
/// gone (reset or aborted by the client while it waited in the queue).
pub fn gone_before_accept(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn an_accepted_connection_is_non_blocking_and_carries_its_bytes() {
        let listener = bind_listener(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = SharedListener::register(listener).expect("register");
        let mut client = std::net::TcpStream::connect(addr).expect("connect");

        let accepted = shared.accept().await.expect("accept");
        // A blocking socket would stall the forwarding thread that reads it.
        #[cfg(unix)]
        assert!(socket2::SockRef::from(&accepted)
            .nonblocking()
            .expect("flags"));

        client.write_all(b"hello").expect("send");
        let registered = TcpStream::from_std(accepted).expect("register the connection");
        let mut buffer = [0u8; 16];
        registered.readable().await.expect("readable");
        let read = registered.try_read(&mut buffer).expect("read");
        assert_eq!(&buffer[..read], b"hello");
    }

    #[test]
    fn only_a_client_that_gave_up_is_passed_over_quietly() {
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::Interrupted,
        ] {
            assert!(gone_before_accept(&io::Error::from(kind)), "{kind:?}");
        }
        // Out of descriptors is the agent's problem: reported, with a pause.
        let no_descriptors = io::Error::from_raw_os_error(24);
        assert!(!gone_before_accept(&no_descriptors));
    }
}
