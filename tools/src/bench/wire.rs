//! The limits of this machine's wire, measured in the same run as the expert dispatch: raw TCP on
//! loopback over one connection and over several at once, and a plain gRPC echo of the same bytes,
//! with the same transport settings. Each server runs on its own threads (its own Tokio runtime for
//! gRPC), as a worker process would.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_common::transport::H2Channel;
use switchyard_loadtest::shaped_network::Host;
use switchyard_proto::v1::EchoMessage;
use switchyard_proto::v1::wire_echo_client::WireEchoClient;
use switchyard_proto::v1::wire_echo_server::{WireEcho, WireEchoServer};
use switchyard_proto::zero_copy::CallChannel;
use tonic::{Request, Response, Status};

/// One transfer pattern at one message size: the mean over `repeats` after one unmeasured round.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WireFigure {
    pub bytes: u64,
    pub repeats: u32,
    /// Mean time of one transfer (one-way: until the 1-byte or empty acknowledgement is back).
    pub mean_us: f64,
    /// Bytes moved (both directions for an echo) per second, in GB/s (10⁹).
    pub gb_per_s: f64,
}

impl WireFigure {
    /// A one-way transfer's figure from its times (the acknowledgement's byte counted).
    pub fn one_way(bytes: u64, times: &[Duration]) -> Self {
        Self::from_times(bytes, bytes + 1, times)
    }

    /// An echo's figure from its times: the bytes went and came back.
    pub fn echo(bytes: u64, times: &[Duration]) -> Self {
        Self::from_times(bytes, 2 * bytes, times)
    }

    /// The figure of transfers of `bytes` to each of `receivers` at once: all of them counted.
    pub fn to_every_receiver(bytes: u64, receivers: u64, times: &[Duration]) -> Self {
        Self::from_times(bytes * receivers, (bytes + 1) * receivers, times)
    }

    fn from_times(bytes: u64, moved: u64, times: &[Duration]) -> Self {
        let mean = times.iter().sum::<Duration>().as_secs_f64() / times.len().max(1) as f64;
        Self { bytes, repeats: times.len() as u32, mean_us: mean * 1e6, gb_per_s: moved as f64 / mean.max(1e-12) / 1e9 }
    }
}

/// The baselines at one size.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WireBaselines {
    pub tcp_one_way: WireFigure,
    pub tcp_echo: WireFigure,
    pub grpc_one_way: WireFigure,
    pub grpc_echo: WireFigure,
    /// The same bytes split over [`WireBaselines::tcp_connections`] connections written at once
    /// (none in reports written before it was measured).
    #[serde(default)]
    pub tcp_striped_one_way: Option<WireFigure>,
    #[serde(default)]
    pub tcp_connections: u32,
    /// The gRPC one-way transfer as `Forward` sends rows: uncopied ([`switchyard_proto::zero_copy`])
    /// on the data path's own HTTP/2 channel ([`H2Channel`]); beside `grpc_one_way` (tonic's
    /// client and channel) it is what the encode copy and tonic's hand-offs cost.
    #[serde(default)]
    pub grpc_one_way_uncopied: Option<WireFigure>,
}

/// Connections of the striped TCP baseline: one per core, at least 2.
pub fn striped_connections() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from).max(2)
}

/// Measures every baseline for messages of `bytes`.
pub async fn measure(bytes: usize, repeats: u32) -> std::io::Result<WireBaselines> {
    let connections = striped_connections();
    let (tcp_one_way, tcp_echo, tcp_striped) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        Ok((tcp(bytes, repeats, false)?, tcp(bytes, repeats, true)?, tcp_striped(bytes, repeats, connections)?))
    })
    .await
    .map_err(std::io::Error::other)??;
    let (grpc_one_way, grpc_echo, grpc_one_way_uncopied) = grpc(bytes, repeats).await?;
    Ok(WireBaselines {
        tcp_one_way,
        tcp_echo,
        grpc_one_way,
        grpc_echo,
        tcp_striped_one_way: Some(tcp_striped),
        tcp_connections: connections as u32,
        grpc_one_way_uncopied: Some(grpc_one_way_uncopied),
    })
}

