//! gRPC transport settings, set on purpose and alike on both ends.
//!
//! Tonic's defaults (64 KiB HTTP/2 windows, 4 MiB decode limit) cost several times the bandwidth on
//! multi-megabyte tensor batches and refuse large ones outright: measured on this project's machine,
//! a 4 MiB echo took ~6 ms at default windows and ~2.7 ms with the windows below.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint, Server};

use crate::around_call::CallLayer;
use crate::deadline::AnswerDeadlines;
use crate::grpc_metrics::{GrpcServerMetrics, RecordCalls};
pub use crate::h2_channel::{Connector, H2Channel, InvalidOrigin, Keepalive};
use crate::panic::AnswerPanics;
use crate::tls::{ClientTls, GuardRoles, RolePolicy, ServerTls, TlsConnection};

/// HTTP/2 per-stream flow-control window.
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// HTTP/2 per-connection flow-control window.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// Largest HTTP/2 frame either end accepts, HTTP/2's own limit: a tensor payload of up to 16 MiB
/// (within the stream window) arrives as one DATA frame, which the receiver decodes in place
/// (`switchyard_proto::zero_copy`); one spread over several frames has to be copied together.
/// Answers come back in frames as large as requests go.
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;
/// Largest gRPC message either side encodes or decodes. Clients split batches above
/// [`SPLIT_REQUEST_BYTES`], so this is a safety limit, not the usual size.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;
/// Clients split a worker's batch into several requests above this many payload bytes: a request's
/// rows then fit one HTTP/2 frame (and the stream's window) with room for the rest of its message,
/// so the worker decodes them in place instead of copying them together from several frames, and
/// the client its answer likewise.
pub const SPLIT_REQUEST_BYTES: usize = 15 * 1024 * 1024;
const _: () = assert!(
    SPLIT_REQUEST_BYTES < MAX_FRAME_BYTES as usize && SPLIT_REQUEST_BYTES < STREAM_WINDOW_BYTES as usize,
    "a request's rows fit one frame and the stream's window"
);

/// A server builder with the windows and frame size above.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Keepalive::default().interval))
        .http2_keepalive_timeout(Some(Keepalive::default().timeout))
}

/// A lazily connected channel to `uri` with the same windows, and a connect timeout so a dead peer
/// is an error, not a hang; over mutual TLS when the process has an identity
/// ([`crate::tls::use_for_outgoing`]), whatever the URI's scheme.
pub fn channel(uri: &str) -> Result<Channel, tonic::transport::Error> {
    dial(uri, crate::tls::outgoing().cloned())
}

/// Serves `routes` on `listener` until `shutdown`, each call counted in `metrics`: over mutual
/// TLS, each call checked against the role policy before its method sees it, when `tls` is given;
/// plaintext otherwise.
pub async fn serve(
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
    tls: Option<(ServerTls, RolePolicy)>,
    metrics: GrpcServerMetrics,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    // Metrics outermost, so that calls the role guard refuses, calls past their deadline and calls
    // whose handler panicked are counted too, with the code they were answered.
    let mut server = server()
        .layer(CallLayer(RecordCalls(metrics)))
        .layer(CallLayer(AnswerPanics))
        .layer(CallLayer(AnswerDeadlines));
    match tls {
        Some((tls, policy)) => {
            server
                .layer(CallLayer(GuardRoles(policy)))
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming_tls(listener, ConnectionLimits::default(), tls), shutdown)
                .await
        }
        None => server.add_routes(routes).serve_with_incoming_shutdown(incoming(listener), shutdown).await,
    }
}

/// What one listener admits: connections held at once, and how long a new one may stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections past this many are closed as they are accepted, so that idle or hostile
    /// sockets cannot use up the process's file descriptors and lock every client out.
    pub max_connections: usize,
    /// A connection that sends nothing (not even HTTP/2's preface) for this long is closed:
    /// hyper alone waits on it forever.
    pub first_bytes_within: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { max_connections: 512, first_bytes_within: Duration::from_secs(10) }
    }
}

