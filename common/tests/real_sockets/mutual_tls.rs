//! Mutual TLS over real sockets: a server that lets only workers call answers a worker's
//! certificate, refuses a client's by role, and completes no handshake without a certificate of
//! its CA; new certificate files are taken without a restart.

use std::time::Duration;

use switchyard_common::tls::{self, ClientTls, Role, ServerTls};
use switchyard_common::transport::{self, ConnectionLimits};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];

fn hosts() -> Vec<String> {
    HOSTS.iter().map(|host| (*host).to_owned()).collect()
}

/// Serves gRPC health checks over mutual TLS to callers whose certificate names the worker role.
async fn serve(tls: ServerTls) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let workers_only = tonic::service::interceptor::InterceptedService::new(health, |request: tonic::Request<()>| {
        tls::authorize(request.extensions(), &[Role::Worker])?;
        Ok(request)
    });
    tokio::spawn(transport::server().add_service(workers_only).serve_with_incoming(transport::incoming_tls(
        listener,
        ConnectionLimits::default(),
        tls,
    )));
    format!("https://127.0.0.1:{}", address.port())
}

/// The health check's answer over a new connection presenting `tls`.
async fn check(uri: &str, tls: Option<&ClientTls>) -> Result<ServingStatus, tonic::Status> {
    let channel = transport::secure_channel(uri, tls).expect("channel");
    let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(answer.into_inner().status())
}

fn client(dir: &std::path::Path, role: Role) -> ClientTls {
    ClientTls::load(tls::dev_files(dir, role)).expect("client certificates")
}

#[tokio::test]
async fn only_the_allowed_role_of_the_clusters_ca_is_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    tls::write_dev_certs(dir.path(), &hosts(), &[]).expect("certificates");
    let other = tempfile::tempdir().expect("temp dir");
    tls::write_dev_certs(other.path(), &hosts(), &[]).expect("another CA's certificates");
    let uri = serve(ServerTls::load(tls::dev_files(dir.path(), Role::Coordinator)).expect("server")).await;

    assert_eq!(check(&uri, Some(&client(dir.path(), Role::Worker))).await.expect("a worker"), ServingStatus::Serving);
    let denied = check(&uri, Some(&client(dir.path(), Role::Client))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(denied.message(), "only the worker role may call this; the caller's certificate names client");

    // No certificate at all, or one of another CA: no handshake, so no call; the server lives on.
    let plaintext = check(&uri.replace("https", "http"), None).await.unwrap_err();
    assert_ne!(plaintext.code(), Code::Ok);
    let stranger = check(&uri, Some(&client(other.path(), Role::Worker))).await.unwrap_err();
    assert_eq!(stranger.code(), Code::Unavailable, "{stranger:?}");
    assert!(check(&uri, Some(&client(dir.path(), Role::Worker))).await.is_ok());
}

/// Kubernetes rewrites a mounted Secret's files in place: the next connection uses the new ones.
#[tokio::test]
async fn new_certificate_files_are_taken_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    tls::write_dev_certs(dir.path(), &hosts(), &[]).expect("certificates");
    // A client keeping the first certificates (its own files, which do not change).
    let kept = tempfile::tempdir().expect("temp dir");
    for file in ["worker.pem", "worker-key.pem", "ca.pem"] {
        std::fs::copy(dir.path().join(file), kept.path().join(file)).expect("copy");
    }
    let before = client(kept.path(), Role::Worker);
    let uri = serve(ServerTls::load(tls::dev_files(dir.path(), Role::Coordinator)).expect("server")).await;
    assert!(check(&uri, Some(&before)).await.is_ok());

    // A new CA and certificates in the same files (a rotation).
    tokio::time::sleep(Duration::from_millis(20)).await;
    tls::write_dev_certs(dir.path(), &hosts(), &[]).expect("rotated certificates");
    let after = client(dir.path(), Role::Worker);
    assert_eq!(check(&uri, Some(&after)).await.expect("rotated"), ServingStatus::Serving);
    let stale = check(&uri, Some(&before)).await.unwrap_err();
    assert_eq!(stale.code(), Code::Unavailable, "the old CA is no longer trusted: {stale:?}");

    // Files that do not load leave the last good certificates in place.
    std::fs::write(tls::dev_files(dir.path(), Role::Coordinator).cert, "not a certificate").expect("break");
    assert!(check(&uri, Some(&after)).await.is_ok(), "still the rotated certificates");
}

/// A certificate signed later by the development CA's key chains to the CA written first, and a
/// server's names the addresses it was issued for, no others.
#[tokio::test]
async fn a_host_certificate_chains_to_the_development_ca_and_names_its_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    tls::write_dev_certs(dir.path(), &hosts(), &[]).expect("certificates");
    let worker = client(dir.path(), Role::Worker);
    let issued = |hosts: &[&str], out: &str| {
        let hosts: Vec<String> = hosts.iter().map(|host| (*host).to_owned()).collect();
        let files =
            tls::write_host_certificate(dir.path(), Role::Coordinator, "coordinator", &hosts, &dir.path().join(out))
                .expect("a host certificate");
        assert_eq!(files.ca, dir.path().join("ca.pem"));
        ServerTls::load(files).expect("server")
    };

    let here = serve(issued(&["127.0.0.1"], "here")).await;
    assert_eq!(check(&here, Some(&worker)).await.expect("the CA's chain"), ServingStatus::Serving);
    let elsewhere = serve(issued(&["198.18.0.2"], "elsewhere")).await;
    let refused = check(&elsewhere, Some(&worker)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "127.0.0.1 is not a name of that certificate: {refused:?}");
}