/// `bytes` split over `connections` TCP connections on 127.0.0.1, each written by its own thread
/// at the same moment and acknowledged with one byte; a transfer ends when every share is in.
fn tcp_striped(bytes: usize, repeats: u32, connections: usize) -> std::io::Result<WireFigure> {
    let share = bytes.div_ceil(connections);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let times = tcp_at_once(&[listener], connections, share, repeats, ReceiveBuffer::Allocated, Before::PreviousRound)?;
    let sent = share * connections;
    Ok(WireFigure::from_times(sent as u64, (sent + connections) as u64, &times))
}

/// Where a raw TCP baseline's receivers put the bytes they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveBuffer {
    /// A vector from the allocator, wherever it lands: what the bench measures.
    Allocated,
    /// A buffer starting this many bytes into a page (`examples/receive_alignment.rs`).
    AtPageOffset(usize),
}

const PAGE_BYTES: usize = 4096;

impl ReceiveBuffer {
    /// Storage for a buffer of `len` bytes, and where in it the buffer starts.
    fn storage(self, len: usize) -> (Vec<u8>, usize) {
        match self {
            Self::Allocated => (vec![0u8; len], 0),
            Self::AtPageOffset(offset) => {
                let offset = offset % PAGE_BYTES;
                let storage = vec![1u8; len + offset + PAGE_BYTES];
                let address = storage.as_ptr() as usize;
                (storage, address.next_multiple_of(PAGE_BYTES) - address + offset)
            }
        }
    }
}

/// What each round of a raw TCP baseline follows (`examples/busy_before_transfer.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// The previous round, at once: what the bench measures, a machine that has just been moving
    /// these bytes.
    PreviousRound,
    /// Every core kept busy this long, spinning without memory traffic, as a layer call's gate
    /// keeps the client's cores before its dispatch.
    BusyCores(Duration),
    /// Nothing to do for this long.
    Idle(Duration),
}

impl Before {
    /// Lets this pass on this thread, the round's senders and receivers waiting.
    fn pass(self) {
        match self {
            Self::PreviousRound => {}
            Self::Idle(time) => std::thread::sleep(time),
            Self::BusyCores(time) => {
                let until = Instant::now() + time;
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                std::thread::scope(|scope| {
                    for _ in 0..cores {
                        scope.spawn(|| {
                            let mut state = 1u64;
                            while Instant::now() < until {
                                state =
                                    std::hint::black_box(state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
                            }
                        });
                    }
                });
            }
        }
    }
}

/// A raw TCP figure whose every round came right after every core was kept busy this long.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AfterBusyCores {
    pub busy_us: f64,
    pub figure: WireFigure,
}

