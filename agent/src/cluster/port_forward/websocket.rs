//! One connection through a Kubernetes API server's WebSocket port-forward, as a
//! byte stream: the WebSocket (`v4.channel.k8s.io`, or `v5` with its
//! half-close) read and written in place, so a tunnel copies between its
//! client's socket and the WebSocket directly. kube's own `Portforwarder`
//! puts an in-memory pipe, a channel of one message and three tasks between
//! them, and sends the pod at most 4 KiB a frame; this sends what the
//! client wrote, up to a tunnel's 64 KiB buffer, in one frame. The
//! request, credentials, TLS and connection pool are the kube client's.
//!
//! The protocol: every binary message starts with a channel byte. Channel 0
//! carries the port's data and channel 1 its errors; each first sends the
//! port number (2 bytes, little-endian). v5 adds channel 255, whose `[255,
//! 0]` closes the data channel's sending side (a half-close). v4, which
//! kubelets speak, has none: when the client has finished sending, the pod
//! gets [`LINGER`] of silence to finish its answer, and then the stream is
//! closed (kube's `Portforwarder` closes at once, losing a late answer; a
//! stream left open would hold the pod's connection for hours).
//!
//! A message from the API server is taken up to [`MAX_MESSAGE`] (a few
//! MiB, not tungstenite's 64 MiB): a broken or hostile server cannot make
//! one connection hold more.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::Resource;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// On v4, how long the pod may stay silent after the client finished
/// sending before the stream is closed.
pub const LINGER: Duration = Duration::from_secs(5);

const DATA: u8 = 0;
const ERROR: u8 = 1;
/// v5's signal channel: `[CLOSE, DATA]` ends what we send on the data channel.
const CLOSE: u8 = 255;
/// The longest message (and frame) taken from the API server. It relays a
/// kubelet's reads, 32 KiB each; 4 MiB is 128 of them, one connection's
/// share as on an SPDY session. A longer one ends the connection.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// The WebSocket settings of a port-forward: tungstenite's, with messages
/// and frames of at most [`MAX_MESSAGE`].
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// What a port-forward's WebSocket is to us: messages in, messages out.
pub trait Socket:
    Stream<Item = Result<Message, tungstenite::Error>>
    + Sink<Message, Error = tungstenite::Error>
    + Unpin
    + Send
{
}

impl<S> Socket for S where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + Sink<Message, Error = tungstenite::Error>
        + Unpin
        + Send
{
}

/// Opens a port-forward to `port` of pod `namespace/name`: one HTTP upgrade
/// on the client's connection pool.
pub async fn open(
    client: &Client,
    namespace: &str,
    name: &str,
    port: u16,
) -> Result<PortForwardStream<impl Socket>, kube::Error> {
    let request = kube::core::Request::new(Pod::url_path(&(), Some(namespace)))
        .portforward(name, &[port])
        .map_err(kube::Error::BuildRequest)?;
    let connection = client.connect(request).await?;
    let half_close = connection.supports_stream_close();
    // kube wraps the upgraded socket with tungstenite's defaults; nothing
    // has been read from it yet, so it is wrapped again with ours.
    let upgraded = connection.into_stream().into_inner();
    let socket = WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(config())).await;
    Ok(PortForwardStream::new(socket, half_close))
}

/// One port of a pod through the API server, as a byte stream.
pub struct PortForwardStream<S> {
    socket: S,
    /// The server speaks v5: a half-close can be sent.
    half_close: bool,
    /// What is left of the last data frame.
    unread: Bytes,
    /// Whether the data and error channels sent their opening port frames.
    data_opened: bool,
    error_opened: bool,
    /// Whether the pod sent any data: an error before it is a refusal.
    data_seen: bool,
    /// The pod's side is done (close frame or end of the socket).
    ended: bool,
    /// Our sending side is closed.
    shut: bool,
    /// On v4 after our side closed: when the pod's silence ends the stream.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> std::fmt::Debug for PortForwardStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForwardStream")
            .field("half_close", &self.half_close)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// A write after our side was closed, or after the connection broke (both
/// kinds of port-forward stream answer it so).
pub(super) fn closed_for_writing() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the port-forward is closed")
}

