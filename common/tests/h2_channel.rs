//! The data path's HTTP/2 channel against tonic's own server, over real sockets: answers and
//! refusals come back as tonic's client would give them, concurrent calls share one connection
//! whose bytes are counted, a peer that is gone is UNAVAILABLE, a restarted one is reached again,
//! a silent one is found dead by keepalive, and mutual TLS works as on tonic's channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use switchyard_common::tls::{self, ClientTls, Role, ServerTls};
use switchyard_common::transport::{self, ConnectionLimits, H2Channel, Keepalive, WireCounters};
use switchyard_proto::zero_copy;
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
    assert!(check(&mut channel.clone(), "").await.is_err());
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
