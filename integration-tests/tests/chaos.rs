//! The chaos suite: real processes under a closed-loop load (4 callers, 64 tokens per call) while
//! a worker or the coordinator is killed, stopped, frozen, added or restarted. Every call is
//! counted: succeeded, failed (with the status it failed with) or wrong against the in-process
//! reference (never allowed). Latency p50/p99 in steady state and during the event go to
//! `chaos-report.md` in Cargo's test scratch folder; they are figures, not assertions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_integration_tests::{TestCluster, hidden_states, http_get, metric_value, small_model};
use switchyard_loadtest::local_cluster::LocalClusterConfig;
use switchyard_model::ModelSpec;
use switchyard_reference::{ReferenceConfig, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::{ClientOptions, MoeClient, RoutingOverrides};
use tokio::sync::watch;

const CALLERS: usize = 4;
const TOKENS: usize = 64;
/// Calls before the event, to measure steady state.
const STEADY: Duration = Duration::from_secs(2);
/// What counts as "during the event" for latency.
const EVENT_WINDOW: Duration = Duration::from_secs(3);

/// The scenarios share two cores: one at a time, so that one's load does not starve another's
/// heartbeats.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn model() -> ModelSpec {
    small_model(2.0)
}

/// Inputs and the reference's outputs for them.
async fn cases() -> Arc<Vec<(Vec<f32>, Vec<f32>)>> {
    let reference = ReferenceLayer::start(&model(), &[0], ReferenceConfig::cpu()).await.expect("reference");
    let mut cases = Vec::new();
    for seed in 0..8 {
        let hidden = hidden_states(TOKENS, 256, 900 + seed);
        let expected = reference.forward(0, &hidden, &RoutingOverrides::default()).await.expect("reference");
        cases.push((hidden, expected.hidden));
    }
    reference.shutdown().await;
    Arc::new(cases)
}

#[derive(Debug, Clone)]
struct Call {
    /// When it started, from the start of the load.
    at: Duration,
    took: Duration,
    /// The failure's message, naming the worker.
    failed: Option<String>,
    wrong: bool,
}

/// Closed-loop callers until told to stop.
struct Load {
    started: Instant,
    stop: watch::Sender<bool>,
    callers: Vec<tokio::task::JoinHandle<Vec<Call>>>,
}

