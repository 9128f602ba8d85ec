//! The port-forward subresource spoken as SPDY/3 (`portforward.k8s.io`),
//! as a kubelet serves it behind the API server: streams paired by their
//! request id, each pair bridged to the TCP server that plays the pod's
//! port, the kubelet's words on the error stream when the port refuses,
//! and a reset (RST_STREAM) for the one stream the test asks to cut.
//!
//! A session upgraded while the test asks for it is hostile instead
//! ([`Hostile`]): header blocks that inflate a thousandfold, data frames
//! of SPDY's largest size, error text without end, a flood of pings or of
//! streams opened by the server. Its flood is written by the session's
//! writing task, which says how far it went ([`Flood`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use k3s_local_agent_spdy::{header, Decoder, Encoder, Frame, FLAG_FIN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// RST_STREAM status the emulator cuts a stream with.
const INTERNAL_ERROR: u32 = 6;

/// How a hostile session misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// The session's first SYN_REPLY carries a header block whose one
    /// value inflates to `inflated` bytes (about 1 KiB on the wire per
    /// MiB); the later ones are as usual.
    HeaderBomb { inflated: usize },
    /// Each connection's data stream gets `count` frames of `size` bytes
    /// at once, whether its client reads or not. The one mode WebSocket
    /// port-forwards follow too (`count` messages of `size` bytes).
    DataFrames { size: usize, count: usize },
    /// Each connection's error stream gets `bytes` of text in 32 KiB
    /// frames, never finished.
    ErrorText { bytes: usize },
    /// `count` pings as soon as the session is up; from then on the server
    /// reads nothing, echoes included.
    PingFlood { count: usize },
    /// `count` streams opened by the server (SYN_STREAM, even ids) as
    /// soon as the session is up; it reads nothing.
    ServerStreams { count: usize },
}

/// How far the hostile sessions' floods went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flood {
    /// Bytes of flood written to the sockets.
    pub written: u64,
    /// How the last flood ended, once one has.
    pub end: Option<FloodEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloodEnd {
    /// All of it was written.
    Sent,
    /// The client closed the session before all of it was written.
    Cut,
}

/// A header bomb made ahead (compressing tens of MiB takes seconds, which
/// would otherwise fall inside what a test measures): a SYN_REPLY whose
/// block inflates to the size asked, made as the first block of a fresh
/// compression context, and that context, which the session that sends it
/// goes on with.
#[derive(Debug)]
pub(super) struct Bomb {
    encoder: Encoder,
    /// The frame's bytes, its stream id to be written in when it is sent.
    frame: BytesMut,
}

impl Bomb {
    pub(super) fn new(inflated: usize) -> std::io::Result<Self> {
        // One pair, "x-bomb", whose value is `inflated` zero bytes.
        let mut head = BytesMut::new();
        head.put_u32(1);
        head.put_u32(6);
        head.put_slice(b"x-bomb");
        head.put_u32(u32::try_from(inflated).unwrap_or(u32::MAX));
        let zeros = vec![0u8; 1 << 20];
        let pieces = std::iter::once(&head[..]).chain(
            std::iter::repeat_n(&zeros[..], inflated / zeros.len())
                .chain(std::iter::once(&zeros[..inflated % zeros.len()])),
        );
        let mut encoder = Encoder::new();
        let mut frame = BytesMut::new();
        encoder
            .encode_raw_reply(0, pieces, &mut frame)
            .map_err(std::io::Error::other)?;
        Ok(Self { encoder, frame })
    }
}