/// The connections accepted on `listener` within [`ConnectionLimits::default`], each with
/// `TCP_NODELAY` set.
///
/// `Server::tcp_nodelay` only applies to listeners tonic binds itself; servers here are handed
/// pre-bound listeners (port 0, tests, `switchyard local`), and without this every small answer
/// waits for Nagle's algorithm and the peer's delayed ACK: ~40 ms per call.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<GuardedConnection>> {
    incoming_with(listener, ConnectionLimits::default())
}

/// [`incoming`] within `limits`.
pub fn incoming_with(
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
) -> impl tokio_stream::Stream<Item = std::io::Result<GuardedConnection>> {
    use tokio_stream::StreamExt;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => return Some(Err(error)),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %stream.peer_addr().map_or_else(|_| "unknown".to_owned(), |peer| peer.to_string()), limit = limits.max_connections, "connection refused: too many open");
            return None;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::warn!(%error, "could not set TCP_NODELAY");
        }
        let silence = Box::pin(tokio::time::sleep(limits.first_bytes_within));
        Some(Ok(GuardedConnection { inner: stream, _slot: slot, silence: Some(silence) }))
    })
}

/// [`incoming_with`] over mutual TLS: each connection's handshake runs on its own task (a slow
/// or silent one delays no other) within `limits.first_bytes_within`; one that fails (no client
/// certificate, another CA) is logged and closed. Each connection carries its peer's
/// [`crate::tls::PeerIdentity`] into every request's extensions.
pub fn incoming_tls(
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
    tls: ServerTls,
) -> impl tokio_stream::Stream<Item = std::io::Result<TlsConnection<tokio_rustls::server::TlsStream<GuardedConnection>>>>
{
    use tokio_stream::StreamExt;
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(incoming_with(listener, limits));
        loop {
            let connection = tokio::select! {
                _ = sender.closed() => return,
                connection = accepted.next() => connection,
            };
            let Some(connection) = connection else { return };
            let connection = match connection {
                Ok(connection) => connection,
                Err(error) => {
                    if sender.send(Err(error)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let (sender, tls) = (sender.clone(), tls.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.first_bytes_within, tls.accept(connection)).await {
                    Ok(Ok(connection)) => {
                        let _ = sender.send(Ok(connection)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake refused"),
                    Err(_) => tracing::debug!("TLS handshake not finished in time"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// An accepted connection holding its slot under [`ConnectionLimits::max_connections`], and closed
/// if its first bytes do not come in time.
#[derive(Debug)]
pub struct GuardedConnection {
    inner: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Until the first bytes are read.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tonic::transport::server::Connected for GuardedConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for GuardedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() && buf.filled().len() > before {
            self.silence = None;
        } else if let (Poll::Pending, Some(silence)) = (&polled, self.silence.as_mut())
            && silence.as_mut().poll(cx).is_ready()
        {
            let error = std::io::Error::new(std::io::ErrorKind::TimedOut, "no bytes from a new connection in time");
            return Poll::Ready(Err(error));
        }
        polled
    }
}

write_to_inner!(impl for GuardedConnection);

/// Bytes a client's connections wrote and read on their TCP sockets: the tensors after protobuf,
/// gRPC and HTTP/2 framing (TLS would be counted too), before TCP/IP headers.
#[derive(Debug, Default)]
pub struct WireCounters {
    sent: AtomicU64,
    received: AtomicU64,
}

impl WireCounters {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A channel presenting `tls` (not the process's identity; plaintext for `None`): the server's
/// certificate must name the URI's host.
pub fn secure_channel(uri: &str, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    dial(uri, tls.cloned())
}

/// What a channel's connector hands HTTP/2: a TCP stream, counted or not, under TLS or not.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A lazily connected channel whose connections run TLS with `tls`, as asked.
fn dial(uri: &str, tls: Option<ClientTls>) -> Result<Channel, tonic::transport::Error> {
    let keepalive = Keepalive::default();
    let endpoint = Endpoint::from_shared(uri.to_owned())?
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout)
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |uri: tonic::transport::Uri| {
        let tls = tls.clone();
        async move {
            let authority = uri.authority().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri} names no host and port"))
            })?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(open(authority, None, tls).await?))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// An [`H2Channel`] to `uri` (the data path's calls), whose connections count their bytes in
/// `counters`; over mutual TLS when the process has an identity, as [`channel`].
pub fn counted_h2_channel(uri: &str, counters: Arc<WireCounters>) -> Result<H2Channel, InvalidOrigin> {
    dial_h2(uri, Some(counters), crate::tls::outgoing().cloned())
}

/// An [`H2Channel`] presenting `tls` (plaintext for `None`), as [`secure_channel`].
pub fn secure_h2_channel(uri: &str, tls: Option<&ClientTls>) -> Result<H2Channel, InvalidOrigin> {
    dial_h2(uri, None, tls.cloned())
}

fn dial_h2(uri: &str, counters: Option<Arc<WireCounters>>, tls: Option<ClientTls>) -> Result<H2Channel, InvalidOrigin> {
    let connector: Connector = Arc::new(move |authority: &http::uri::Authority| {
        let (authority, counters, tls) = (authority.clone(), counters.clone(), tls.clone());
        Box::pin(async move { open(&authority, counters, tls).await })
    });
    H2Channel::new(uri, connector, Keepalive::default())
}

/// A TCP connection to `authority` (host and port) within [`CONNECT_TIMEOUT`], `TCP_NODELAY` set,
/// its bytes counted in `counters` and under `tls` when given.
async fn open(
    authority: &http::uri::Authority,
    counters: Option<Arc<WireCounters>>,
    tls: Option<ClientTls>,
) -> std::io::Result<Box<dyn Io>> {
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let stream =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {authority}")))??;
    stream.set_nodelay(true)?;
    let stream: Box<dyn Io> = match counters {
        Some(counters) => Box::new(CountingStream { inner: stream, counters }),
        None => Box::new(stream),
    };
    Ok(match tls {
        Some(tls) => {
            Box::new(tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(&host, stream)).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("TLS handshake with {authority}"))
            })??)
        }
        None => stream,
    })
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A TCP stream that adds what passes through it to [`WireCounters`].
struct CountingStream {
    inner: tokio::net::TcpStream,
    counters: Arc<WireCounters>,
}

impl tokio::io::AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters.received.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl tokio::io::AsyncWrite for CountingStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = polled {
            self.counters.sent.fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, buffers);
        if let Poll::Ready(Ok(written)) = polled {
            self.counters.sent.fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// A counted connection adds what each read brought, not what its buffer held before, and
    /// what each write took.
    #[tokio::test]
    async fn a_counted_connection_counts_the_bytes_that_cross_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(listener.local_addr().expect("address")), listener.accept());
        let (mut server, _) = server.expect("accept");
        let counters = Arc::new(WireCounters::default());
        let mut counted = CountingStream { inner: client.expect("connect"), counters: counters.clone() };
        assert!(counted.is_write_vectored(), "h2 writes a message's uncopied chunks in one writev");

        counted.write_all(b"request").await.expect("write");
        let mut arrived = [0u8; 7];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut arrived).await.expect("read");
        server.write_all(b"answer").await.expect("write");
        let mut storage = [0u8; 64];
        let mut buffer = tokio::io::ReadBuf::new(&mut storage);
        buffer.put_slice(b"held");
        while buffer.filled().len() < b"held".len() + b"answer".len() {
            std::future::poll_fn(|context| Pin::new(&mut counted).poll_read(context, &mut buffer)).await.expect("read");
        }

        assert_eq!(buffer.filled(), b"heldanswer");
        assert_eq!((counters.sent(), counters.received()), (7, 6));
        counted.shutdown().await.expect("shutdown");
        let closed =
            tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut server, &mut arrived));
        assert_eq!(closed.await.expect("the peer sees the connection end").expect("read"), 0);
    }

    #[test]
    fn a_channel_names_its_peer() {
        let channel = secure_h2_channel("http://127.0.0.1:9", None).expect("a valid origin");
        assert!(format!("{channel:?}").contains("127.0.0.1:9"), "{channel:?}");
    }
}
