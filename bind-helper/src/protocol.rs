//! The helper's wire protocol, spoken on its standard input, one end of a
//! Unix stream socket pair (standard output and error are not protocol):
//!
//! - request, one per line: `tcp <ipv4> <port>\n`, at most [`MAX_LINE`]
//!   bytes before the newline;
//! - reply, one per request, in order: `ok\n` with the listening socket
//!   attached (`SCM_RIGHTS`, exactly one descriptor), or
//!   `error refused <why>\n` (policy or malformed request), or
//!   `error os <errno> <why>\n` (the `bind`/`listen` itself failed), with no
//!   descriptor;
//! - the helper exits when its standard input reaches end of file.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Longest request line, newline not counted.
pub const MAX_LINE: usize = 200;
/// Longest reply line a client reads before giving up on the helper.
pub const MAX_REPLY: usize = 1024;

/// A request the helper understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A TCP listening socket bound to this address.
    Tcp(SocketAddrV4),
}

impl Request {
    /// The request's line, newline included.
    pub fn encode(&self) -> String {
        match self {
            Request::Tcp(addr) => format!("tcp {} {}\n", addr.ip(), addr.port()),
        }
    }
}

/// Why a request line is not one the helper serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("request is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("request is not printable ASCII")]
    NotText,
    #[error("expected `tcp <ipv4> <port>`, got {0:?}")]
    Syntax(String),
    #[error("{0} is not served: only TCP listening sockets are")]
    Transport(String),
    #[error("{0} is an IPv6 address: only IPv4 pod addresses are served")]
    Ipv6(Ipv6Addr),
    #[error("{0:?} is not an IPv4 address")]
    Address(String),
    #[error("{0:?} is not a port number")]
    Port(String),
    #[error("port 0 asks for any free port: only a fixed port is served")]
    PortZero,
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    if line.len() > MAX_LINE {
        return Err(BadRequest::TooLong);
    }
    if !line.iter().all(|b| (b' '..=b'~').contains(b)) {
        return Err(BadRequest::NotText);
    }
    // Printable ASCII is UTF-8; the fallback is never taken.
    let line = std::str::from_utf8(line).map_err(|_| BadRequest::NotText)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let [transport, address, port] = fields[..] else {
        return Err(BadRequest::Syntax(line.to_owned()));
    };
    if transport != "tcp" {
        return Err(match transport {
            "udp" | "sctp" | "raw" | "unix" => BadRequest::Transport(transport.to_uppercase()),
            _ => BadRequest::Syntax(line.to_owned()),
        });
    }
    let ip: Ipv4Addr = match address.parse() {
        Ok(ip) => ip,
        Err(_) => {
            return Err(match address.parse::<Ipv6Addr>() {
                Ok(v6) => BadRequest::Ipv6(v6),
                Err(_) => BadRequest::Address(address.to_owned()),
            })
        }
    };
    // Digits only: `u16::from_str` would also take `+80`.
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BadRequest::Port(port.to_owned()));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| BadRequest::Port(port.to_owned()))?;
    if port == 0 {
        return Err(BadRequest::PortZero);
    }
    Ok(Request::Tcp(SocketAddrV4::new(ip, port)))
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Bound; the listening socket comes with the line.
    Ok,
    /// Not served: the request was malformed or outside the policy.
    Refused(String),
    /// Served, but the system call failed (`EADDRINUSE`, `EADDRNOTAVAIL`...).
    Os { errno: i32, message: String },
}

impl Reply {
    /// The reply's line, newline included; line breaks in messages become
    /// blanks so one reply stays one line.
    pub fn encode(&self) -> String {
        let clean = |s: &str| s.replace(['\n', '\r'], " ");
        match self {
            Reply::Ok => "ok\n".to_owned(),
            Reply::Refused(why) => format!("error refused {}\n", clean(why)),
            Reply::Os { errno, message } => format!("error os {errno} {}\n", clean(message)),
        }
    }

    /// Parses a reply line (without its newline); `None` if it is not one.
    pub fn parse(line: &[u8]) -> Option<Reply> {
        let line = std::str::from_utf8(line).ok()?;
        if line == "ok" {
            return Some(Reply::Ok);
        }
        if let Some(why) = line.strip_prefix("error refused ") {
            return Some(Reply::Refused(why.to_owned()));
        }
        let rest = line.strip_prefix("error os ")?;
        let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(Reply::Os {
            errno: errno.parse().ok()?,
            message: message.to_owned(),
        })
    }
}

/// Sends one reply on `socket`, with `fd` attached if given. The
/// descriptor goes with the first byte; the rest of a short send follows.
pub fn send_reply(
    socket: BorrowedFd<'_>,
    reply: &Reply,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let line = reply.encode();
    let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    // No SIGPIPE if the client has gone: an error to return instead.
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    let mut rest = &line.as_bytes()[sent..];
    while !rest.is_empty() {
        let sent = nix::sys::socket::send(socket.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL)?;
        rest = &rest[sent..];
    }
    Ok(())
}

