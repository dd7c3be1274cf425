//! What the Tokio runtime's thread hand-offs add to a small gRPC call: the bench's 4 KiB echo
//! with the client and the server each on a current-thread runtime or a multi-thread one of N
//! workers, with the project's transport settings.
//!
//! h2 holds a client stream's DATA until the connection task has written its HEADERS, so every
//! request passes connection task → body task → connection task before its bytes leave; on a
//! multi-thread runtime those hand-offs can land on another worker thread and each costs a wake.
//!
//! `cargo run --release -p switchyard-tools --example runtime_echo -- CLIENT SERVER [BYTES] [REPEATS]`
//! where CLIENT and SERVER are `current` or a worker count (default 4096 bytes, 3000 repeats).

use std::time::Instant;

use bytes::Bytes;
use switchyard_common::transport::MAX_MESSAGE_BYTES;
use switchyard_proto::v1::EchoMessage;
use switchyard_proto::v1::wire_echo_client::WireEchoClient;
use switchyard_proto::v1::wire_echo_server::WireEchoServer;
use switchyard_tools::bench::wire::Echo;

/// Unmeasured calls before the timed ones: connection set-up and the first windows.
const WARMUP_CALLS: usize = 100;

fn runtime(kind: &str) -> std::io::Result<tokio::runtime::Runtime> {
    match kind {
        "current" => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        workers => {
            let workers = workers.parse().map_err(|_| {
                std::io::Error::other(format!("{workers:?}: expected `current` or a number of worker threads"))
            })?;
            tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let client_kind = arguments.next().unwrap_or_else(|| "current".to_owned());
    let server_kind = arguments.next().unwrap_or_else(|| "2".to_owned());
    let bytes = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(4096);
    let repeats: usize = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(3000);

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let server_runtime = runtime(&server_kind)?;
    let listener = {
        let _entered = server_runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    // A current-thread runtime runs its tasks only while blocked on: the server keeps a thread.
    std::thread::spawn(move || {
        server_runtime.block_on(
            switchyard_common::transport::server()
                .add_service(
                    WireEchoServer::new(Echo)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                )
                .serve_with_incoming(switchyard_common::transport::incoming(listener)),
        )
    });

    let mut times = runtime(&client_kind)?.block_on(async move {
        let channel = switchyard_common::transport::secure_channel(&format!("http://{address}"), None)
            .map_err(std::io::Error::other)?;
        let mut client = WireEchoClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let payload = Bytes::from(vec![0x5au8; bytes]);
        let mut times = Vec::with_capacity(repeats);
        for call in 0..WARMUP_CALLS + repeats {
            let started = Instant::now();
            let answer = client
                .echo(EchoMessage { payload: payload.clone(), discard: false })
                .await
                .map_err(|status| std::io::Error::other(status.to_string()))?;
            if answer.get_ref().payload.len() != bytes {
                return Err(std::io::Error::other("the echo answered another size"));
            }
            if call >= WARMUP_CALLS {
                times.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok::<_, std::io::Error>(times)
    })?;
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let quantile = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!(
        "{bytes} B echo, client {client_kind}, server {server_kind}: mean {mean:.1} µs, p50 {:.1}, p90 {:.1} ({repeats} calls)",
        quantile(0.5),
        quantile(0.9)
    );
    Ok(())
}
