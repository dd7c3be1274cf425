//! The next-best refusal policy over real in-process workers: a worker whose queues are full
//! refuses its experts' rows, and each refused (token, expert) choice is computed by the token's
//! next most probable expert on the worker with room, at the weight capacity's re-route policy
//! gives it. The output is checked token by token against each expert's own output.

use std::sync::Arc;
use std::time::Duration;

use switchyard_model::{CapacityPolicy, ModelSpec};
use switchyard_proto::v1;
use switchyard_proto::wire::{self, WireDtype};
use switchyard_reference::in_process::InProcessTransport;
use switchyard_reference::relative_frobenius_error;
use switchyard_router_client::{ClientOptions, DispatchLayout, ExpertTransport, MoeClient, RefusalPolicy};
use tokio::sync::watch;

use crate::support;

const TOKENS: usize = 64;
const D_MODEL: usize = 16;

fn model() -> ModelSpec {
    ModelSpec { d_model: 16, d_ff: 32, seed: 11, capacity: CapacityPolicy::Dropless, ..ModelSpec::default_synthetic() }
}

/// Rows that spread over every expert.
fn varied() -> Vec<f32> {
    (0..TOKENS * D_MODEL).map(|i| ((i as f32 * 12.9898).sin() * 43758.545).fract() * 2.0).collect()
}

/// Every token's row through `expert`, as the roomy worker computes it.
async fn expert_outputs(transport: &InProcessTransport, expert: u32, hidden: &[f32]) -> Vec<f32> {
    let request = v1::ForwardRequest {
        request_id: 1,
        batches: vec![v1::ExpertRows {
            expert: Some(v1::ExpertKey::new(0, expert)),
            rows: Some(v1::WireTensor {
                dtype: v1::Dtype::F32 as i32,
                shape: vec![TOKENS as u64, D_MODEL as u64],
                data: wire::encode_f32(hidden, WireDtype::F32),
            }),
        }],
        ..v1::ForwardRequest::default()
    };
    let answer = transport.forward(&Arc::from("a"), request, Duration::from_secs(60)).await.expect("expert outputs");
    let rows = answer.response.outputs[0].rows.as_ref().expect("rows");
    wire::decode_f32(&rows.data, WireDtype::F32)
}

/// What the policy computes for `token`: its top-2 (renormalised softmax) with each odd choice,
/// best first, moved to its best unused even expert at `p_next · w / p_odd`.
fn expected_row(logits: &[f32], outputs: &[Vec<f32>], token: usize) -> Vec<f32> {
    let peak = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|logit| (logit - peak).exp()).collect();
    let probabilities: Vec<f32> = exp.iter().map(|e| e / exp.iter().sum::<f32>()).collect();
    let mut order: Vec<usize> = (0..8).collect();
    order.sort_by(|a, b| probabilities[*b].total_cmp(&probabilities[*a]).then(a.cmp(b)));
    let chosen = &order[..2];
    let total: f32 = chosen.iter().map(|expert| probabilities[*expert]).sum();
    let mut used = chosen.to_vec();
    let mut row = vec![0.0; D_MODEL];
    for &expert in chosen {
        let weight = probabilities[expert] / total;
        let (expert, weight) = if expert % 2 == 0 {
            (expert, weight)
        } else {
            let next = *order
                .iter()
                .find(|candidate| **candidate % 2 == 0 && !used.contains(candidate))
                .expect("an even expert");
            used.push(next);
            (next, probabilities[next] * weight / probabilities[expert])
        };
        for (value, out) in row.iter_mut().zip(&outputs[expert][token * D_MODEL..(token + 1) * D_MODEL]) {
            *value += weight * out;
        }
    }
    row
}

async fn check(dispatch: DispatchLayout) {
    let (transport, table, [served, tiny]) = support::roomy_and_full(&model()).await;
    let (_tables, receiver) = watch::channel(Some(table));
    let options =
        ClientOptions { refusal: RefusalPolicy::NextBest, dispatch, throttle_ratio: None, ..ClientOptions::default() };
    let client = MoeClient::with_transport(receiver, options, transport.clone());
    let hidden = varied();
    let output = client.forward(0, hidden.clone()).await.expect("refused choices move instead of failing the call");

    let mut outputs = Vec::new();
    for expert in 0..8 {
        outputs.push(expert_outputs(&transport, expert, &hidden).await);
    }
    let odd_choices: usize = (0..TOKENS)
        .map(|token| {
            let logits = &output.router_logits[token * 8..(token + 1) * 8];
            let mut order: Vec<usize> = (0..8).collect();
            order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
            order[..2].iter().filter(|expert| *expert % 2 == 1).count()
        })
        .sum();
    assert!(odd_choices > 0);
    assert_eq!(output.routing.rerouted, odd_choices, "every refused choice moved");
    assert_eq!(output.routing.refused, 0, "an even expert is always left");
    assert!(output.routing.tokens_per_expert.iter().skip(1).step_by(2).all(|kept| *kept == 0));
    assert_eq!(output.routing.tokens_per_expert.iter().sum::<u32>(), 2 * TOKENS as u32);
    for token in 0..TOKENS {
        let expected = expected_row(&output.router_logits[token * 8..(token + 1) * 8], &outputs, token);
        let rows = token * D_MODEL..(token + 1) * D_MODEL;
        let error = relative_frobenius_error(&output.hidden[rows], &expected);
        assert!(error < 1e-5, "{dispatch:?}, token {token}: {error:e}");
    }
    served.shutdown().await;
    tiny.shutdown().await;
}

#[tokio::test]
async fn refused_choices_go_to_the_next_best_expert_token_major() {
    check(DispatchLayout::TokenMajor).await;
}

#[tokio::test]
async fn refused_choices_go_to_the_next_best_expert_expert_major() {
    check(DispatchLayout::ExpertMajor).await;
}
