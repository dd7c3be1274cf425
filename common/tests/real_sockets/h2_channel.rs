//! The data path's HTTP/2 channel against tonic's own server, over real sockets: answers and
//! refusals come back as tonic's client would give them, concurrent calls share one connection
//! whose bytes are counted, a peer that is gone is UNAVAILABLE, a restarted one is reached again,
//! a silent one is found dead by keepalive, mutual TLS works as on tonic's channels, and an answer
//! is used before its status comes (`zero_copy::unary_answer_first`; the server here is h2's own).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use switchyard_common::tls::{self, ClientTls, Role, ServerTls};
use switchyard_common::transport::{self, ConnectionLimits, H2Channel, Keepalive, WireCounters};
use switchyard_proto::zero_copy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus};

const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// A plaintext health server on `listener`, counting the connections it accepts, until `stop`.
fn serve(
    listener: tokio::net::TcpListener,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let incoming = transport::incoming(listener).inspect(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(async move {
        transport::server()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            })
            .await
            .expect("the health server");
    });
    (accepted, server)
}

async fn check(channel: &mut H2Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let request = tonic::Request::new(HealthCheckRequest { service: service.to_owned() });
    let answer: HealthCheckResponse =
        zero_copy::unary(channel, CHECK_PATH, request, transport::MAX_MESSAGE_BYTES).await?;
    Ok(answer.status())
}

#[tokio::test]
async fn answers_and_refusals_come_back_as_tonics_client_gives_them() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("http://{}", listener.local_addr().expect("address"));
    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let (accepted, _server) = serve(listener, stopped);
    let counters = Arc::new(WireCounters::default());
    let channel = transport::counted_h2_channel(&uri, counters.clone()).expect("channel");

    // Eight calls at once on a channel not yet connected: one connection carries them all.
    let calls = (0..8).map(|_| {
        let mut channel = channel.clone();
        async move { check(&mut channel, "").await }
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.expect("a health check"), ServingStatus::Serving);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "concurrent calls share one connection");
    assert!(counters.sent() > 0 && counters.received() > 0, "socket bytes counted: {counters:?}");

    let refused = check(&mut channel.clone(), "no-such-service").await.unwrap_err();
    let mut tonic_client = HealthClient::new(transport::channel(&uri).expect("tonic channel"));
    let tonics = tonic_client.check(HealthCheckRequest { service: "no-such-service".to_owned() }).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (tonics.code(), tonics.message()));
    assert_eq!(refused.code(), Code::NotFound);
}

/// Copies `from` to `to` until either ends, adding what passes into `count`.
async fn pass(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, count: &AtomicU64) {
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(read @ 1..) = from.read(&mut buffer).await {
        count.fetch_add(read as u64, Ordering::SeqCst);
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// Relays one connection from `listener` to `server`, adding the bytes each way into the returned
/// counters as they pass (client to server, server to client).
fn relay(listener: tokio::net::TcpListener, server: std::net::SocketAddr) -> Arc<[AtomicU64; 2]> {
    let relayed = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let counts = relayed.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("the client connects");
        let server = tokio::net::TcpStream::connect(server).await.expect("the server is up");
        let ((client_reads, client_writes), (server_reads, server_writes)) = (client.into_split(), server.into_split());
        tokio::join!(pass(client_reads, server_writes, &counts[0]), pass(server_reads, client_writes, &counts[1]));
    });
    relayed
}

#[tokio::test]
async fn a_counted_channel_counts_every_byte_its_socket_carries_each_way() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("address");
    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let _server = serve(listener, stopped);
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("http://{}", front.local_addr().expect("address"));
    let relayed = relay(front, server);

    let counters = Arc::new(WireCounters::default());
    let mut channel = transport::counted_h2_channel(&uri, counters.clone()).expect("channel");
    for service in ["", "no-such-service", ""] {
        let _ = check(&mut channel, service).await;
    }
    // Frames either side sends after an answer (settings acknowledgements) may still be on their
    // way: the counts must meet, not merely grow.
    let counted = || (counters.sent(), counters.received());
    let passed = || (relayed[0].load(Ordering::SeqCst), relayed[1].load(Ordering::SeqCst));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while counted() != passed() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counted(), passed(), "(sent, received) as the channel counted them and as they passed");
    assert!(counted().0 > 100 && counted().1 > 100, "three calls' bytes: {counters:?}");
}