/// The times of transfers of `share` bytes over `connections_each` connections to each of
/// `listeners`, every connection written by its own thread at the same moment and acknowledged
/// with one byte, each receiver reading into `buffer`; a transfer ends when every share is in.
fn tcp_at_once(
    listeners: &[TcpListener],
    connections_each: usize,
    share: usize,
    repeats: u32,
    buffer: ReceiveBuffer,
    before: Before,
) -> std::io::Result<Vec<Duration>> {
    let connections = listeners.len() * connections_each;
    let mut client_sockets = Vec::with_capacity(connections);
    let mut servers = Vec::with_capacity(connections);
    for listener in listeners {
        let address = listener.local_addr()?;
        // Connections complete into the listen backlog; accepting them afterwards pairs them up.
        for _ in 0..connections_each {
            client_sockets.push(TcpStream::connect(address)?);
        }
        for _ in 0..connections_each {
            let (mut socket, _) = listener.accept()?;
            servers.push(std::thread::spawn(move || -> std::io::Result<()> {
                let (mut storage, start) = buffer.storage(share);
                let buffer = &mut storage[start..start + share];
                for _ in 0..=repeats {
                    socket.read_exact(buffer)?;
                    socket.write_all(&[1])?;
                }
                Ok(())
            }));
        }
    }
    // Every sender and this thread meet at the start and the end of each round.
    let parties = client_sockets.len() + 1;
    let (start, done) = (Arc::new(Barrier::new(parties)), Arc::new(Barrier::new(parties)));
    let clients: Vec<_> = client_sockets
        .into_iter()
        .map(|mut socket| {
            socket.set_nodelay(true)?;
            let (start, done) = (start.clone(), done.clone());
            Ok(std::thread::spawn(move || -> std::io::Result<()> {
                let payload = vec![0x5au8; share];
                let mut acknowledgement = [0u8; 1];
                for _ in 0..=repeats {
                    start.wait();
                    let sent = socket.write_all(&payload).and_then(|()| socket.read_exact(&mut acknowledgement));
                    done.wait();
                    sent?;
                }
                Ok(())
            }))
        })
        .collect::<std::io::Result<_>>()?;
    let mut times = Vec::with_capacity(repeats as usize);
    for round in 0..=repeats {
        before.pass();
        let started = Instant::now();
        start.wait();
        done.wait();
        if round > 0 {
            times.push(started.elapsed());
        }
    }
    for thread in clients.into_iter().chain(servers) {
        thread.join().map_err(|_| std::io::Error::other("a TCP baseline thread panicked"))??;
    }
    Ok(times)
}

/// Blocking TCP on 127.0.0.1: the client writes `bytes`; the server answers them back (`echo`) or
/// with one byte.
fn tcp(bytes: usize, repeats: u32, echo: bool) -> std::io::Result<WireFigure> {
    let times = tcp_times(|| TcpListener::bind("127.0.0.1:0"), bytes, repeats, echo)?;
    Ok(if echo { WireFigure::echo(bytes as u64, &times) } else { WireFigure::one_way(bytes as u64, &times) })
}

/// The times of `repeats` one-way transfers of `bytes` over one TCP connection on 127.0.0.1 (a
/// fresh one, after one unmeasured transfer), on a blocking thread: a share of a baseline measured
/// in rounds ([`WireFigure::one_way`] of them all).
pub async fn tcp_one_way_times(bytes: usize, repeats: u32) -> std::io::Result<Vec<Duration>> {
    loopback_times(bytes, repeats, false).await
}

/// The times of `repeats` echoes of `bytes` (there and back), as [`tcp_one_way_times`].
pub async fn tcp_echo_times(bytes: usize, repeats: u32) -> std::io::Result<Vec<Duration>> {
    loopback_times(bytes, repeats, true).await
}

async fn loopback_times(bytes: usize, repeats: u32, echo: bool) -> std::io::Result<Vec<Duration>> {
    tokio::task::spawn_blocking(move || tcp_times(|| TcpListener::bind("127.0.0.1:0"), bytes, repeats, echo))
        .await
        .map_err(|_| std::io::Error::other("the TCP baseline panicked"))?
}

/// Raw TCP one way over `host`'s shaped link: the server on a thread in the host's namespace,
/// this thread the client. What the link carries at best, beside the rate.
pub async fn tcp_over_link(host: &Host, bytes: usize, repeats: u32) -> std::io::Result<WireFigure> {
    let host = host.clone();
    let listen = move || {
        host.enter_on_this_thread()?;
        TcpListener::bind((host.address, 0))
    };
    let times = tokio::task::spawn_blocking(move || tcp_times(listen, bytes, repeats, false))
        .await
        .map_err(|_| std::io::Error::other("the link baseline panicked"))??;
    Ok(WireFigure::one_way(bytes as u64, &times))
}