impl Load {
    fn start(client: Arc<MoeClient>, cases: Arc<Vec<(Vec<f32>, Vec<f32>)>>) -> Self {
        let started = Instant::now();
        let (stop, stopped) = watch::channel(false);
        let callers = (0..CALLERS)
            .map(|caller| {
                let (client, cases, stopped) = (client.clone(), cases.clone(), stopped.clone());
                tokio::spawn(async move {
                    let mut calls = Vec::new();
                    let mut next = caller;
                    while !*stopped.borrow() {
                        let (hidden, expected) = &cases[next % cases.len()];
                        next += 1;
                        let at = started.elapsed();
                        let output = client.forward(0, hidden).await;
                        let took = started.elapsed() - at;
                        calls.push(match output {
                            Ok(output) => Call {
                                at,
                                took,
                                failed: None,
                                wrong: relative_frobenius_error(&output.hidden, expected) >= 1e-5,
                            },
                            Err(error) => Call { at, took, failed: Some(error.to_string()), wrong: false },
                        });
                    }
                    calls
                })
            })
            .collect();
        Self { started, stop, callers }
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    async fn finish(self) -> Vec<Call> {
        let _ = self.stop.send(true);
        let mut calls = Vec::new();
        for caller in self.callers {
            calls.extend(caller.await.expect("caller"));
        }
        calls.sort_by_key(|call| call.at);
        calls
    }
}

fn percentile(mut latencies: Vec<Duration>, quantile: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort();
    latencies[((latencies.len() - 1) as f64 * quantile).round() as usize]
}

/// Counts and latencies of a run whose event happened at `event`; appended to the report.
struct Summary {
    succeeded: usize,
    failures: Vec<String>,
    wrong: usize,
}

impl Summary {
    /// Every call answered, and answered right.
    fn assert_nothing_lost(&self) {
        assert_eq!(self.wrong, 0, "outputs off the reference");
        assert!(self.failures.is_empty(), "{} failed calls: {:?}", self.failures.len(), self.failures);
    }
}

fn summarize(scenario: &str, calls: &[Call], event: Duration) -> Summary {
    let latencies = |from: Duration, to: Duration| -> Vec<Duration> {
        calls
            .iter()
            .filter(|call| call.failed.is_none() && call.at >= from && call.at < to)
            .map(|call| call.took)
            .collect()
    };
    let steady = latencies(Duration::ZERO, event);
    let during = latencies(event, event + EVENT_WINDOW);
    let summary = Summary {
        succeeded: calls.iter().filter(|call| call.failed.is_none()).count(),
        failures: calls.iter().filter_map(|call| call.failed.clone()).collect(),
        wrong: calls.iter().filter(|call| call.wrong).count(),
    };
    let line = format!(
        "| {scenario} | {} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} |\n",
        summary.succeeded,
        summary.failures.len(),
        summary.wrong,
        percentile(steady.clone(), 0.5).as_secs_f64() * 1e3,
        percentile(steady.clone(), 0.99).as_secs_f64() * 1e3,
        percentile(during.clone(), 0.5).as_secs_f64() * 1e3,
        percentile(during.clone(), 0.99).as_secs_f64() * 1e3,
        calls.iter().map(|call| call.took).max().unwrap_or_default().as_secs_f64() * 1e3,
    );
    let report = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.md");
    static FRESH_REPORT: std::sync::Once = std::sync::Once::new();
    FRESH_REPORT.call_once(|| {
        let _ = std::fs::remove_file(&report);
    });
    if !report.exists() {
        let header = "| scenario | ok | failed | wrong | steady p50 / p99 ms | event p50 / p99 ms | slowest ms |\n\
                      | --- | --- | --- | --- | --- | --- | --- |\n";
        let _ = std::fs::write(&report, header);
    }
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(&report) {
        let _ = file.write_all(line.as_bytes());
    }
    eprint!("{line}");
    summary
}

/// A cluster of `workers` with `replicas` per expert, heartbeats every 200 ms, expiry after 2 s.
async fn cluster(workers: usize, replicas: usize, tune: impl FnOnce(&mut LocalClusterConfig)) -> TestCluster {
    TestCluster::start(model(), workers, |config| {
        config.coordinator_args =
            vec!["--replicas".into(), replicas.to_string(), "--unload-grace-ms".into(), "2000".into()];
        tune(config);
    })
    .await
}

fn client(cluster: &TestCluster, options: ClientOptions) -> Arc<MoeClient> {
    Arc::new(MoeClient::new(cluster.watcher.receiver(), options))
}

#[tokio::test]
async fn kill_9_of_a_worker_with_two_replicas_fails_no_call() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cases = cases().await;
    let mut cluster = cluster(3, 2, |_| {}).await;
    let load = Load::start(client(&cluster, ClientOptions::default()), cases);
    tokio::time::sleep(STEADY).await;
    let event = load.elapsed();
    cluster.processes.workers[1].kill().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = load.finish().await;
    let summary = summarize("kill -9 of 1 of 3 workers, 2 replicas", &calls, event);
    summary.assert_nothing_lost();
    assert!(calls.iter().any(|call| call.at > event + Duration::from_secs(3)), "the load went on after the kill");
}

#[tokio::test]
async fn kill_9_without_replicas_fails_only_calls_on_that_worker_and_service_returns_within_3_s() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cases = cases().await;
    let mut cluster = cluster(2, 1, |_| {}).await;
    let killed = cluster.processes.workers[1].grpc.to_string();
    let load = Load::start(client(&cluster, ClientOptions::default()), cases);
    tokio::time::sleep(STEADY).await;
    let event = load.elapsed();
    cluster.processes.workers[1].kill().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = load.finish().await;
    let summary = summarize("kill -9 of 1 of 2 workers, no replicas", &calls, event);
    assert_eq!(summary.wrong, 0);
    for failure in &summary.failures {
        assert!(failure.contains(&killed), "a failure that does not name the killed worker {killed}: {failure}");
    }
    let back = event + Duration::from_secs(3);
    let late_failures = calls.iter().filter(|call| call.at >= back && call.failed.is_some()).count();
    assert_eq!(late_failures, 0, "calls started 3 s after the kill all succeed");
    assert!(calls.iter().filter(|call| call.at >= back).count() > 0);
}

#[tokio::test]
async fn sigterm_of_a_worker_drains_it_without_a_failed_call() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cases = cases().await;
    let mut cluster = cluster(2, 1, |_| {}).await;
    let stopped = format!("http://{}", cluster.processes.workers[1].grpc);
    let load = Load::start(client(&cluster, ClientOptions::default()), cases);
    tokio::time::sleep(STEADY).await;
    let event = load.elapsed();
    let exited = cluster.processes.workers[1].terminate(Duration::from_secs(15)).await;
    assert!(exited, "the worker drained and exited within its grace");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = load.finish().await;
    let summary = summarize("SIGTERM of 1 of 2 workers (drain)", &calls, event);
    summary.assert_nothing_lost();
    assert!(!cluster.table().workers().iter().any(|worker| **worker == *stopped), "the table no longer names it");
}

