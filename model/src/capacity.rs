//! The capacity policy: how many assignments one expert takes from one layer call.
//!
//! A checkpoint's architecture decides the default: the families that are dropless at inference in
//! their reference implementation (Mixtral, Qwen, OLMoE, DeepSeek, GPT-OSS, Granite) are served
//! dropless, Switch Transformers with its own per-sequence `expert_capacity`; synthetic models keep
//! the capacity factor of GShard and Switch Transformer. The operator can override either way.

/// How many assignments an expert takes per call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CapacityPolicy {
    /// No capacity: every expert takes every token routed to it, so nothing is ever dropped.
    Dropless,
    /// `ceil(top_k * tokens / experts * factor)` per call.
    Factor(f32),
    /// A fixed number of assignments per expert and sequence (Switch Transformers' `expert_capacity`);
    /// a call is one sequence unless it says how it splits into sequences of equal length.
    PerSequence(u32),
}

impl CapacityPolicy {
    /// The most assignments one expert takes from a call of `tokens` tokens; `None` when dropless.
    pub fn capacity(self, tokens: usize, top_k: usize, experts: usize) -> Option<usize> {
        match self {
            CapacityPolicy::Dropless => None,
            CapacityPolicy::Factor(factor) => Some(expert_capacity(tokens, top_k, experts, factor)),
            CapacityPolicy::PerSequence(capacity) => Some(capacity as usize),
        }
    }

    pub fn is_dropless(self) -> bool {
        self == CapacityPolicy::Dropless
    }
}

impl std::fmt::Display for CapacityPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CapacityPolicy::Dropless => write!(f, "dropless (no capacity: no token is ever dropped)"),
            CapacityPolicy::Factor(factor) => {
                write!(f, "capacity factor {factor}: ceil(top_k x tokens / experts x {factor}) per expert per call")
            }
            CapacityPolicy::PerSequence(capacity) => {
                write!(f, "expert capacity {capacity} per expert per sequence, tokens past it dropped in order")
            }
        }
    }
}

/// `ceil(top_k * tokens / experts * capacity_factor)`.
///
/// For top-1 this is Switch Transformer's `ceil(tokens / experts * capacity_factor)`; for top-k it
/// counts the `top_k * tokens` assignments, as GShard, DeepSpeed-MoE and Tutel do, so a capacity
/// factor of 1.0 means "a perfectly balanced batch just fits" whatever k is.
pub fn expert_capacity(tokens: usize, top_k: usize, experts: usize, capacity_factor: f32) -> usize {
    let exact = (top_k * tokens) as f64 / experts as f64 * f64::from(capacity_factor);
    // Guard against 1e-15 overshoots (e.g. 64 * 2 / 8 * 1.0) turning an exact value into one more.
    (exact - 1e-9).ceil().max(0.0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_follows_switch_for_top_1_and_counts_assignments_for_top_k() {
        assert_eq!(expert_capacity(64, 1, 8, 1.0), 8);
        assert_eq!(expert_capacity(64, 1, 8, 1.25), 10);
        assert_eq!(expert_capacity(64, 2, 8, 1.0), 16);
        assert_eq!(expert_capacity(10, 1, 8, 1.0), 2, "ceil(1.25)");
        assert_eq!(expert_capacity(64, 2, 8, 0.5), 8);
        assert_eq!(expert_capacity(0, 2, 8, 1.0), 0);
    }

    #[test]
    fn each_policy_gives_its_capacity() {
        assert_eq!(CapacityPolicy::Dropless.capacity(512, 2, 8), None);
        assert_eq!(CapacityPolicy::Factor(1.25).capacity(512, 2, 8), Some(160));
        assert_eq!(CapacityPolicy::PerSequence(64).capacity(512, 1, 8), Some(64));
        assert!(CapacityPolicy::Dropless.to_string().starts_with("dropless"));
        let dropless = [CapacityPolicy::Dropless, CapacityPolicy::Factor(1.25), CapacityPolicy::PerSequence(64)]
            .map(CapacityPolicy::is_dropless);
        assert_eq!(dropless, [true, false, false]);
    }
}
