//! The port-forward subresource spoken as SPDY/3 (`portforward.k8s.io`),
//! as a kubelet serves it behind the API server: streams paired by their
//! request id, each pair bridged to the TCP server that plays the pod's
//! port, the kubelet's words on the error stream when the port refuses,
//! and a reset (RST_STREAM) for the one stream the test asks to cut.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use k3s_local_agent_spdy::{header, Decoder, Encoder, Frame, FLAG_FIN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// RST_STREAM status the emulator cuts a stream with.
const INTERNAL_ERROR: u32 = 6;

/// What the session hands a pair's bridge.
enum Incoming {
    Data(Bytes),
    Fin,
    Reset,
    /// The pod was deleted: its side of the connection closes.
    PodGone,
}

/// A stream whose partner has not come yet: its id, and its port.
#[derive(Default)]
struct Half {
    error: Option<u32>,
    data: Option<(u32, u16)>,
}

/// The pod a session was upgraded for.
pub(super) struct Pod {
    pub uid: String,
    pub name: String,
    /// Cancelled when the pod is deleted.
    pub gone: CancellationToken,
}

/// Serves one upgraded SPDY session for `pod` until the client ends it or
/// the emulator stops (`running` is cancelled). When the pod goes, its
/// streams end and new ones get the runtime's words, as on a kubelet.
pub(super) async fn serve<S>(socket: S, shared: Shared, pod: Pod, running: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(socket);
    let (outgoing, mut queue) = mpsc::unbounded_channel::<Frame>();
    let writing = tokio::spawn(async move {
        let mut encoder = Encoder::new();
        let mut out = BytesMut::new();
        while let Some(frame) = queue.recv().await {
            out.clear();
            if encoder.encode(&frame, &mut out).is_err() || writer.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut decoder = Decoder::new();
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let mut halves: HashMap<String, Half> = HashMap::new();
    let mut bridges: HashMap<u32, mpsc::UnboundedSender<Incoming>> = HashMap::new();
    let mut pod_ended = false;
    'session: loop {
        while let Ok(Some(frame)) = decoder.decode(&mut buffer) {
            match frame {
                Frame::SynStream {
                    stream, headers, ..
                } => {
                    let _ = outgoing.send(Frame::SynReply {
                        stream,
                        flags: 0,
                        headers: Vec::new(),
                    });
                    let request = header(&headers, "requestid").unwrap_or_default().to_owned();
                    let port = header(&headers, "port")
                        .and_then(|port| port.parse::<u16>().ok())
                        .unwrap_or_default();
                    let half = halves.entry(request.clone()).or_default();
                    match header(&headers, "streamtype") {
                        Some("error") => half.error = Some(stream),
                        Some("data") => half.data = Some((stream, port)),
                        _ => {}
                    }
                    if let Some(Half {
                        error: Some(error),
                        data: Some((data, port)),
                    }) = halves.get(&request)
                    {
                        let (to_bridge, from_session) = mpsc::unbounded_channel();
                        bridges.insert(*data, to_bridge);
                        let backend = if pod.gone.is_cancelled() {
                            Err(Unreachable::SandboxGone {
                                uid: pod.uid.clone(),
                            })
                        } else {
                            backend(&shared, &pod.uid, *port).ok_or_else(|| Unreachable::NoServer {
                                port: *port,
                                pod: pod.name.clone(),
                            })
                        };
                        tokio::spawn(bridge(
                            Pair {
                                data: *data,
                                error: *error,
                                backend,
                            },
                            from_session,
                            outgoing.clone(),
                            shared.clone(),
                        ));
                        halves.remove(&request);
                    }
                }
                Frame::Data {
                    stream,
                    flags,
                    data,
                } => {
                    if let Some(bridge) = bridges.get(&stream) {
                        if !data.is_empty() {
                            let _ = bridge.send(Incoming::Data(data));
                        }
                        if flags & FLAG_FIN != 0 {
                            let _ = bridge.send(Incoming::Fin);
                        }
                    }
                }
                Frame::RstStream { stream, .. } => {
                    if let Some(bridge) = bridges.remove(&stream) {
                        let _ = bridge.send(Incoming::Reset);
                    }
                }
                Frame::Ping { id } => {
                    let _ = outgoing.send(Frame::Ping { id });
                }
                Frame::GoAway { .. } => break 'session,
                _ => {}
            }
        }
        tokio::select! {
            _ = running.cancelled() => break,
            _ = pod.gone.cancelled(), if !pod_ended => {
                // The pod's connections close, as its sockets do.
                pod_ended = true;
                for (_, bridge) in bridges.drain() {
                    let _ = bridge.send(Incoming::PodGone);
                }
            }
            read = reader.read_buf(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
        }
    }
    // Every bridge ends with its session, as a kubelet's do.
    for (_, bridge) in bridges.drain() {
        let _ = bridge.send(Incoming::Reset);
    }
    drop(outgoing);
    writing.abort();
}

/// Where the pod's `port` runs (its own server, or the pod's).
fn backend(shared: &Shared, uid: &str, port: u16) -> Option<SocketAddr> {
    let cluster = shared.lock();
    cluster
        .port_backends
        .get(&(uid.to_owned(), port))
        .or_else(|| cluster.backends.get(uid))
        .copied()
}

/// One connection: its two streams, and where its port runs (or why it
/// cannot be reached).
struct Pair {
    data: u32,
    error: u32,
    backend: Result<SocketAddr, Unreachable>,
}

/// Why a connection's port cannot be reached; written on its error stream
/// in the container runtime's words.
#[derive(Debug)]
enum Unreachable {
    /// The pod was deleted: its sandbox is gone.
    SandboxGone { uid: String },
    /// No server plays this port of the pod.
    NoServer { port: u16, pod: String },
    /// The server that plays it did not take the connection.
    Dial {
        address: SocketAddr,
        error: std::io::Error,
    },
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreachable::SandboxGone { uid } => {
                write!(f, "failed to find sandbox {uid:?} in store: not found")
            }
            Unreachable::NoServer { port, pod } => {
                write!(
                    f,
                    "error forwarding port {port} to pod {pod}: connection refused"
                )
            }
            Unreachable::Dial { address, error } => write!(
                f,
                "error forwarding port: dial tcp {address}: connect: {}",
                error.to_string().to_lowercase()
            ),
        }
    }
}

/// Carries one pair's bytes to and from the pod's port.
async fn bridge(
    pair: Pair,
    mut from_session: mpsc::UnboundedReceiver<Incoming>,
    outgoing: mpsc::UnboundedSender<Frame>,
    shared: Shared,
) {
    let data_frame = |stream: u32, flags: u8, data: Bytes| Frame::Data {
        stream,
        flags,
        data,
    };
    let finish = |outgoing: &mpsc::UnboundedSender<Frame>| {
        let _ = outgoing.send(data_frame(pair.error, FLAG_FIN, Bytes::new()));
        let _ = outgoing.send(data_frame(pair.data, FLAG_FIN, Bytes::new()));
    };
    let tcp = match pair.backend {
        Ok(address) => tokio::net::TcpStream::connect(address)
            .await
            .map_err(|error| Unreachable::Dial { address, error }),
        Err(why) => Err(why),
    };
    let tcp = match tcp {
        Ok(tcp) => tcp,
        Err(why) => {
            let words = Bytes::from(why.to_string());
            let _ = outgoing.send(data_frame(pair.error, 0, words));
            finish(&outgoing);
            return;
        }
    };
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let cut = CancellationToken::new();
    let upstream = async {
        let mut sent = 0usize;
        while let Some(incoming) = from_session.recv().await {
            match incoming {
                Incoming::Data(data) => {
                    sent += data.len();
                    if cut_due(&shared, sent) {
                        let _ = outgoing.send(Frame::RstStream {
                            stream: pair.data,
                            status: INTERNAL_ERROR,
                        });
                        cut.cancel();
                        return;
                    }
                    if to_pod.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Incoming::Fin => {
                    let _ = to_pod.shutdown().await;
                    return;
                }
                Incoming::Reset => {
                    cut.cancel();
                    return;
                }
                Incoming::PodGone => {
                    finish(&outgoing);
                    cut.cancel();
                    return;
                }
            }
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            match from_pod.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(&buffer[..n]);
                    if outgoing.send(data_frame(pair.data, 0, chunk)).is_err() {
                        return;
                    }
                }
            }
        }
        finish(&outgoing);
    };
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = async { tokio::join!(upstream, downstream) } => {}
    }
}

/// Whether the test asked to cut the stream that has now carried `sent`
/// bytes to the pod (once: the first stream past the mark).
pub(super) fn cut_due(shared: &Shared, sent: usize) -> bool {
    let mut cluster = shared.lock();
    let due = cluster.cut_next_after.is_some_and(|limit| sent > limit);
    if due {
        cluster.cut_next_after = None;
    }
    due
}