/// Raw TCP one way over every host's shaped link at once, `bytes` on each (one connection per
/// link, written together each round): the figure of one link while all carry their share, what
/// this machine's client moves to all its workers together at best.
pub async fn tcp_over_links_at_once(hosts: &[Host], bytes: usize, repeats: u32) -> std::io::Result<WireFigure> {
    let hosts = hosts.to_vec();
    let times = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        // A listening socket stays in the namespace it was made in, whichever thread accepts.
        let listeners = hosts
            .into_iter()
            .map(|host| {
                std::thread::spawn(move || {
                    host.enter_on_this_thread()?;
                    TcpListener::bind((host.address, 0))
                })
                .join()
                .map_err(|_| std::io::Error::other("binding in a host's namespace panicked"))?
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        tcp_at_once(&listeners, 1, bytes, repeats, ReceiveBuffer::Allocated, Before::PreviousRound)
    })
    .await
    .map_err(|_| std::io::Error::other("the links baseline panicked"))??;
    Ok(WireFigure::one_way(bytes as u64, &times))
}

/// The times of raw TCP transfers on 127.0.0.1 to `receivers` servers at once, `bytes` to each
/// over a connection of its own, every connection written by its own thread at the same moment
/// (after one unmeasured round), each round after `before`: a call's dispatch to that many workers
/// with the TCP stack alone, its senders and receivers sharing this machine's cores as the client
/// and workers do.
pub async fn tcp_to_every_receiver_times(
    receivers: usize,
    bytes: usize,
    repeats: u32,
    before: Before,
) -> std::io::Result<Vec<Duration>> {
    tokio::task::spawn_blocking(move || {
        tcp_to_every_receiver(receivers, bytes, repeats, ReceiveBuffer::Allocated, before)
    })
    .await
    .map_err(|_| std::io::Error::other("the fan-out baseline panicked"))?
}

/// [`tcp_to_every_receiver_times`] on this thread, each receiver reading into `buffer`, each round
/// after `before`.
pub fn tcp_to_every_receiver(
    receivers: usize,
    bytes: usize,
    repeats: u32,
    buffer: ReceiveBuffer,
    before: Before,
) -> std::io::Result<Vec<Duration>> {
    let listeners =
        (0..receivers.max(1)).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    tcp_at_once(&listeners, 1, bytes, repeats, buffer, before)
}

/// The times of [`tcp`]'s transfers to a server listening where `listen` (run on the server's
/// thread) binds.
fn tcp_times(
    listen: impl FnOnce() -> std::io::Result<TcpListener> + Send + 'static,
    bytes: usize,
    repeats: u32,
    echo: bool,
) -> std::io::Result<Vec<Duration>> {
    let (bound, address) = std::sync::mpsc::channel();
    let answer_bytes = if echo { bytes } else { 1 };
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let listener = listen().inspect_err(|error| {
            let _ = bound.send(Err(std::io::Error::new(error.kind(), error.to_string())));
        })?;
        let _ = bound.send(listener.local_addr());
        let (mut socket, _) = listener.accept()?;
        socket.set_nodelay(true)?;
        let mut buffer = vec![0u8; bytes];
        for _ in 0..=repeats {
            socket.read_exact(&mut buffer)?;
            socket.write_all(&buffer[..answer_bytes])?;
        }
        Ok(())
    });
    let address = address.recv().map_err(|_| std::io::Error::other("the TCP server thread ended"))??;
    let mut socket = TcpStream::connect(address)?;
    socket.set_nodelay(true)?;
    let payload = vec![0x5au8; bytes];
    let mut answer = vec![0u8; answer_bytes];
    let mut times = Vec::with_capacity(repeats as usize);
    for round in 0..=repeats {
        let started = Instant::now();
        socket.write_all(&payload)?;
        socket.read_exact(&mut answer)?;
        if round > 0 {
            times.push(started.elapsed());
        }
    }
    server.join().map_err(|_| std::io::Error::other("the TCP echo server panicked"))??;
    Ok(times)
}

/// The gRPC echo the baselines call: the payload back, or nothing when asked to discard it.
struct Echo;

