//! The bundled load tester from the command line. `switchyard loadtest` against a running
//! cluster: its report, JSON and CSV, its client metrics served while it runs, and thresholds that
//! fail the run once its reports are written. The in-process reference layer as the baseline:
//! `switchyard loadtest --reference` drives it alone, `switchyard local --loadtest
//! --compare-reference` runs the same load through a local cluster and then through it
//! (`switchyard` hands both to `switchyard-torch`, which links libtorch).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use switchyard_integration_tests::{TestCluster, binaries_dir, http_get, metric_value, small_model};

/// Longer than these small runs take, including a cluster's start.
const FINISHES_WITHIN: Duration = Duration::from_secs(120);

/// A load of 6 calls of 8 tokens, 2 at a time, and the small synthetic model `--reference` and
/// `local` build (a running cluster's model comes from its routing table).
const SMALL_LOAD: [&str; 16] = [
    "--experts",
    "4",
    "--d-model",
    "64",
    "--d-ff",
    "128",
    "--requests",
    "6",
    "--tokens",
    "8",
    "--concurrency",
    "2",
    "--warmup",
    "0s",
    "--duration",
    "60s",
];

/// `switchyard ARGS SMALL_LOAD --json DIR/load.json --csv DIR/load.csv`, run to its end.
async fn switchyard(args: &[&str], dir: &Path) -> Output {
    let run = tokio::process::Command::new(binaries_dir().join("switchyard"))
        .args(args)
        .args(SMALL_LOAD)
        .arg("--json")
        .arg(dir.join("load.json"))
        .arg("--csv")
        .arg(dir.join("load.csv"))
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(FINISHES_WITHIN, run)
        .await
        .unwrap_or_else(|_| panic!("switchyard {args:?} still runs after {FINISHES_WITHIN:?}"))
        .expect("switchyard runs")
}

/// The summaries a run wrote as JSON.
fn summaries_in(dir: &Path) -> Vec<serde_json::Value> {
    let written = std::fs::read_to_string(dir.join("load.json")).expect("the JSON report written");
    serde_json::from_str(&written).expect("a JSON list of summaries")
}

/// [`switchyard`], which must succeed: its stdout and the summaries it wrote.
async fn load_test(args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().expect("a folder");
    let output = switchyard(args, dir.path()).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "switchyard {args:?}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    let csv = std::fs::read_to_string(dir.path().join("load.csv")).expect("the CSV report written");
    let summaries = summaries_in(dir.path());
    assert_eq!(csv.lines().count(), 1 + summaries.len(), "a header, then a row per report: {csv}");
    assert!(csv.starts_with("target,"), "{csv}");
    (stdout, summaries)
}

/// Each of `summary`'s calls of [`SMALL_LOAD`] ran and none failed.
fn every_call_answered(summary: &serde_json::Value) {
    assert_eq!((summary["calls"].as_u64(), summary["failed"].as_u64()), (Some(6), Some(0)), "{summary}");
    assert_eq!(summary["tokens_per_call"], 8, "{summary}");
}

/// `summary` ran on [`SMALL_LOAD`]'s model.
fn on_the_small_model(summary: &serde_json::Value) {
    assert!(summary["run"]["model"].as_str().is_some_and(|model| model.contains("d_model 64, d_ff 128")), "{summary}");
}

#[tokio::test]
async fn loadtest_drives_a_running_cluster_and_reports_every_call() {
    let cluster = TestCluster::start(small_model(2.0), 2, |_| {}).await;
    let coordinator = cluster.processes.coordinator_uri();
    let (stdout, summaries) = load_test(&["loadtest", "--coordinator", &coordinator]).await;
    let [summary] = &summaries[..] else { panic!("one summary: {summaries:?}") };
    assert_eq!(summary["target"], "distributed (2 workers)");
    every_call_answered(summary);
    assert_eq!(summary["run"]["model"], small_model(2.0).summary(), "the cluster's model, from its routing table");
    // 8 f32 rows of 256 values to at least one worker a call.
    assert!(summary["payload_bytes_sent_per_call"].as_u64().is_some_and(|sent| sent >= 8 * 256 * 4), "{summary}");
    assert!(stdout.contains("distributed (2 workers)"), "{stdout}");
}

