//! EPLB with real processes: 8 experts on 4 workers under a Zipf(1.2) skew, where expert 0 takes
//! about a third of the traffic. Measured over the same closed-loop load, without and with
//! balancing by traffic: the busiest worker's offered and admitted tokens over the mean, tokens
//! refused by full queues, and calls per second. The report goes to `eplb-report.md` in Cargo's
//! test scratch folder; the test holds the direction (balancing brings the busiest worker's offered
//! tokens nearer the mean), the figures are figures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_integration_tests::{TestCluster, http_get, metric_value, small_model};
use switchyard_loadtest::skew::{Inputs, Skew, gate_rows};
use switchyard_router_client::{ClientOptions, MoeClient, RefusalPolicy};

const CALLERS: usize = 4;
const TOKENS: usize = 64;
const WINDOW: Duration = Duration::from_secs(4);

#[derive(Debug)]
struct Measured {
    /// max / mean over workers of the tokens admitted.
    imbalance: f64,
    /// max / mean over workers of the tokens offered (admitted or refused).
    offered_imbalance: f64,
    offered: f64,
    refused: f64,
    calls_per_second: f64,
    failed: usize,
    replicas: usize,
}

impl Measured {
    fn refused_share(&self) -> f64 {
        self.refused / self.offered.max(1.0)
    }
}

/// Each worker's (admitted, refused) token counters.
async fn counters(cluster: &TestCluster) -> Vec<(f64, f64)> {
    let mut counters = Vec::new();
    for worker in &cluster.processes.workers {
        let text = http_get(worker.metrics, "/metrics").await;
        counters.push((
            metric_value(&text, "switchyard_worker_admitted_tokens_total").unwrap_or(0.0),
            metric_value(&text, "switchyard_worker_rejected_tokens_total").unwrap_or(0.0),
        ));
    }
    counters
}

/// Closed-loop calls for `duration`; (succeeded, failed).
async fn load(client: Arc<MoeClient>, inputs: Arc<Inputs>, duration: Duration) -> (usize, usize) {
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (client, inputs) = (client.clone(), inputs.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed, mut next) = (0, 0, caller);
                while started.elapsed() < duration {
                    match client.forward(0, inputs.pick(next, Duration::ZERO)).await {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    next += 1;
                }
                (ok, failed)
            })
        })
        .collect();
    let mut totals = (0, 0);
    for caller in callers {
        let (ok, failed) = caller.await.expect("caller");
        totals = (totals.0 + ok, totals.1 + failed);
    }
    totals
}

async fn measure(balancing: bool) -> Measured {
    let model = small_model(2.0);
    let cluster = TestCluster::start(model.clone(), 4, |config| {
        // Expert queues of one batch's capacity (32 tokens): four callers' rows for a hot expert
        // overflow it, as a hot expert's do under real load.
        config.max_batch_tokens = TOKENS;
        // Four like workers: each declares the same compute rate, so that placement evens out
        // their tokens. Measured at start, the rates of four processes sharing two cores differed
        // by up to 34%, and placement gave the "faster" ones that much more.
        config.worker_args.extend(["--compute-gflops", "50"].map(String::from));
        if balancing {
            config.coordinator_args =
                ["--rebalance-interval-ms", "1000", "--redundant-replicas", "4", "--unload-grace-ms", "1000"]
                    .map(String::from)
                    .to_vec();
        }
    })
    .await;
    let gate = gate_rows(&model, 0).expect("gate");
    let inputs = Arc::new(Inputs::generate(&Skew::Zipf { exponent: 1.2 }, &gate, 8, TOKENS, 256, 5));
    // Placement is what is measured: the client sends every call, however much a worker refuses,
    // and a refusal overflows rather than failing the call (which would cancel its requests to
    // the other workers, so that what they were offered would follow the timing).
    let options = ClientOptions { throttle_ratio: None, refusal: RefusalPolicy::Overflow, ..ClientOptions::default() };
    let client = Arc::new(MoeClient::new(cluster.watcher.receiver(), options));
    // Warm-up: with balancing, long enough for traffic to be measured and the hot experts copied.
    load(client.clone(), inputs.clone(), Duration::from_secs(3)).await;
    if balancing {
        cluster
            .watcher
            .wait_for(|table| (0..8).any(|expert| table.endpoints(0, expert).len() > 1), Duration::from_secs(20))
            .await
            .expect("balancing gives hot experts redundant replicas");
        load(client.clone(), inputs.clone(), Duration::from_secs(2)).await;
    }
    let before = counters(&cluster).await;
    let (ok, failed) = load(client.clone(), inputs, WINDOW).await;
    let after = counters(&cluster).await;
    let admitted: Vec<f64> = before.iter().zip(&after).map(|(b, a)| a.0 - b.0).collect();
    let offered: Vec<f64> = before.iter().zip(&after).map(|(b, a)| a.0 - b.0 + a.1 - b.1).collect();
    let max_over_mean = |values: &[f64]| {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        values.iter().copied().fold(0.0, f64::max) / mean.max(1.0)
    };
    let table = cluster.table();
    Measured {
        imbalance: max_over_mean(&admitted),
        offered_imbalance: max_over_mean(&offered),
        offered: offered.iter().sum(),
        refused: before.iter().zip(&after).map(|(b, a)| a.1 - b.1).sum(),
        calls_per_second: ok as f64 / WINDOW.as_secs_f64(),
        failed,
        replicas: (0..8).map(|expert| table.endpoints(0, expert).len()).sum(),
    }
}

#[tokio::test]
async fn balancing_by_traffic_evens_the_load_of_a_zipf_skew() {
    let without = measure(false).await;
    let with = measure(true).await;
    let row = |name: &str, m: &Measured| {
        format!(
            "| {name} | {} | {:.2} | {:.2} | {:.0} ({:.0}%) | {:.1} | {} |\n",
            m.replicas,
            m.offered_imbalance,
            m.imbalance,
            m.refused,
            m.refused_share() * 100.0,
            m.calls_per_second,
            m.failed
        )
    };
    let report = format!(
        "8 experts top-2 on 4 workers, Zipf(1.2) inputs, {CALLERS} closed-loop callers x {TOKENS} tokens, \
         queues of 32 tokens, {}s window\n\n\
         | placement | replicas | offered max/mean | admitted max/mean | refused tokens (of offered) | calls/s | failed calls |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n{}{}",
        WINDOW.as_secs(),
        row("by size", &without),
        row("by traffic (EPLB, 4 redundant)", &with),
    );
    let _ = std::fs::write(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("eplb-report.md"), &report);
    eprintln!("{report}");
    assert!(with.replicas > without.replicas, "{with:?}");
    // Full queues cap what a hot worker admits, so its load is what it was offered, admitted or
    // refused: balancing must bring the busiest worker's share of it nearer the mean. (On a 2-core
    // machine with a third core's worth of spinning beside it: 1.03-1.10 against 1.35-1.36 in 8
    // runs. What full queues refuse, as a share of the offered tokens, follows the cores as much
    // as the placement there: it rose with balancing in 5 of those runs.)
    assert!(with.offered_imbalance < without.offered_imbalance, "balanced {with:?} vs by size {without:?}");
}
