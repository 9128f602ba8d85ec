//! One connection's bytes, both ways: small messages copied through a
//! buffer that exists only while data flows, bulk transfers handed to
//! splice(2) on Linux (`splice`), the copy everywhere else and as fallback.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::tunnel::shards::Pipes;

/// Bytes read per wake-up; allocated only once a connection carries data.
const PUMP_BUFFER: usize = 16 * 1024;

/// How a copy pump stopped.
#[derive(Debug, PartialEq, Eq)]
enum PumpEnd {
    /// The source closed.
    Closed,
    /// A read filled the whole buffer: this is a bulk transfer, better spliced.
    Bulk,
}

/// One direction of a connection. Small messages (requests, responses) are
/// copied: one read and one write beat two splices and a pipe. Once a read
/// fills the buffer the connection is moving bulk data, and on Linux the rest
/// goes kernel to kernel with splice(2); elsewhere, and wherever the kernel
/// will not splice, the copy carries on.
///
/// When `from` ends, the peer is told with a half-close, unless the other
/// direction has already ended (`one_way_ended`): then both sockets close
/// at once and the close says it, one system call fewer per connection.
pub async fn relay(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counter: &AtomicU64,
    one_way_ended: &AtomicBool,
    pipes: &Pipes,
) -> io::Result<()> {
    move_until_end(&mut from, &mut to, counter, pipes).await?;
    if !one_way_ended.swap(true, Ordering::AcqRel) {
        socket2::SockRef::from(to.as_ref()).shutdown(std::net::Shutdown::Write)?;
    }
    Ok(())
}

async fn move_until_end(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counter: &AtomicU64,
    #[cfg_attr(not(target_os = "linux"), allow(unused_variables))] pipes: &Pipes,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if pump(from, to, counter, true).await? == PumpEnd::Closed {
            return Ok(());
        }
        let spliced =
            crate::tunnel::splice::pump(from.as_ref(), to.as_ref(), counter, pipes).await?;
        if let crate::tunnel::splice::Spliced::Done = spliced {
            return Ok(());
        }
    }
    pump(from, to, counter, false).await.map(|_| ())
}

/// Moves bytes one way until `from` closes; with `stop_when_bulk`, hands
/// over after the first read that fills the buffer.
///
/// The buffer exists only while data flows: readiness can be reported with
/// nothing to read, so a read that finds nothing gives the buffer back, and
/// idle connections cost no buffer memory. Reads go through tokio's
/// `AsyncRead` rather than `try_read`: a read that returns less than asked
/// tells tokio the socket is drained, which saves the `EAGAIN` read per
/// message that a request/response exchange would otherwise pay each way.
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counter: &AtomicU64,
    stop_when_bulk: bool,
) -> io::Result<PumpEnd> {
    // Read into spare capacity (never zeroed) so a short connection pays
    // for one allocation and nothing else.
    let mut buffer = BytesMut::new();
    loop {
        buffer.clear();
        let read = if buffer.capacity() == 0 {
            let socket: &TcpStream = from.as_ref();
            socket.readable().await?;
            buffer = BytesMut::with_capacity(PUMP_BUFFER);
            match read_if_ready(from, &mut buffer).await? {
                Some(read) => read,
                None => {
                    buffer = BytesMut::new();
                    continue;
                }
            }
        } else {
            from.read_buf(&mut buffer).await?
        };
        if read == 0 {
            break;
        }
        to.write_all(&buffer).await?;
        counter.fetch_add(read as u64, Ordering::Relaxed);
        if stop_when_bulk && read == PUMP_BUFFER {
            return Ok(PumpEnd::Bulk);
        }
    }
    Ok(PumpEnd::Closed)
}

/// One read that does not wait: `None` when there was nothing to read after all.
async fn read_if_ready(
    from: &mut ReadHalf<'_>,
    buffer: &mut BytesMut,
) -> io::Result<Option<usize>> {
    std::future::poll_fn(|cx| {
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *from), cx, buffer) {
            Poll::Ready(Ok(read)) => Poll::Ready(Ok(Some(read))),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Ready(Ok(None)),
        }
    })
    .await
}
