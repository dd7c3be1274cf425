//! Every routing policy, distributed over real processes, against the in-process reference, on
//! inputs where the capacity-based policies overflow.

use switchyard_integration_tests::{TestCluster, hidden_states, small_model};
use switchyard_model::CapacityPolicy;
use switchyard_reference::{ReferenceConfig, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::capacity::OverflowPolicy;
use switchyard_router_client::routing::{GroupLimited, RoutingPolicy};
use switchyard_router_client::{ClientOptions, DispatchLayout, MoeClient, RoutingOverrides};

struct Case {
    name: &'static str,
    policy: RoutingPolicy,
    overflow: OverflowPolicy,
    capacity_factor: f32,
}

fn cases() -> Vec<Case> {
    let case = |name, policy, overflow, capacity_factor| Case { name, policy, overflow, capacity_factor };
    let top2 = RoutingPolicy::TopK { k: 2, renormalize: true };
    let deepseek = GroupLimited { scaling: 2.5, ..GroupLimited::deepseek_v3(2, 4, 2) };
    vec![
        case("top-2 renormalised (Mixtral)", top2, OverflowPolicy::Drop, 0.5),
        case(
            "top-2 softmax weights (Qwen2-MoE, GShard)",
            RoutingPolicy::TopK { k: 2, renormalize: false },
            OverflowPolicy::Drop,
            0.5,
        ),
        case("top-1 (Switch)", RoutingPolicy::TopK { k: 1, renormalize: true }, OverflowPolicy::Drop, 0.5),
        case("noisy top-2", RoutingPolicy::NoisyTopK { k: 2, seed: 17 }, OverflowPolicy::Drop, 0.5),
        case("dense", RoutingPolicy::Dense, OverflowPolicy::Drop, 0.5),
        case("top-2 with re-routing", top2, OverflowPolicy::Reroute, 1.0),
        case("top-2 batch-prioritized (V-MoE)", top2, OverflowPolicy::BatchPrioritized, 0.5),
        case("expert choice", RoutingPolicy::ExpertChoice, OverflowPolicy::Drop, 1.0),
        case("group-limited (DeepSeek-V3)", RoutingPolicy::GroupLimited(deepseek), OverflowPolicy::Drop, 0.5),
        case("soft MoE, 2 slots per expert", RoutingPolicy::SoftMoe { slots: 2 }, OverflowPolicy::Drop, 1.0),
    ]
}

#[tokio::test]
async fn every_policy_matches_the_reference_where_capacity_overflows() {
    let model = small_model(1.0);
    let cluster = TestCluster::start(model.clone(), 2, |_| {}).await;
    let reference = ReferenceLayer::start(&model, &[0], ReferenceConfig::cpu()).await.expect("reference");
    let hidden = hidden_states(64, 256, 21);
    for case in cases() {
        let overrides = RoutingOverrides {
            policy: Some(case.policy),
            overflow: Some(case.overflow),
            capacity: Some(CapacityPolicy::Factor(case.capacity_factor)),
            ..Default::default()
        };
        let client = MoeClient::new(
            cluster.watcher.receiver(),
            ClientOptions { routing: overrides, ..ClientOptions::default() },
        );
        let distributed = client.forward(0, &hidden).await.unwrap_or_else(|error| panic!("{}: {error}", case.name));
        let expected = reference.forward(0, &hidden, &overrides).await.expect("reference");
        let error = relative_frobenius_error(&distributed.hidden, &expected.hidden);
        assert!(error < 1e-5, "{}: relative Frobenius error {error:e}", case.name);
        assert_eq!(distributed.routing, expected.routing, "{}: same routing decisions", case.name);
        let routing = &distributed.routing;
        match (case.policy, case.overflow) {
            (RoutingPolicy::SoftMoe { slots }, _) => {
                assert_eq!((routing.dropped, routing.capacity), (0, slots), "{}: nothing dropped", case.name);
                assert!(distributed.bytes.payload_sent == 8 * 2 * 256 * 4, "{}: 16 slot rows sent", case.name);
            }
            (RoutingPolicy::ExpertChoice, _) => {
                assert!(
                    routing.tokens_per_expert.iter().all(|load| *load as usize == routing.capacity),
                    "{}",
                    case.name
                );
                assert_eq!(routing.stats.imbalance, 1.0, "expert choice is balanced by construction");
            }
            (_, OverflowPolicy::Reroute) => {
                let dropping = RoutingOverrides { overflow: Some(OverflowPolicy::Drop), ..overrides };
                let dropped_without =
                    reference.forward(0, &hidden, &dropping).await.expect("reference").routing.dropped;
                assert!(routing.rerouted > 0, "{}: overflow was re-routed", case.name);
                assert!(
                    routing.dropped < dropped_without,
                    "{}: {} dropped with re-routing, {dropped_without} without",
                    case.name,
                    routing.dropped
                );
            }
            _ => assert!(routing.dropped > 0, "{}: capacity factor {} overflows", case.name, case.capacity_factor),
        }
        assert!(routing.tokens_per_expert.iter().all(|load| *load as usize <= routing.capacity), "{}", case.name);
        eprintln!(
            "{:45} dropped {:3} rerouted {:3} imbalance {:.2} error {error:.1e}",
            case.name, routing.dropped, routing.rerouted, routing.stats.imbalance
        );
    }
}

#[tokio::test]
async fn a_gated_shared_expert_takes_every_token_and_adds_its_output() {
    let model = switchyard_model::ModelSpec {
        shared_experts: 1,
        shared_d_ff: 384,
        shared_expert_gate: true,
        ..small_model(2.0)
    };
    let cluster = TestCluster::start(model.clone(), 2, |_| {}).await;
    let reference = ReferenceLayer::start(&model, &[0], ReferenceConfig::cpu()).await.expect("reference");
    let hidden = hidden_states(32, 256, 23);
    let distributed = cluster.client.forward(0, &hidden).await.expect("distributed forward");
    let expected = reference.forward(0, &hidden, &RoutingOverrides::default()).await.expect("reference");
    let error = relative_frobenius_error(&distributed.hidden, &expected.hidden);
    assert!(error < 1e-5, "relative Frobenius error {error:e}");
    // Token-major: each token once to the shared expert's worker (with its routed choices there),
    // and once to the other worker if it chose an expert there.
    let rows: usize = distributed.workers.iter().map(|worker| worker.rows).sum();
    assert!((32..=64).contains(&rows), "{rows} rows for 32 tokens on 2 workers");
    assert_eq!(distributed.bytes.payload_sent, rows as u64 * 256 * 4);
    let expert_major = MoeClient::new(
        cluster.watcher.receiver(),
        ClientOptions { dispatch: DispatchLayout::ExpertMajor, ..ClientOptions::default() },
    );
    let per_assignment = expert_major.forward(0, &hidden).await.expect("expert-major forward");
    assert_eq!(
        per_assignment.bytes.payload_sent,
        (32 * 2 + 32) * 256 * 4,
        "expert-major: routed rows plus every token for the shared expert"
    );
    let error = relative_frobenius_error(&per_assignment.hidden, &expected.hidden);
    assert!(error < 1e-5, "expert-major: relative Frobenius error {error:e}");

    // Independently: the output less the routed-only output is sigmoid(x · w_gate) · shared(x).
    let routed_only =
        switchyard_model::ModelSpec { shared_experts: 0, shared_d_ff: 0, shared_expert_gate: false, ..model.clone() };
    let without = ReferenceLayer::start(&routed_only, &[0], ReferenceConfig::cpu())
        .await
        .expect("reference")
        .forward(0, &hidden, &RoutingOverrides::default())
        .await
        .expect("routed-only reference");
    let shared =
        switchyard_experts::Expert::synthetic(&model, 0, 8, tch::Device::Cpu, switchyard_model::WeightDtype::F32)
            .forward_f32(&hidden);
    let gate = switchyard_model::synthetic::shared_gate_weights(model.seed, 0, 1, 256);
    let mut contribution = vec![0.0f32; hidden.len()];
    for (token, (x, out)) in hidden.chunks_exact(256).zip(shared.chunks_exact(256)).enumerate() {
        let logit: f32 = x.iter().zip(&gate).map(|(a, b)| a * b).sum();
        let weight = 1.0 / (1.0 + (-logit).exp());
        for (c, o) in contribution[token * 256..(token + 1) * 256].iter_mut().zip(out) {
            *c = weight * o;
        }
    }
    let difference: Vec<f32> = distributed.hidden.iter().zip(&without.hidden).map(|(a, b)| a - b).collect();
    let error = relative_frobenius_error(&difference, &contribution);
    assert!(error < 1e-4, "shared contribution: relative error {error:e}");
}