#[tokio::test]
async fn a_peer_that_is_gone_is_unavailable_and_a_restarted_one_is_reached_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let uri = format!("http://{address}");
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (_, server) = serve(listener, stopped);
    let mut channel = transport::secure_h2_channel(&uri, None).expect("channel");
    assert_eq!(check(&mut channel, "").await.expect("served"), ServingStatus::Serving);

    stop.send(()).expect("stop the server");
    server.await.expect("the server stopped");
    let gone = check(&mut channel, "").await.unwrap_err();
    assert_eq!(gone.code(), Code::Unavailable, "{gone:?}");
    assert!(gone.message().contains(&address.to_string()), "the message names the peer: {gone:?}");

    let listener = tokio::net::TcpListener::bind(address).await.expect("the same port again");
    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let (accepted, _server) = serve(listener, stopped);
    assert_eq!(check(&mut channel, "").await.expect("reached again"), ServingStatus::Serving);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_uri_without_host_and_port_is_refused_by_name() {
    let error = transport::secure_h2_channel("/just/a/path", None).unwrap_err();
    assert_eq!(
        error.to_string(),
        "\"/just/a/path\" names no host and port (expected http://HOST:PORT or https://HOST:PORT)"
    );
}

#[tokio::test]
async fn mutual_tls_is_spoken_with_the_given_certificates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    tls::write_dev_certs(dir.path(), &hosts, &[]).expect("certificates");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("https://{}", listener.local_addr().expect("address"));
    let server_tls = ServerTls::load(tls::dev_files(dir.path(), Role::Worker)).expect("server certificates");
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(transport::server().add_service(health).serve_with_incoming(transport::incoming_tls(
        listener,
        ConnectionLimits::default(),
        server_tls,
    )));

    let client_tls = ClientTls::load(tls::dev_files(dir.path(), Role::Client)).expect("client certificates");
    let mut channel = transport::secure_h2_channel(&uri, Some(&client_tls)).expect("channel");
    assert_eq!(check(&mut channel, "").await.expect("over TLS"), ServingStatus::Serving);

    // No certificate: no handshake, so no call.
    let plaintext = check(&mut transport::secure_h2_channel(&uri, None).expect("channel"), "").await.unwrap_err();
    assert_eq!(plaintext.code(), Code::Unavailable, "{plaintext:?}");
}

/// Calls waiting on a connect that fails get its failure: one attempt, not one per call in turn
/// (each up to the connect timeout against a peer that does not answer).
#[tokio::test]
async fn calls_waiting_on_a_failed_connect_share_its_failure() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let connector: transport::Connector = Arc::new(move |_: &_| {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))
        })
    });
    let channel = H2Channel::new("http://192.0.2.1:9", connector, Keepalive::default()).expect("channel");
    let calls = (0..8).map(|_| {
        let mut channel = channel.clone();
        async move { check(&mut channel, "").await }
    });
    for failed in futures::future::join_all(calls).await {
        let status = failed.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "connecting to http://192.0.2.1:9: no answer");
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    // A later call tries again.
    let again = check(&mut channel.clone(), "").await.expect_err("still nobody answers");
    assert_eq!(again.code(), Code::Unavailable);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

