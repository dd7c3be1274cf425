//! A large layer call leaves the caller's async runtime free: the client's CPU work (gate, packing,
//! decode, combine) runs on its own pool, so a 1 ms ticker on the same single-threaded runtime keeps
//! ticking while the call computes. Were that work on the runtime's thread, the ticker would stall
//! for the whole of planning at least (gate + plan + encode, one poll).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchyard_model::{CapacityPolicy, ModelSpec};
use switchyard_reference::{ReferenceConfig, ReferenceLayer};
use switchyard_router_client::RoutingOverrides;

#[tokio::test(flavor = "current_thread")]
async fn a_large_call_leaves_the_runtime_responsive() {
    // DeepEP-like routing (top-8 of 256) on identity experts: the call is the client's own work.
    let model = ModelSpec {
        experts_per_layer: 256,
        top_k: 8,
        d_model: 2048,
        d_ff: 16,
        capacity: CapacityPolicy::Dropless,
        ..ModelSpec::default_synthetic()
    };
    let config = ReferenceConfig { identity_experts: true, ..ReferenceConfig::cpu() };
    let reference = ReferenceLayer::start(&model, &[0], config).await.expect("reference");
    let hidden: Arc<Vec<f32>> = Arc::new((0..2048 * 2048).map(|i| ((i % 977) as f32 * 0.01).sin()).collect());

    let calling = Arc::new(AtomicBool::new(true));
    let ticker = tokio::spawn({
        let calling = calling.clone();
        async move {
            let mut interval = tokio::time::interval(Duration::from_millis(1));
            let (mut last, mut longest) = (Instant::now(), Duration::ZERO);
            while calling.load(Ordering::Relaxed) {
                interval.tick().await;
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            longest
        }
    });
    tokio::task::yield_now().await;
    let output = reference.forward(0, &hidden, &RoutingOverrides::default()).await.expect("call");
    calling.store(false, Ordering::Relaxed);
    let longest_gap = ticker.await.expect("ticker");

    let timing = output.timing;
    let planning = timing.gate + timing.plan + timing.encode;
    assert!(planning > Duration::from_millis(20), "the call must be large enough to tell: planning took {planning:?}");
    assert!(
        longest_gap < planning / 2,
        "the ticker stalled for {longest_gap:?} while planning took {planning:?} (decode + combine {:?})",
        timing.decode + timing.combine
    );
}