fn ws_error(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(err) => err,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::ConnectionReset, "the port-forward closed")
        }
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the port-forward stream was reset",
        ),
        other => io::Error::other(other),
    }
}

impl<S: Socket> PortForwardStream<S> {
    /// A stream on a just-upgraded socket (`half_close`: it speaks v5).
    fn new(socket: S, half_close: bool) -> Self {
        Self {
            socket,
            half_close,
            unread: Bytes::new(),
            data_opened: false,
            error_opened: false,
            data_seen: false,
            ended: false,
            shut: false,
            linger: None,
        }
    }

    /// Takes one message off the socket: data is kept to be read, the
    /// opening port frames are skipped, an error ends the stream with it.
    fn take(&mut self, message: Message) -> io::Result<()> {
        match message {
            Message::Binary(mut frame) if !frame.is_empty() => {
                let channel = frame[0];
                frame.advance(1);
                match channel {
                    // The opening frame names the port; anything else is data.
                    DATA if !self.data_opened && frame.len() == 2 => self.data_opened = true,
                    DATA => {
                        self.data_opened = true;
                        self.data_seen |= !frame.is_empty();
                        self.unread = frame;
                        if let Some(linger) = self.linger.as_mut() {
                            linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
                        }
                    }
                    ERROR if !self.error_opened && frame.len() == 2 => self.error_opened = true,
                    ERROR if frame.is_empty() => {}
                    ERROR => {
                        self.ended = true;
                        // Before any data, the pod's port refused us;
                        // after, the connection to it broke.
                        let kind = if self.data_seen {
                            io::ErrorKind::ConnectionReset
                        } else {
                            io::ErrorKind::ConnectionRefused
                        };
                        return Err(io::Error::new(
                            kind,
                            String::from_utf8_lossy(&frame).into_owned(),
                        ));
                    }
                    _ => {}
                }
            }
            Message::Close(_) => self.ended = true,
            // Pings are answered by the socket itself; text is not ours.
            _ => {}
        }
        Ok(())
    }
}

impl<S: Socket> AsyncRead for PortForwardStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.unread.is_empty() {
                let n = self.unread.len().min(buf.remaining());
                buf.put_slice(&self.unread[..n]);
                self.unread.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            let next = Pin::new(&mut self.socket).poll_next(cx);
            if next.is_pending() {
                // v4, our side done, the pod silent for LINGER: its answer
                // is over; end the stream rather than hold it open.
                if let Some(linger) = self.linger.as_mut() {
                    ready!(linger.as_mut().poll(cx));
                    self.ended = true;
                    let _ = Pin::new(&mut self.socket).start_send(Message::Close(None));
                    let _ = Pin::new(&mut self.socket).poll_flush(cx);
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
            let message = match ready!(next) {
                Some(Ok(message)) => message,
                Some(Err(err)) => return Poll::Ready(Err(ws_error(err))),
                None => {
                    // The socket ended without a close frame: cut, not done.
                    self.ended = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the port-forward stream was reset",
                    )));
                }
            };
            if let Err(err) = self.take(message) {
                return Poll::Ready(Err(err));
            }
        }
    }
}

