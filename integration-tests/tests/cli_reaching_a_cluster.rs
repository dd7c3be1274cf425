//! What the `switchyard` commands that drive a running cluster say when it is not there yet: a
//! wrong input or an address nobody answers on fails at once, naming it, and a wait for placement
//! says what it waits for and, when it gives up, why.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use switchyard_integration_tests::{binaries_dir, small_model};
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
