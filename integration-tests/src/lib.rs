//! [`TestCluster`]: a coordinator and workers as real processes on 127.0.0.1, plus a client that
//! follows their routing table. Every process is killed when the cluster is dropped, also when a
//! test fails, and dies with the test process even if that is SIGKILLed.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which `scripts/test.sh` does).
//!
//! With `SWITCHYARD_TEST_TLS=1` every [`TestCluster`] runs on mutual TLS, with a development CA
//! made once per test process, which is the clusters' client: how a suite is run with TLS on,
//! e.g. `SWITCHYARD_TEST_TLS=1 cargo test --release -p switchyard-integration-tests --test chaos`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use switchyard_loadtest::local_cluster::{LocalCluster, LocalClusterConfig};
use switchyard_model::{CapacityPolicy, ModelSpec};
use switchyard_router_client::{ClientOptions, MoeClient, RoutingTableView, TableWatcher};

/// The directory holding the workspace binaries of the profile these tests were built with.
pub fn binaries_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>").to_path_buf()
}

/// The reference model: one layer, 8 experts, top-2, d_model 256, d_ff 512.
pub fn small_model(capacity_factor: f32) -> ModelSpec {
    ModelSpec {
        d_model: 256,
        d_ff: 512,
        capacity: CapacityPolicy::Factor(capacity_factor),
        seed: 42,
        ..ModelSpec::default_synthetic()
    }
}

/// `[tokens, d_model]` of seeded values with unit-ish variance.
pub fn hidden_states(tokens: usize, d_model: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..tokens * d_model).map(|_| rng.random_range(-1.7f32..1.7)).collect()
}

pub struct TestCluster {
    pub processes: LocalCluster,
    pub watcher: TableWatcher,
    pub client: Arc<MoeClient>,
}

impl TestCluster {
    /// Starts `workers` workers serving `model`, and waits for a complete routing table.
    pub async fn start(model: ModelSpec, workers: usize, tune: impl FnOnce(&mut LocalClusterConfig)) -> Self {
        let dir = binaries_dir();
        let mut config = LocalClusterConfig::next_to(&dir.join("switchyard"), model, workers);
        config.heartbeat_interval = Duration::from_millis(200);
        config.heartbeat_timeout = Duration::from_secs(2);
        config.worker_args = vec!["--batch-wait-us".into(), "0".into()];
        tune(&mut config);
        if let Some(certs) = test_tls()
            && !config.coordinator_args.iter().any(|arg| arg == "--tls-cert")
        {
            config.dev_tls = Some(certs.to_path_buf());
        }
        let processes = LocalCluster::start(config).await.expect("cluster processes start");
        let watcher = TableWatcher::start(&processes.coordinator_uri()).expect("watcher");
        watcher.wait_for(RoutingTableView::is_complete, Duration::from_secs(60)).await.expect("every expert placed");
        let client = Arc::new(MoeClient::new(watcher.receiver(), ClientOptions::default()));
        Self { processes, watcher, client }
    }

    pub fn table(&self) -> Arc<RoutingTableView> {
        self.watcher.current().expect("a table was received")
    }
}

/// The development certificates every cluster of this process runs on, when
/// `SWITCHYARD_TEST_TLS=1`; this process then presents the client's on every connection.
fn test_tls() -> Option<&'static std::path::Path> {
    use switchyard_common::tls::{self, ClientTls, Role};
    static CERTS: std::sync::OnceLock<Option<tempfile::TempDir>> = std::sync::OnceLock::new();
    let certs = CERTS.get_or_init(|| {
        std::env::var_os("SWITCHYARD_TEST_TLS").filter(|value| value == "1")?;
        let dir = tempfile::tempdir().expect("a folder for the test certificates");
        tls::write_dev_certs(dir.path(), &["localhost".to_owned(), "127.0.0.1".to_owned()], &[])
            .expect("test certificates");
        tls::use_for_outgoing(ClientTls::load(tls::dev_files(dir.path(), Role::Client)).expect("client certificate"));
        Some(dir)
    });
    certs.as_ref().map(tempfile::TempDir::path)
}

/// A minimal HTTP/1.0 GET of a metrics port's `path` that must answer 200: the whole response,
/// its headers (the exposition's content type) and its body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    let response = http_response_with(address, path, "").await;
    assert!(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// A minimal HTTP/1.0 GET of a metrics port's `path`, whatever it answers (`/readyz` says 503
/// and why while not ready): the status code and the body.
pub async fn http_get_any(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let response = http_response_with(address, path, "").await;
    let (head, body) = response.split_once("\r\n\r\n").expect("headers, then the body");
    let code = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).expect("a status code");
    (code, body.to_owned())
}

/// A minimal HTTP/1.0 GET of `path` with `headers` (each line ending in `\r\n`): the whole
/// response, headers and body.
pub async fn http_response_with(address: std::net::SocketAddr, path: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect to the metrics port");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

/// The value of the sample `name` (with its labels, if any) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The calls an anonymous caller used against a cluster (the security issue's attacks), which a
/// mutual-TLS cluster refuses by role and a plaintext one takes.
pub mod attacks {
    use switchyard_proto::PROTOCOL_VERSION;
    use switchyard_proto::v1;

    /// (d), (e): a fake worker, unreachable, claiming 2⁶² bytes of memory.
    pub fn fake_worker_registration() -> v1::RegisterWorkerRequest {
        v1::RegisterWorkerRequest {
            protocol_version: PROTOCOL_VERSION,
            name: "fake".into(),
            endpoint: "http://127.0.0.1:9".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 62,
            ..Default::default()
        }
    }
}