impl<S: Socket> AsyncWrite for PortForwardStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.shut || self.ended {
            return Poll::Ready(Err(closed_for_writing()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.socket).poll_ready(cx)).map_err(ws_error)?;
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(DATA);
        frame.extend_from_slice(data);
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(frame.into()))
            .map_err(ws_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx).map_err(ws_error)
    }

    /// A half-close where the server speaks v5; on v4, which has none, the
    /// pod gets [`LINGER`] of silence to finish before the stream closes.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            if self.half_close {
                ready!(Pin::new(&mut self.socket).poll_ready(cx)).map_err(ws_error)?;
                Pin::new(&mut self.socket)
                    .start_send(Message::Binary(Bytes::from_static(&[CLOSE, DATA])))
                    .map_err(ws_error)?;
            } else {
                self.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
            }
            self.shut = true;
        }
        Pin::new(&mut self.socket).poll_flush(cx).map_err(ws_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A port-forward stream over an in-memory WebSocket, and the API
    /// server's end of it.
    async fn pair() -> (
        PortForwardStream<impl Socket>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let client = WebSocketStream::from_raw_socket(ours, Role::Client, Some(config())).await;
        let server = WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
        (PortForwardStream::new(client, false), server)
    }

    fn frame(channel: u8, data: &[u8]) -> Message {
        let mut bytes = vec![channel];
        bytes.extend_from_slice(data);
        Message::Binary(bytes.into())
    }

    /// The opening frames: each channel names the port.
    async fn open_channels(server: &mut WebSocketStream<tokio::io::DuplexStream>) {
        for channel in [DATA, ERROR] {
            server
                .send(frame(channel, &8080u16.to_le_bytes()))
                .await
                .expect("send");
        }
    }

    #[tokio::test]
    async fn data_both_ways_after_the_opening_frames_then_the_end() {
        let (mut stream, mut server) = pair().await;
        open_channels(&mut server).await;
        server.send(frame(DATA, b"hello ")).await.expect("send");
        server.send(frame(DATA, b"there")).await.expect("send");
        stream.write_all(b"ping").await.expect("write");
        stream.flush().await.expect("flush");
        let sent = server.next().await.expect("a frame").expect("frame");
        assert_eq!(sent, frame(DATA, b"ping"), "data goes on channel 0");
        server.close(None).await.expect("close");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read");
        assert_eq!(text, "hello there", "the port numbers are not data");
    }

    #[tokio::test]
    async fn an_error_from_the_pod_side_fails_the_read_with_its_words() {
        let (mut stream, mut server) = pair().await;
        open_channels(&mut server).await;
        let message = "error forwarding port 8080 to pod abc: connection refused";
        server
            .send(frame(ERROR, message.as_bytes()))
            .await
            .expect("send");
        let mut buffer = [0u8; 16];
        let err = stream.read(&mut buffer).await.expect_err("an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("connection refused"), "{err}");
    }

    #[tokio::test]
    async fn a_socket_that_ends_without_a_close_frame_is_a_reset() {
        let (mut stream, mut server) = pair().await;
        open_channels(&mut server).await;
        server.send(frame(DATA, b"part")).await.expect("send");
        drop(server);
        let mut got = Vec::new();
        let err = stream.read_to_end(&mut got).await.expect_err("cut");
        assert_eq!(got, b"part");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test(start_paused = true)]
    async fn on_v4_a_silent_pod_ends_the_stream_after_the_client_finished() {
        let (mut stream, mut server) = pair().await;
        open_channels(&mut server).await;
        stream.write_all(b"request").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        server.send(frame(DATA, b"answer")).await.expect("send");
        // The answer arrives; then the pod says nothing and the clock runs.
        let mut text = String::new();
        let read = tokio::time::timeout(LINGER * 3, stream.read_to_string(&mut text)).await;
        assert!(read.is_ok(), "the stream ended after the pod's silence");
        assert_eq!(text, "answer");
    }

    #[tokio::test]
    async fn an_error_after_data_is_a_broken_connection_not_a_refusal() {
        let (mut stream, mut server) = pair().await;
        open_channels(&mut server).await;
        server.send(frame(DATA, b"partial")).await.expect("send");
        server
            .send(frame(ERROR, b"lost connection to pod"))
            .await
            .expect("send");
        let mut got = Vec::new();
        let err = stream.read_to_end(&mut got).await.expect_err("broken");
        assert_eq!(got, b"partial");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_half_close_is_signalled_where_the_protocol_has_one() {
        let (mut stream, mut server) = pair().await;
        stream.half_close = true;
        stream.shutdown().await.expect("shutdown");
        let signal = server.next().await.expect("a frame").expect("frame");
        assert_eq!(signal, frame(CLOSE, &[DATA]));
        let err = stream.write(b"late").await.expect_err("closed");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn a_message_longer_than_a_few_mib_ends_the_connection_unheld() {
        let (mut stream, mut server) = pair().await;
        open_channels(&mut server).await;
        // The server's send waits on a reader that gives up at the frame's
        // header: it is left to run, not awaited.
        tokio::spawn(async move {
            let _ = server.send(frame(DATA, &vec![0u8; MAX_MESSAGE + 1])).await;
            server
        });
        let mut got = Vec::new();
        let err = stream.read_to_end(&mut got).await.expect_err("refused");
        assert!(got.is_empty(), "none of it was handed over");
        assert!(err.to_string().contains("too long"), "{err}");
    }
}