#[tonic::async_trait]
impl WireEcho for Echo {
    async fn echo(&self, request: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        let message = request.into_inner();
        let payload = if message.discard { Bytes::new() } else { message.payload };
        Ok(Response::new(EchoMessage { payload, discard: false }))
    }
}

/// The path of `WireEcho.Echo`, for the uncopied client.
const ECHO_PATH: &str = "/switchyard.v1.WireEcho/Echo";

/// A gRPC echo server with the project's transport settings on a runtime thread of its own, as
/// a worker process serves; stopped (not gracefully) when dropped.
pub struct EchoServer {
    address: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl EchoServer {
    /// On a runtime of one worker thread, as the bench's baselines run it.
    pub fn start() -> std::io::Result<Self> {
        Self::start_on(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?)
    }

    /// On `runtime`, whichever flavor it is: its thread blocks on the server's stop.
    pub fn start_on(runtime: tokio::runtime::Runtime) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The runtime is dropped on its own thread, never inside the caller's async context.
        let thread = std::thread::spawn(move || -> std::io::Result<()> {
            let listener = {
                let _entered = runtime.enter();
                tokio::net::TcpListener::from_std(listener)?
            };
            let service = WireEchoServer::new(Echo)
                .max_decoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES);
            runtime.spawn(
                switchyard_common::transport::server()
                    .add_service(service)
                    .serve_with_incoming(switchyard_common::transport::incoming(listener)),
            );
            let _ = runtime.block_on(stopped);
            // Not graceful: a graceful stop would wait for the client's connection to time out.
            runtime.shutdown_background();
            Ok(())
        });
        Ok(Self { address, stop: Some(stop), thread: Some(thread) })
    }

    /// A channel to this server, plaintext whatever identity this process presents elsewhere:
    /// the machine's limits.
    pub fn channel(&self) -> std::io::Result<tonic::transport::Channel> {
        switchyard_common::transport::secure_channel(&format!("http://{}", self.address), None)
            .map_err(std::io::Error::other)
    }

    /// The data path's channel to this server ([`H2Channel`]), plaintext.
    pub fn h2_channel(&self) -> std::io::Result<H2Channel> {
        switchyard_common::transport::secure_h2_channel(&format!("http://{}", self.address), None)
            .map_err(std::io::Error::other)
    }

    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| std::io::Error::other("the gRPC echo server panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}

/// The times of `repeats` calls of tonic's generated echo client, after one unmeasured call: with
/// the payload back, or (`discard`) only an empty answer.
pub async fn echo_calls(
    channel: tonic::transport::Channel,
    bytes: usize,
    repeats: u32,
    discard: bool,
) -> std::io::Result<Vec<Duration>> {
    let mut client = WireEchoClient::new(channel)
        .max_decoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES);
    timed_echoes("the gRPC echo", bytes, repeats, discard, async |message| {
        Ok(client.echo(message).await?.into_inner().payload.len())
    })
    .await
}

/// The times of `repeats` echoes on `channel` as Forward calls go (the payload sent uncopied,
/// `zero_copy::unary`), after one unmeasured: with the payload back, or (`discard`) only an empty
/// answer.
pub async fn uncopied_echo_calls(
    channel: &mut impl CallChannel,
    bytes: usize,
    repeats: u32,
    discard: bool,
) -> std::io::Result<Vec<Duration>> {
    timed_echoes("the uncopied gRPC echo", bytes, repeats, discard, async |message| {
        let request = tonic::Request::new(message);
        let answer: EchoMessage = switchyard_proto::zero_copy::unary(
            channel,
            ECHO_PATH,
            request,
            switchyard_common::transport::MAX_MESSAGE_BYTES,
        )
        .await?;
        Ok(answer.payload.len())
    })
    .await
}