/// What a hostile session hands its writing task.
enum Raw {
    /// A bomb's SYN_REPLY (see [`Bomb`]) for `stream`; `written` says when
    /// it is on the socket.
    Bomb {
        stream: u32,
        frame: BytesMut,
        written: tokio::sync::oneshot::Sender<()>,
    },
    /// `frame`, `count` times over (its bytes repeated: it carries no
    /// header block, whose compression would differ each time).
    Repeat { frame: Frame, count: usize },
    /// `count` SYN_STREAMs, each encoded on the session's context.
    Streams { count: usize },
}

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
    let (mut reader, writer) = tokio::io::split(socket);
    let (outgoing, queue) = mpsc::unbounded_channel::<Frame>();
    let (raw, raw_queue) = mpsc::channel::<Raw>(4);
    let (hostile, bomb) = {
        let mut cluster = shared.lock();
        (cluster.hostile, cluster.bomb.take())
    };
    // The first session after the bomb was made sends it, as its first
    // reply: one bomb makes the point.
    let (encoder, mut bomb) = match bomb {
        Some(Bomb { encoder, frame }) => (encoder, Some(frame)),
        None => (Encoder::new(), None),
    };
    let mut writing = tokio::spawn(write_frames(
        writer,
        encoder,
        queue,
        raw_queue,
        shared.clone(),
    ));
    let flood = match hostile {
        Some(Hostile::PingFlood { count }) => Some(Raw::Repeat {
            frame: Frame::Ping { id: 2 },
            count,
        }),
        Some(Hostile::ServerStreams { count }) => Some(Raw::Streams { count }),
        _ => None,
    };
    if let Some(flood) = flood {
        // Written at once; nothing is read, and the session ends with it.
        let _ = raw.send(flood).await;
        drop((raw, outgoing));
        tokio::select! {
            _ = running.cancelled() => writing.abort(),
            _ = &mut writing => {}
        }
        return;
    }
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
                    if let Some(frame) = bomb.take() {
                        // On the socket before anything else of the pair.
                        let (written, on_socket) = tokio::sync::oneshot::channel();
                        let bomb = Raw::Bomb {
                            stream,
                            frame,
                            written,
                        };
                        if raw.send(bomb).await.is_err() || on_socket.await.is_err() {
                            break 'session;
                        }
                    } else {
                        let _ = outgoing.send(Frame::SynReply {
                            stream,
                            flags: 0,
                            headers: Vec::new(),
                        });
                    }
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
                        let flood = match hostile {
                            Some(Hostile::DataFrames { size, count }) => Some(Raw::Repeat {
                                frame: Frame::Data {
                                    stream: *data,
                                    flags: 0,
                                    data: Bytes::from(vec![0u8; size]),
                                },
                                count,
                            }),
                            Some(Hostile::ErrorText { bytes }) => Some(Raw::Repeat {
                                frame: Frame::Data {
                                    stream: *error,
                                    flags: 0,
                                    data: Bytes::from(vec![b'x'; ERROR_TEXT_FRAME]),
                                },
                                count: bytes / ERROR_TEXT_FRAME,
                            }),
                            _ => None,
                        };
                        if let Some(flood) = flood {
                            let _ = raw.send(flood).await;
                            halves.remove(&request);
                            continue;
                        }
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
    // A flood the client cut short by ending the session: the writing
    // task may have been stopped before its write failed.
    let _ = writing.await;
    if hostile.is_some() {
        let mut cluster = shared.lock();
        if cluster.flood.end.is_none() && cluster.flood.written > 0 {
            cluster.flood.end = Some(FloodEnd::Cut);
        }
    }
}

/// The size of a hostile session's error text frames: what a kubelet
/// writes at once at most.
const ERROR_TEXT_FRAME: usize = 32 * 1024;

/// The session's writing task: the frames of its streams, and a hostile
/// session's floods, each whole before the next frame.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut encoder: Encoder,
    mut queue: mpsc::UnboundedReceiver<Frame>,
    mut raw: mpsc::Receiver<Raw>,
    shared: Shared,
) {
    let mut out = BytesMut::new();
    loop {
        tokio::select! {
            biased;
            Some(frame) = queue.recv() => {
                out.clear();
                if encoder.encode(&frame, &mut out).is_err()
                    || writer.write_all(&out).await.is_err()
                {
                    break;
                }
            }
            Some(flood) = raw.recv() => {
                let end = match write_flood(&mut writer, &mut encoder, flood, &shared).await {
                    Ok(()) => FloodEnd::Sent,
                    Err(_) => FloodEnd::Cut,
                };
                shared.lock().flood.end = Some(end);
                if end == FloodEnd::Cut {
                    break;
                }
            }
            else => break,
        }
    }
    let _ = writer.shutdown().await;
}

/// Writes one flood, counting what reached the socket.
async fn write_flood<W: AsyncWrite + Unpin>(
    writer: &mut W,
    encoder: &mut Encoder,
    flood: Raw,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    match flood {
        Raw::Bomb {
            stream,
            mut frame,
            written,
        } => {
            // After the control frame's 8-byte header: the stream id.
            frame[8..12].copy_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
            put(writer, &frame, shared).await?;
            let _ = written.send(());
        }
        Raw::Repeat { frame, count } => {
            encoder
                .encode(&frame, &mut out)
                .map_err(std::io::Error::other)?;
            // About 1 MiB a write, or one frame when it is larger.
            let per_write = ((1 << 20) / out.len()).max(1);
            let batch = out.repeat(per_write.min(count));
            let mut left = count;
            while left > 0 {
                let n = left.min(per_write);
                put(writer, &batch[..n * out.len()], shared).await?;
                left -= n;
            }
        }
        Raw::Streams { count } => {
            let mut stream = 2u32;
            let mut left = count;
            while left > 0 {
                for _ in 0..left.min(4096) {
                    let open = Frame::SynStream {
                        stream,
                        flags: 0,
                        headers: Vec::new(),
                    };
                    encoder
                        .encode(&open, &mut out)
                        .map_err(std::io::Error::other)?;
                    stream += 2;
                    left -= 1;
                }
                put(writer, &out, shared).await?;
                out.clear();
            }
        }
    }
    Ok(())
}

/// Writes part of a flood, and counts it.
async fn put<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    shared: &Shared,
) -> std::io::Result<()> {
    writer.write_all(bytes).await?;
    shared.lock().flood.written += bytes.len() as u64;
    Ok(())
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
