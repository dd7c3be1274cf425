//! A listener's connection limits: silent sockets are closed, and past the cap new ones are turned
//! away, so that neither locks real clients out.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use switchyard_common::transport::{ConnectionLimits, incoming_with};
use tokio::io::AsyncReadExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A health server within `limits`, and how many connections it has accepted.
async fn serve(limits: ConnectionLimits) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let incoming = incoming_with(listener, limits).inspect(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming));
    (address, accepted)
}

async fn healthy(address: std::net::SocketAddr) -> bool {
    let Ok(channel) = switchyard_common::transport::channel(&format!("http://{address}")) else { return false };
    let request = HealthCheckRequest { service: String::new() };
    tokio::time::timeout(Duration::from_secs(2), HealthClient::new(channel).check(request))
        .await
        .is_ok_and(|answer| answer.is_ok())
}

/// Reads until the peer closes (0 bytes or an error), or gives up after `within`.
async fn closed_within(socket: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 64];
    let read = async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read).await.is_ok()
}

#[tokio::test]
async fn silent_connections_are_closed_and_past_the_cap_new_ones_are_turned_away() {
    let limits = ConnectionLimits { max_connections: 8, first_bytes_within: Duration::from_millis(300) };
    let (address, _) = serve(limits).await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(address).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Every slot is held by a silent socket: one more is closed at once, and so is a real client.
    let mut extra = tokio::net::TcpStream::connect(address).await.expect("connect");
    assert!(closed_within(&mut extra, Duration::from_millis(200)).await, "past the cap: closed at once");
    assert!(!healthy(address).await, "all 8 slots are taken");
    // The silent ones are closed after 300 ms, which frees their slots.
    for socket in &mut silent {
        assert!(closed_within(socket, Duration::from_secs(2)).await, "a silent connection is closed");
    }
    assert!(healthy(address).await, "a real client gets in once the silent ones are gone");
}

#[tokio::test]
async fn a_busy_client_is_never_cut_by_the_silence_deadline() {
    let limits = ConnectionLimits { max_connections: 8, first_bytes_within: Duration::from_millis(200) };
    let (address, accepted) = serve(limits).await;
    let channel = switchyard_common::transport::channel(&format!("http://{address}")).expect("channel");
    let mut client = HealthClient::new(channel);
    for _ in 0..5 {
        client.check(HealthCheckRequest { service: String::new() }).await.expect("served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A connection cut and dialled again would serve the checks too: one connection did it all.
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the client's connection was never cut");
}