/// Times `repeats` calls of `echo` (after one unmeasured), each sending `bytes` with `discard` and
/// answering the length of the payload it got back, which must be all of it (none if discarded).
async fn timed_echoes(
    name: &str,
    bytes: usize,
    repeats: u32,
    discard: bool,
    mut echo: impl AsyncFnMut(EchoMessage) -> Result<usize, Status>,
) -> std::io::Result<Vec<Duration>> {
    let payload = Bytes::from(vec![0x5au8; bytes]);
    let expected = if discard { 0 } else { bytes };
    let mut times = Vec::with_capacity(repeats as usize);
    for round in 0..=repeats {
        let started = Instant::now();
        let answered = echo(EchoMessage { payload: payload.clone(), discard })
            .await
            .map_err(|status| std::io::Error::other(status.to_string()))?;
        if round > 0 {
            times.push(started.elapsed());
        }
        if answered != expected {
            return Err(std::io::Error::other(format!("{name} answered {answered} bytes for {expected}")));
        }
    }
    Ok(times)
}

/// The times of `repeats` plain gRPC echoes of `bytes` (after one unmeasured) to a server of their
/// own: what a round trip of that size costs through tonic and h2 on this machine before any
/// Switchyard code runs.
pub async fn grpc_echo_times(bytes: usize, repeats: u32) -> std::io::Result<Vec<Duration>> {
    let server = EchoServer::start()?;
    let times = echo_calls(server.channel()?, bytes, repeats, false).await?;
    server.stop()?;
    Ok(times)
}