#[tokio::test]
async fn sigstop_of_a_worker_for_5_s_with_replicas_fails_no_call_and_none_hangs() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cases = cases().await;
    let cluster = cluster(3, 2, |_| {}).await;
    let options = ClientOptions { attempt_timeout: Some(Duration::from_millis(500)), ..ClientOptions::default() };
    let load = Load::start(client(&cluster, options), cases);
    tokio::time::sleep(STEADY).await;
    let event = load.elapsed();
    cluster.processes.workers[1].pause();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.processes.workers[1].resume();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = load.finish().await;
    let summary = summarize("SIGSTOP 5 s of 1 of 3 workers, 2 replicas", &calls, event);
    summary.assert_nothing_lost();
    let slowest = calls.iter().map(|call| call.took).max().unwrap_or_default();
    assert!(slowest < ClientOptions::default().timeout, "a call hung for {slowest:?}");
}

#[tokio::test]
async fn a_coordinator_restart_fails_no_call_and_reloads_no_expert() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cases = cases().await;
    let mut cluster = cluster(2, 1, |_| {}).await;
    let before = cluster.table();
    let load = Load::start(client(&cluster, ClientOptions::default()), cases);
    tokio::time::sleep(STEADY).await;
    let event = load.elapsed();
    cluster.processes.restart_coordinator().await.expect("coordinator restarts on its address");
    // Clients hold version `before.version` or later of the old epoch; the new coordinator counts
    // from 1 again, and its table must still be taken.
    let adopted = cluster
        .watcher
        .wait_for(|table| table.epoch != before.epoch && table.is_complete(), Duration::from_secs(20))
        .await
        .expect("the client takes the restarted coordinator's table");
    let taken_after = load.elapsed() - event;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = load.finish().await;
    let summary = summarize("coordinator kill -9 and restart", &calls, event);
    summary.assert_nothing_lost();
    assert_eq!(adopted.workers(), before.workers());
    for expert in 0..8 {
        assert_eq!(adopted.endpoints(0, expert), before.endpoints(0, expert), "expert {expert} moved");
    }
    let metrics = http_get(cluster.processes.coordinator.metrics, "/metrics").await;
    assert_eq!(metric_value(&metrics, "switchyard_coordinator_experts_loaded_total"), Some(0.0), "{metrics}");
    eprintln!("restarted coordinator's table taken {taken_after:?} after the kill (version {})", adopted.version.0);
}

#[tokio::test]
async fn a_worker_added_then_another_removed_under_load_fails_no_call() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cases = cases().await;
    let mut cluster = cluster(2, 1, |_| {}).await;
    let load = Load::start(client(&cluster, ClientOptions::default()), cases);
    tokio::time::sleep(STEADY).await;
    let event = load.elapsed();
    let added = cluster.processes.add_worker().await.expect("a third worker starts");
    let joiner = format!("http://{}", cluster.processes.workers[added].grpc);
    cluster
        .watcher
        .wait_for(|table| table.workers().iter().any(|worker| **worker == *joiner), Duration::from_secs(20))
        .await
        .expect("the joiner takes a share of the experts");
    assert!(cluster.processes.workers[0].terminate(Duration::from_secs(15)).await, "the first worker drains");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = load.finish().await;
    let summary = summarize("a worker added, then one removed (SIGTERM)", &calls, event);
    summary.assert_nothing_lost();
    let table = cluster.table();
    assert_eq!(table.workers().len(), 2, "the joiner and the other original worker serve");
    assert!(table.is_complete());
}

/// A frozen worker is sent a `LoadExperts` that never returns (it is given a dead worker's
/// experts); it must still leave the table within the heartbeat timeout, and the experts be
/// served by the survivor, instead of the table waiting out the load's 300 s deadline.
#[tokio::test]
async fn a_hung_load_does_not_keep_a_dead_worker_in_the_table() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut cluster = cluster(2, 1, |_| {}).await;
    let joiner = cluster.processes.add_worker().await.expect("a third worker starts");
    let frozen = format!("http://{}", cluster.processes.workers[joiner].grpc);
    cluster
        .watcher
        .wait_for(|table| table.workers().iter().any(|worker| **worker == *frozen), Duration::from_secs(20))
        .await
        .expect("the joiner takes a share");
    cluster.processes.workers[joiner].pause();
    let dead = format!("http://{}", cluster.processes.workers[1].grpc);
    let frozen_at = Instant::now();
    // The dead worker's experts are planned onto the least loaded workers, the frozen one among
    // them: its load hangs.
    cluster.processes.workers[1].kill().await;
    let table = cluster
        .watcher
        .wait_for(
            |table| {
                table.is_complete() && !table.workers().iter().any(|worker| **worker == *dead || **worker == *frozen)
            },
            Duration::from_secs(60),
        )
        .await
        .expect("the dead and the frozen worker leave the table");
    let took = frozen_at.elapsed();
    eprintln!("dead and frozen workers out of a complete table {took:?} after the freeze");
    assert!(
        took < Duration::from_secs(5),
        "the 2 s heartbeat timeout, then one load; not the load's deadline: {took:?}"
    );
    assert_eq!(table.workers().len(), 1);
    cluster.processes.workers[joiner].resume();
}
