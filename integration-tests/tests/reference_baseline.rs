//! The in-process reference layer as a load test's baseline, from the command line: `switchyard
//! loadtest --reference` drives it alone, `switchyard local --loadtest --compare-reference` runs
//! the same load through a local cluster and then through it (`switchyard` hands both to
//! `switchyard-torch`, which links libtorch).

use std::time::Duration;

use switchyard_integration_tests::binaries_dir;

/// Longer than these small runs take, including a cluster's start.
const FINISHES_WITHIN: Duration = Duration::from_secs(120);

/// A small synthetic model, and a load of 6 calls of 8 tokens, 2 at a time, written as JSON.
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

/// `switchyard ARGS SMALL_LOAD --json FILE`, which must succeed: its stdout and the summaries it wrote.
async fn load_test(args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().expect("a folder");
    let json = dir.path().join("load.json");
    let run = tokio::process::Command::new(binaries_dir().join("switchyard"))
        .args(args)
        .args(SMALL_LOAD)
        .arg("--json")
        .arg(&json)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(FINISHES_WITHIN, run)
        .await
        .unwrap_or_else(|_| panic!("switchyard {args:?} still runs after {FINISHES_WITHIN:?}"))
        .expect("switchyard runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "switchyard {args:?}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    let written = std::fs::read_to_string(&json).expect("the JSON report written");
    (stdout, serde_json::from_str(&written).expect("a JSON list of summaries"))
}

/// Each of `summary`'s calls ran and none failed.
fn every_call_answered(summary: &serde_json::Value) {
    assert_eq!((summary["calls"].as_u64(), summary["failed"].as_u64()), (Some(6), Some(0)), "{summary}");
    assert_eq!(summary["tokens_per_call"], 8, "{summary}");
    assert!(summary["run"]["model"].as_str().is_some_and(|model| model.contains("d_model 64, d_ff 128")), "{summary}");
}

#[tokio::test]
async fn loadtest_reference_drives_the_in_process_layer_with_the_threads_asked_for() {
    let (stdout, summaries) = load_test(&["--torch-threads", "2", "loadtest", "--reference", "--device", "cpu"]).await;
    let [summary] = &summaries[..] else { panic!("one summary: {summaries:?}") };
    assert_eq!(summary["target"], "in-process reference (2 torch threads)");
    every_call_answered(summary);
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
    assert_eq!(distributed["run"]["model"], reference["run"]["model"], "one model both ways");
    // 8 f32 rows of 64 values to at least one worker a call.
    let sent = distributed["payload_bytes_sent_per_call"].as_u64().expect("bytes sent");
    assert!(sent >= 8 * 64 * 4, "{distributed}");
    assert_eq!(reference["payload_bytes_sent_per_call"], 0, "{reference}");
    let reports = ["distributed (2 workers)", "in-process reference (2 torch threads)"];
    assert!(reports.iter().all(|target| stdout.contains(target)), "both reports printed: {stdout}");
}