/// A gRPC echo server on its own runtime thread, and a client with the project's transport
/// settings: one-way and echo through tonic's generated client, then one-way as Forward requests
/// go (uncopied, on the data path's [`H2Channel`]).
async fn grpc(bytes: usize, repeats: u32) -> std::io::Result<(WireFigure, WireFigure, WireFigure)> {
    let server = EchoServer::start()?;
    let channel = server.channel()?;
    let one_way = echo_calls(channel.clone(), bytes, repeats, true).await?;
    let echo = echo_calls(channel, bytes, repeats, false).await?;
    let uncopied = uncopied_echo_calls(&mut server.h2_channel()?, bytes, repeats, true).await?;
    server.stop()?;
    let bytes_moved = bytes as u64;
    Ok((
        WireFigure::from_times(bytes_moved, bytes_moved, &one_way),
        WireFigure::echo(bytes_moved, &echo),
        WireFigure::from_times(bytes_moved, bytes_moved, &uncopied),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_grpc_echo_is_timed_once_per_repeat() {
        let times = grpc_echo_times(4096, 5).await.expect("gRPC echoes");
        assert_eq!(times.len(), 5, "the unmeasured first call is left out");
        assert!(times.iter().all(|time| !time.is_zero()), "{times:?}");
    }

    #[tokio::test]
    async fn each_baseline_measured_in_rounds_gives_one_time_per_repeat() {
        let one_way = tcp_one_way_times(4096, 3).await.expect("one-way transfers");
        let echo = tcp_echo_times(4096, 3).await.expect("echoes");
        let fan_out = tcp_to_every_receiver_times(2, 4096, 3, Before::PreviousRound).await.expect("fan-out");
        for times in [one_way, echo, fan_out] {
            assert_eq!(times.len(), 3, "the unmeasured first transfer is left out");
            assert!(times.iter().all(|time| !time.is_zero()), "{times:?}");
        }
    }

    #[tokio::test]
    async fn every_baseline_moves_its_bytes_and_reports_a_rate() {
        let baselines = measure(256 * 1024, 3).await.expect("loopback baselines");
        let striped = baselines.tcp_striped_one_way.expect("striped TCP");
        let uncopied = baselines.grpc_one_way_uncopied.expect("uncopied gRPC");
        assert_eq!(baselines.tcp_connections as usize, striped_connections());
        assert!(striped_connections() >= 2, "striping takes two connections at least");
        for figure in
            [baselines.tcp_one_way, baselines.tcp_echo, baselines.grpc_one_way, baselines.grpc_echo, striped, uncopied]
        {
            assert_eq!((figure.bytes.div_ceil(1024), figure.repeats), (256, 3));
            assert!(figure.mean_us > 0.0 && figure.gb_per_s > 0.0, "{figure:?}");
        }
        // An echo moves twice the bytes of a one-way transfer; a striped one its shares and each
        // connection's acknowledgement.
        let implied = |figure: WireFigure| figure.gb_per_s * figure.mean_us * 1e3;
        assert!((implied(baselines.tcp_echo) / implied(baselines.tcp_one_way) - 2.0).abs() < 0.01);
        let moved = striped.bytes as f64 + f64::from(baselines.tcp_connections);
        assert!((implied(striped) / moved - 1.0).abs() < 1e-9, "{} bytes for {moved}", implied(striped));
    }

    #[test]
    fn a_figure_counts_the_bytes_its_pattern_moves_over_the_mean_time() {
        let micros = |values: &[u64]| values.iter().map(|us| Duration::from_micros(*us)).collect::<Vec<_>>();
        use crate::bench::results::tests::close;
        // 1000 bytes and the 1-byte acknowledgement in 2 µs on average.
        let one_way = WireFigure::one_way(1000, &micros(&[1, 3]));
        assert_eq!((one_way.bytes, one_way.repeats), (1000, 2));
        assert!(close(one_way.mean_us, 2.0) && close(one_way.gb_per_s, 1001.0 / 2e-6 / 1e9), "{one_way:?}");
        let echo = WireFigure::echo(1000, &micros(&[4]));
        assert!(close(echo.mean_us, 4.0) && close(echo.gb_per_s, 0.5), "{echo:?}");
        // Three receivers of 1000 bytes each, each acknowledging with a byte.
        let fan_out = WireFigure::to_every_receiver(1000, 3, &micros(&[2, 4, 6]));
        assert_eq!((fan_out.bytes, fan_out.repeats), (3000, 3));
        assert!(close(fan_out.mean_us, 4.0) && close(fan_out.gb_per_s, 3003.0 / 4e-6 / 1e9), "{fan_out:?}");
    }

    #[test]
    fn a_receive_buffer_starts_where_it_is_asked_to_in_its_page() {
        for (asked, expected) in [(0, 0), (16, 16), (2048, 2048), (PAGE_BYTES + 64, 64)] {
            let (storage, start) = ReceiveBuffer::AtPageOffset(asked).storage(1000);
            assert_eq!((storage.as_ptr() as usize + start) % PAGE_BYTES, expected, "asked {asked}");
            assert!(start + 1000 <= storage.len(), "the buffer fits its storage");
        }
        let (storage, start) = ReceiveBuffer::Allocated.storage(1000);
        assert_eq!((storage.len(), start), (1000, 0));
    }

    #[test]
    fn busy_cores_spin_for_the_time_asked_where_idle_ones_sleep() {
        use switchyard_experts::peak::process_cpu_time;
        let pass = |before: Before| {
            let (started, cpu) = (Instant::now(), process_cpu_time());
            before.pass();
            (started.elapsed(), process_cpu_time() - cpu)
        };
        let time = Duration::from_millis(40);
        let (wall, cpu) = pass(Before::BusyCores(time));
        assert!(wall >= time && cpu >= time / 2, "busy for {time:?}: {wall:?} passed, {cpu:?} of CPU used");
        let (wall, _) = pass(Before::Idle(time));
        assert!(wall >= time, "idle for {time:?}: {wall:?} passed");
        let (wall, _) = pass(Before::PreviousRound);
        assert!(wall < time, "nothing to wait for: {wall:?}");
    }

    #[test]
    fn every_receiver_gets_its_bytes_in_each_measured_round() {
        let times = tcp_to_every_receiver(3, 10_000, 4, ReceiveBuffer::AtPageOffset(16), Before::PreviousRound)
            .expect("loopback transfers");
        assert_eq!(times.len(), 4, "one time per measured round, the unmeasured one left out");
        assert!(times.iter().all(|time| !time.is_zero()));
    }
}