#[tokio::test]
async fn a_crossed_threshold_fails_the_run_after_its_reports_are_written() {
    let cluster = TestCluster::start(small_model(2.0), 1, |_| {}).await;
    let coordinator = cluster.processes.coordinator_uri();
    let dir = tempfile::tempdir().expect("a folder");
    let output = switchyard(&["loadtest", "--coordinator", &coordinator, "--max-p99", "1us"], dir.path()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "no call takes under a microsecond: {stderr}");
    assert!(stderr.contains("the load test failed: p99 ") && stderr.contains("above --max-p99 0.001 ms"), "{stderr}");
    let [summary] = &summaries_in(dir.path())[..] else { panic!("one summary written") };
    assert_eq!(summary["calls"], 6, "{summary}");
}

#[tokio::test]
async fn loadtest_serves_its_client_metrics_while_it_runs() {
    let cluster = TestCluster::start(small_model(2.0), 1, |_| {}).await;
    let coordinator = cluster.processes.coordinator_uri();
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port();
    let listen = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("a folder");
    // Its 6 calls paced at 4 a second, so that the run outlasts a few scrapes.
    let args = ["loadtest", "--coordinator", &coordinator, "--metrics-listen", &listen, "--rate", "4"];
    let run = switchyard(&args, dir.path());
    let address: std::net::SocketAddr = listen.parse().expect("an address");
    let scrape = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tokio::net::TcpStream::connect(address).await.is_err() {
                continue;
            }
            let body = http_get(address, "/metrics").await;
            if metric_value(&body, "switchyard_client_layer_calls_total").is_some_and(|calls| calls >= 2.0) {
                return body;
            }
        }
    };
    tokio::pin!(run);
    let body = tokio::select! {
        body = scrape => body,
        output = &mut run => panic!("the run ended before its metrics counted two calls: {output:?}"),
    };
    assert!(body.contains("switchyard_client_phase_seconds_bucket"), "{body}");
    let output = run.await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test]
async fn loadtest_reference_drives_the_in_process_layer_with_the_threads_asked_for() {
    let (stdout, summaries) = load_test(&["--torch-threads", "2", "loadtest", "--reference", "--device", "cpu"]).await;
    let [summary] = &summaries[..] else { panic!("one summary: {summaries:?}") };
    assert_eq!(summary["target"], "in-process reference (2 torch threads)");
    every_call_answered(summary);
    on_the_small_model(summary);
    assert_eq!(summary["payload_bytes_sent_per_call"], 0, "no wire in-process: {summary}");
    assert!(stdout.contains("in-process reference (2 torch threads)"), "{stdout}");
}

#[tokio::test]
async fn local_compare_reference_runs_the_same_load_through_the_cluster_then_in_process() {
    let (stdout, summaries) = load_test(&["local", "--workers", "2", "--loadtest", "--compare-reference"]).await;
    let [distributed, reference] = &summaries[..] else { panic!("two summaries: {summaries:?}") };
    assert_eq!(distributed["target"], "distributed (2 workers), the model's router");
    assert_eq!(reference["target"], "in-process reference (2 torch threads)", "as many threads as the workers had");
    for summary in [distributed, reference] {
        every_call_answered(summary);
    }
    on_the_small_model(distributed);
    assert_eq!(distributed["run"]["model"], reference["run"]["model"], "one model both ways");
    // 8 f32 rows of 64 values to at least one worker a call.
    let sent = distributed["payload_bytes_sent_per_call"].as_u64().expect("bytes sent");
    assert!(sent >= 8 * 64 * 4, "{distributed}");
    assert_eq!(reference["payload_bytes_sent_per_call"], 0, "{reference}");
    let reports = ["distributed (2 workers)", "in-process reference (2 torch threads)"];
    assert!(reports.iter().all(|target| stdout.contains(target)), "both reports printed: {stdout}");
}