/// A peer that takes the connection and then says nothing (a host gone without a reset): the
/// unanswered keepalive ping closes the connection, its call fails UNAVAILABLE instead of waiting
/// forever, and the next call connects again.
#[tokio::test]
async fn a_silent_peer_is_found_dead_by_keepalive() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            // Read nothing, answer nothing: kept open, silent.
            held.push(socket);
        }
    });
    let connector: transport::Connector = Arc::new(move |_: &_| {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(address).await?;
            Ok(Box::new(stream) as switchyard_common::h2_channel::Io)
        })
    });
    let keepalive = Keepalive { interval: Duration::from_millis(100), timeout: Duration::from_millis(100) };
    let mut channel = H2Channel::new(&format!("http://{address}"), connector, keepalive).expect("channel");

    let started = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), check(&mut channel, ""))
        .await
        .expect("keepalive ends the call long before this")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() >= keepalive.interval, "ended by the ping, not before: {:?}", started.elapsed());
    let again = tokio::time::timeout(Duration::from_secs(10), check(&mut channel, "")).await;
    assert!(again.expect("the next call ends the same way").is_err(), "the peer is still silent");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the next call connected again");
}

/// A server that answers each call's message at once and its status only when `release` says
/// which: what h2 does when it writes a worker's trailers after its answer.
fn serve_status_later(listener: tokio::net::TcpListener, release: tokio::sync::mpsc::UnboundedReceiver<&'static str>) {
    let release = Arc::new(tokio::sync::Mutex::new(release));
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        let mut connection = h2::server::handshake(socket).await.expect("handshake");
        // Accepting drives the connection (its writes too) while each stream waits on its own.
        while let Some(accepted) = connection.accept().await {
            let (_request, mut respond) = accepted.expect("a stream");
            let release = release.clone();
            tokio::spawn(async move {
                let answer = HealthCheckResponse { status: ServingStatus::Serving as i32 };
                let message: bytes::Bytes = zero_copy::encode_frame(&answer).expect("encodes").concat().into();
                let response = tonic::codegen::http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .expect("a response");
                let mut body = respond.send_response(response, false).expect("headers sent");
                body.send_data(message, false).expect("message sent");
                let code = release.lock().await.recv().await.expect("a status to send");
                let mut trailers = tonic::codegen::http::HeaderMap::new();
                trailers.insert("grpc-status", tonic::codegen::http::HeaderValue::from_static(code));
                body.send_trailers(trailers).expect("status sent");
            });
        }
    });
}

/// `Forward`'s caller uses an answer once its last byte is in: the status is still held back by
/// the server when the answer is returned, and is read (and checked) afterwards.
#[tokio::test]
async fn an_answer_is_returned_before_its_status_which_is_checked_after() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("http://{}", listener.local_addr().expect("address"));
    let (release, released) = tokio::sync::mpsc::unbounded_channel();
    serve_status_later(listener, released);
    let mut channel = transport::counted_h2_channel(&uri, Arc::new(WireCounters::default())).expect("channel");
    let request = || tonic::Request::new(HealthCheckRequest { service: String::new() });

    for (code, expected) in [("0", Code::Ok), ("14", Code::Unavailable)] {
        let answered = tokio::time::timeout(
            Duration::from_secs(10),
            zero_copy::unary_answer_first::<_, _, HealthCheckResponse>(
                &mut channel,
                CHECK_PATH,
                request(),
                transport::MAX_MESSAGE_BYTES,
            ),
        )
        .await
        .expect("answered while the server holds the status back")
        .expect("an answer");
        assert_eq!(answered.answer.status(), ServingStatus::Serving);
        let rest = answered.rest.expect("the status has not come yet");
        release.send(code).expect("the server is up");
        let status = tokio::time::timeout(Duration::from_secs(10), rest.finish()).await.expect("the status comes");
        assert_eq!(status.err().map_or(Code::Ok, |status| status.code()), expected, "status {code}");
    }

    // A plain unary call waits for the status.
    let mut waiting = channel.clone();
    let call = tokio::spawn(async move {
        zero_copy::unary::<_, _, HealthCheckResponse>(&mut waiting, CHECK_PATH, request(), transport::MAX_MESSAGE_BYTES)
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished(), "a unary call is not done before its status");
    release.send("0").expect("the server is up");
    let answer = tokio::time::timeout(Duration::from_secs(10), call).await.expect("done").expect("joins");
    assert_eq!(answer.expect("an answer").status(), ServingStatus::Serving);
}
