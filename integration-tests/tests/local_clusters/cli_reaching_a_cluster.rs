//! What the processes say when the cluster they join is not there yet. The `switchyard` commands
//! that drive a running cluster: a wrong input, an address nobody answers on or a load larger than
//! the cluster takes fails at once, naming it, and a wait for placement says what it waits for and,
//! when it gives up, why; against a running one, `status` lists the model and each worker. A
//! worker: each retry names the coordinator and the error, as fields of one structured line.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use switchyard_integration_tests::{TestCluster, binaries_dir, small_model};
use switchyard_loadtest::local_cluster::{LocalCluster, LocalClusterConfig};

/// Longer than any of these commands takes to fail, far shorter than the placement wait (2 min)
/// they used to sit through silently.
const GIVES_UP_WITHIN: Duration = Duration::from_secs(30);

/// `switchyard ARGS`, which must fail: its stderr.
async fn failing(args: &[&str]) -> String {
    let run = tokio::process::Command::new(binaries_dir().join("switchyard"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let Output { status, stderr, .. } = tokio::time::timeout(GIVES_UP_WITHIN, run)
        .await
        .unwrap_or_else(|_| panic!("switchyard {args:?} still runs after {GIVES_UP_WITHIN:?}"))
        .expect("switchyard runs");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert!(!status.success(), "switchyard {args:?} succeeded: {stderr}");
    stderr
}

/// An address on 127.0.0.1 nobody listens on.
fn unanswered_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    format!("http://{}", listener.local_addr().expect("its address"))
}

/// A `hidden_states` file of `tokens` rows of `d_model` zeros.
fn hidden_states_file(dir: &Path, tokens: usize, d_model: usize) -> String {
    let path = dir.join("hidden.safetensors");
    let zeros = vec![0.0f32; tokens * d_model];
    switchyard_model::safetensors::write_f32(&path, &[("hidden_states", vec![tokens, d_model], &zeros)])
        .expect("input written");
    path.display().to_string()
}

#[tokio::test]
async fn forward_names_a_missing_input_before_asking_the_cluster() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.safetensors").display().to_string();
    let output = dir.path().join("out.safetensors").display().to_string();
    let stderr =
        failing(&["forward", "--coordinator", &unanswered_address(), "--input", &missing, "--output", &output]).await;
    assert!(stderr.contains(&format!("reading {missing}")), "{stderr}");
    assert!(!stderr.contains("coordinator"), "the input is checked first: {stderr}");
}

#[tokio::test]
async fn every_command_names_a_coordinator_nobody_answers_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = hidden_states_file(dir.path(), 2, 256);
    let output = dir.path().join("out.safetensors").display().to_string();
    let coordinator = unanswered_address();
    let commands: [&[&str]; 3] = [
        &["status", "--coordinator", &coordinator],
        &["loadtest", "--coordinator", &coordinator, "--duration", "1s"],
        &["forward", "--coordinator", &coordinator, "--input", &input, "--output", &output],
    ];
    for args in commands {
        let stderr = failing(args).await;
        assert!(stderr.contains(&format!("cannot reach the coordinator at {coordinator}")), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn status_lists_the_model_and_each_worker_with_its_experts() {
    let model = small_model(2.0);
    let cluster = TestCluster::start(model.clone(), 1, |_| {}).await;
    let coordinator = cluster.processes.coordinator_uri();
    let run = tokio::process::Command::new(binaries_dir().join("switchyard"))
        .args(["status", "--coordinator", &coordinator])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(GIVES_UP_WITHIN, run).await.expect("status answers").expect("switchyard runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with("routing table version "), "{stdout}");
    assert!(stdout.contains(&format!("model {}", model.summary())), "{stdout}");
    assert!(stdout.contains("\nworkers: 1 of at most 1024 (the coordinator's --max-workers)\n"), "{stdout}");
    let workers: Vec<&str> = stdout.lines().filter(|line| line.contains(" experts [")).collect();
    assert_eq!(workers.len(), 1, "{stdout}");
    assert!(workers[0].contains(&format!(" {} experts [0/0 ", model.experts_per_layer)), "{stdout}");
}

#[tokio::test]
async fn a_wait_for_placement_says_what_it_waits_for_and_why_it_gave_up() {
    // A coordinator and no worker: it answers, but places nothing.
    let config = LocalClusterConfig::next_to(&binaries_dir().join("switchyard"), small_model(2.0), 0);
    let cluster = LocalCluster::start(config).await.expect("the coordinator starts");
    let coordinator = cluster.coordinator_uri();
    let stderr = failing(&["loadtest", "--coordinator", &coordinator, "--placement-timeout", "3s"]).await;
    assert!(
        stderr.contains("waiting up to 3s for the coordinator to place every expert (no routing table yet"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("no routing table received from the coordinator at {coordinator} within 3s")),
        "{stderr}"
    );
    assert!(stderr.contains("--min-workers"), "it says when the first table comes: {stderr}");
}

#[tokio::test]
async fn a_load_larger_than_the_clusters_largest_batch_is_refused_before_it_starts() {
    let mut config = LocalClusterConfig::next_to(&binaries_dir().join("switchyard"), small_model(2.0), 1);
    config.max_batch_tokens = 64;
    let cluster = LocalCluster::start(config).await.expect("the cluster starts");
    let coordinator = cluster.coordinator_uri();
    let stderr = failing(&["loadtest", "--coordinator", &coordinator, "--tokens", "65", "--duration", "1s"]).await;
    assert!(
        stderr.contains(
            "--tokens 65: the cluster takes at most 64 tokens per call (the coordinator's --max-batch-tokens)"
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_worker_that_cannot_reach_its_coordinator_says_which_and_why_in_one_json_line() {
    use tokio::io::AsyncBufReadExt;
    let coordinator = unanswered_address();
    let mut worker = tokio::process::Command::new(binaries_dir().join("switchyard-worker"))
        .args(["--log-format", "json", "--insecure", "--coordinator", &coordinator])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--compute-gflops", "10"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker starts");
    let mut lines = tokio::io::BufReader::new(worker.stderr.take().expect("stderr")).lines();
    let retrying = tokio::time::timeout(GIVES_UP_WITHIN, async {
        while let Some(line) = lines.next_line().await.expect("stderr readable") {
            // A field named `message` would be a second "message" key: JSON readers keep one.
            assert_eq!(line.matches("\"message\":").count(), 1, "one message per line: {line}");
            let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            if event["fields"]["message"] == "coordinator unreachable; retrying" {
                return event;
            }
        }
        panic!("the worker stopped before it retried");
    })
    .await
    .expect("the worker retries its registration");
    assert_eq!(retrying["fields"]["coordinator"], coordinator.as_str(), "{retrying}");
    assert!(retrying["fields"]["error"].as_str().is_some_and(|error| error.contains("refused")), "{retrying}");
    assert!(retrying["fields"]["retry_in_ms"].as_u64().is_some(), "{retrying}");
}