/// Reads one reply line (returned without its newline) and the descriptors
/// that came with it, close-on-exec. Fails on end of file before a newline
/// and on a line longer than [`MAX_REPLY`]. One request is outstanding at a
/// time, so nothing follows the newline that this read could swallow.
pub fn read_reply(socket: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut chunk = [0u8; 256];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let (read, truncated) = {
            let msg = recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            for cmsg in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    for raw in received {
                        // SAFETY: the kernel has just installed `raw` in our
                        // descriptor table for this message (SCM_RIGHTS);
                        // nothing else knows of it, so this is its one owner.
                        #[allow(unsafe_code)]
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fds.push(owned);
                    }
                }
            }
            (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC))
        };
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more descriptors came with the reply than it can carry",
            ));
        }
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the helper closed its socket before replying",
            ));
        }
        line.extend_from_slice(&chunk[..read]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Ok((line, fds));
        }
        if line.len() > MAX_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply longer than {MAX_REPLY} bytes"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let request = Request::Tcp(SocketAddrV4::new(Ipv4Addr::new(127, 77, 0, 9), 80));
        let line = request.encode();
        assert_eq!(line, "tcp 127.77.0.9 80\n");
        assert_eq!(parse_request(line.trim_end().as_bytes()), Ok(request));
    }

    #[test]
    fn malformed_requests_are_told_apart() {
        let cases: &[(&[u8], BadRequest)] = &[
            (b"udp 127.77.0.9 53", BadRequest::Transport("UDP".into())),
            (b"tcp ::1 80", BadRequest::Ipv6(Ipv6Addr::LOCALHOST)),
            (b"tcp 127.77.0.9 0", BadRequest::PortZero),
            (b"tcp 127.77.0.9 +80", BadRequest::Port("+80".into())),
            (b"tcp 127.77.0.9 65536", BadRequest::Port("65536".into())),
            (b"tcp 127.77.0.9 080080", BadRequest::Port("080080".into())),
            (
                b"tcp 127.077.0.9 80",
                BadRequest::Address("127.077.0.9".into()),
            ),
            (b"tcp localhost 80", BadRequest::Address("localhost".into())),
            (
                b"tcp  127.77.0.9 80",
                BadRequest::Syntax("tcp  127.77.0.9 80".into()),
            ),
            (
                b"tcp 127.77.0.9 80 x",
                BadRequest::Syntax("tcp 127.77.0.9 80 x".into()),
            ),
            (b"hello", BadRequest::Syntax("hello".into())),
            (b"", BadRequest::Syntax(String::new())),
            (b"tcp 127.77.0.9 80\r", BadRequest::NotText),
            (b"tcp 127.77.0.9\t80", BadRequest::NotText),
            (b"tcp 127.77.0.9 \xff", BadRequest::NotText),
        ];
        for (line, expected) in cases {
            assert_eq!(
                parse_request(line).as_ref(),
                Err(expected),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            parse_request(&[b'a'; MAX_LINE + 1]),
            Err(BadRequest::TooLong)
        );
    }

    #[test]
    fn replies_round_trip_as_one_line() {
        for reply in [
            Reply::Ok,
            Reply::Refused("127.0.0.1 is\nthe machine's own".into()),
            Reply::Os {
                errno: 98,
                message: "Address in use".into(),
            },
        ] {
            let line = reply.encode();
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            let parsed = Reply::parse(line.trim_end().as_bytes()).unwrap();
            assert_eq!(parsed.encode(), line);
        }
        assert_eq!(Reply::parse(b"ok then"), None);
        assert_eq!(Reply::parse(b"error os x y"), None);
    }

    #[test]
    fn a_descriptor_travels_with_its_reply() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (passed, _keep) = UnixStream::pair().unwrap();
        send_reply(
            std::os::fd::AsFd::as_fd(&theirs),
            &Reply::Ok,
            Some(std::os::fd::AsFd::as_fd(&passed)),
        )
        .unwrap();
        let (line, fds) = read_reply(&ours).unwrap();
        assert_eq!((line.as_slice(), fds.len()), (&b"ok"[..], 1));
        send_reply(
            std::os::fd::AsFd::as_fd(&theirs),
            &Reply::Refused("no".into()),
            None,
        )
        .unwrap();
        let (line, fds) = read_reply(&ours).unwrap();
        assert_eq!((line.as_slice(), fds.len()), (&b"error refused no"[..], 0));
        drop(theirs);
        assert_eq!(
            read_reply(&ours).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
