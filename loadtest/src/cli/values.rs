//! The command line's enumerated values, as `clap::ValueEnum`s: `--help` lists each one's choices
//! and clap refuses anything else with them named. Each maps onto the library type it selects.
//! Then the parsers of structured values (durations, stages, addresses).

use switchyard_loadtest::loadtest::Stage;
use switchyard_model::{Activation, WeightDtype};
use switchyard_proto::wire::WireDtype;
use switchyard_router_client::capacity::OverflowPolicy;
use switchyard_router_client::{DispatchLayout, RefusalPolicy};

/// A routing policy other than the model's own router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyName {
    /// Softmax, top-k, renormalised (Mixtral).
    TopK,
    /// Softmax, top-k, weights as scored (Qwen2-MoE's norm_topk_prob false, GShard).
    TopKSoftmax,
    /// Noisy top-k gating, seeded (Shazeer et al. 2017).
    NoisyTopK,
    /// Every expert, softmax weights.
    Dense,
    /// Each expert picks its best tokens (Zhou et al. 2022).
    ExpertChoice,
    /// DeepSeek-V3: sigmoid scores, best groups, then top-k.
    GroupLimited,
    /// Soft MoE: experts process slot mixtures of the tokens (Puigcerver et al. 2023).
    SoftMoe,
}

/// What happens past an expert's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverflowArg {
    /// The assignment contributes nothing; the token keeps its residual path.
    Drop,
    /// To the token's next choice with room.
    Reroute,
    /// V-MoE: tokens admitted by their top gate weight, the least confident dropped.
    BatchPrioritized,
}

impl From<OverflowArg> for OverflowPolicy {
    fn from(overflow: OverflowArg) -> Self {
        match overflow {
            OverflowArg::Drop => OverflowPolicy::Drop,
            OverflowArg::Reroute => OverflowPolicy::Reroute,
            OverflowArg::BatchPrioritized => OverflowPolicy::BatchPrioritized,
        }
    }
}

/// The element type of expert weights and compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

/// The element type of rows on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireDtypeArg {
    F32,
    F16,
    Bf16,
    /// e4m3 with one f32 scale per 128 values (DeepEP's dispatch format); answers come back bf16.
    Fp8,
}

/// How rows travel to the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DispatchArg {
    /// Each token once per worker with its (expert, weight) pairs there; the worker answers one
    /// gate-weighted sum per token (DeepEP's layout). Soft MoE always travels expert-major.
    TokenMajor,
    /// One row per (token, expert) assignment, answered row by row.
    ExpertMajor,
}

/// What a full expert queue means when no other worker holds the expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RefusalArg {
    /// The call fails with the worker's RESOURCE_EXHAUSTED, naming the expert.
    Fail,
    /// The refused assignments overflow: their tokens keep the residual path for that expert.
    Overflow,
    /// Each refused assignment goes to its token's next most probable expert on a worker that
    /// has not refused (weighted as `--overflow reroute` weights it); overflows if none has room.
    NextBest,
}

impl From<RefusalArg> for RefusalPolicy {
    fn from(refusal: RefusalArg) -> Self {
        match refusal {
            RefusalArg::Fail => RefusalPolicy::Fail,
            RefusalArg::Overflow => RefusalPolicy::Overflow,
            RefusalArg::NextBest => RefusalPolicy::NextBest,
        }
    }
}

impl From<DispatchArg> for DispatchLayout {
    fn from(dispatch: DispatchArg) -> Self {
        match dispatch {
            DispatchArg::TokenMajor => DispatchLayout::TokenMajor,
            DispatchArg::ExpertMajor => DispatchLayout::ExpertMajor,
        }
    }
}

impl From<WireDtypeArg> for WireDtype {
    fn from(dtype: WireDtypeArg) -> Self {
        match dtype {
            WireDtypeArg::F32 => WireDtype::F32,
            WireDtypeArg::F16 => WireDtype::F16,
            WireDtypeArg::Bf16 => WireDtype::Bf16,
            WireDtypeArg::Fp8 => WireDtype::Fp8E4m3,
        }
    }
}

impl From<DtypeArg> for WeightDtype {
    fn from(dtype: DtypeArg) -> Self {
        match dtype {
            DtypeArg::F32 => WeightDtype::F32,
            DtypeArg::F16 => WeightDtype::F16,
            DtypeArg::Bf16 => WeightDtype::Bf16,
        }
    }
}

/// The expert form of a benchmark's synthetic models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivationArg {
    /// Mixtral's w2(silu(w1 x) * w3 x).
    Swiglu,
    /// w2(gelu(w1 x)).
    Gelu,
    /// w2(relu(w1 x)).
    Relu,
    /// GPT-OSS's clamped SwiGLU (alpha 1.702, limit 7).
    ClampedSwiglu,
}

impl From<ActivationArg> for Activation {
    fn from(activation: ActivationArg) -> Self {
        match activation {
            ActivationArg::Swiglu => Activation::SwiGlu,
            ActivationArg::Gelu => Activation::Gelu,
            ActivationArg::Relu => Activation::Relu,
            ActivationArg::ClampedSwiglu => Activation::GPT_OSS,
        }
    }
}

/// A duration like `10s`, `500ms`, `2m` or `1h 30m`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

/// A duration above zero (a deadline, a measured window).
pub fn parse_positive_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = parse_duration(text).map_err(|error| error.to_string())?;
    if duration.is_zero() { Err(format!("{text:?} is no time at all: give a positive duration")) } else { Ok(duration) }
}

/// A count of at least one (callers, tokens, workers, threads).
pub fn parse_count<T: TryFrom<u64>>(text: &str) -> Result<T, String> {
    let count: u64 = text.trim().parse().map_err(|_| format!("{text:?} is not a whole number"))?;
    if count == 0 {
        return Err("0: give at least 1".to_owned());
    }
    T::try_from(count).map_err(|_| format!("{count} is too large"))
}

/// A positive, finite number (a call rate, a capacity factor, a scaling factor).
pub fn parse_positive<T: std::str::FromStr + Into<f64> + Copy>(text: &str) -> Result<T, String> {
    let value: T = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    let wide: f64 = value.into();
    if wide > 0.0 && wide.is_finite() { Ok(value) } else { Err(format!("{text} is not a positive, finite number")) }
}

/// A fraction of calls, from 0 to 1.
pub fn parse_fraction(text: &str) -> Result<f64, String> {
    let fraction: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&fraction) { Ok(fraction) } else { Err(format!("{text} is not a fraction from 0 to 1")) }
}

/// `--stages`: `DURATION:RATE` pairs, comma-separated, e.g. `10s:50,30s:200,10s:0`.
#[derive(Debug, Clone, PartialEq)]
pub struct StagesArg(pub std::sync::Arc<[Stage]>);

pub fn parse_stages(text: &str) -> Result<StagesArg, String> {
    let stage = |item: &str| -> Result<Stage, String> {
        let (duration, target) =
            item.split_once(':').ok_or_else(|| format!("stage {item:?}: expected DURATION:RATE, e.g. 30s:200"))?;
        let duration =
            humantime::parse_duration(duration.trim()).map_err(|error| format!("stage {item:?}: {error}"))?;
        let target: f64 = target.trim().parse().map_err(|_| format!("stage {item:?}: the rate is not a number"))?;
        if duration.is_zero() || !target.is_finite() || target < 0.0 {
            return Err(format!("stage {item:?}: the duration must be positive and the rate finite and not negative"));
        }
        Ok(Stage { duration, target })
    };
    let stages = text.split(',').map(stage).collect::<Result<Vec<_>, _>>()?;
    if stages.iter().all(|stage| stage.target == 0.0) {
        return Err(format!("{text:?}: every stage's rate is 0: nothing would be sent"));
    }
    Ok(StagesArg(stages.into()))
}

/// `--layer`: one MoE layer, `all` of the model's in order (a whole-model step), or a list.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerArg {
    One(u32),
    All,
    List(Vec<u32>),
}

pub fn parse_layer(text: &str) -> Result<LayerArg, String> {
    if text.trim().eq_ignore_ascii_case("all") {
        return Ok(LayerArg::All);
    }
    let layers = text
        .split(',')
        .map(|layer| {
            layer.trim().parse::<u32>().map_err(|_| format!("{layer:?}: expected a layer number, a list, or all"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match &layers[..] {
        [one] => Ok(LayerArg::One(*one)),
        _ => Ok(LayerArg::List(layers)),
    }
}

/// A gRPC server address: `host:port` is taken as `http://host:port`; http and https URIs as
/// given; anything else is refused saying what is expected.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let uri = if text.contains("://") { text.to_owned() } else { format!("http://{text}") };
    let parsed: tonic::transport::Uri = uri.parse().map_err(|error| format!("{text:?} is not an address ({error})"))?;
    match parsed.scheme_str() {
        Some("http" | "https") => {}
        other => return Err(format!("{text:?}: scheme {other:?} (expected http://host:port or host:port)")),
    }
    if parsed.host().is_none_or(str::is_empty) || parsed.port_u16().is_none() {
        return Err(format!("{text:?} has no host and port (expected e.g. http://127.0.0.1:50051)"));
    }
    Ok(uri)
}

/// `--throttle-ratio`: 0 (off), or at least 1 (below 1 a worker accepting every request would
/// still be throttled).
pub fn parse_throttle_ratio(text: &str) -> Result<f64, String> {
    let ratio: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if ratio == 0.0 || (1.0..=1e6).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(format!(
            "{ratio} is neither 0 (off) nor between 1 and 1e6: below 1 a worker accepting everything is throttled"
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn each_refusal_and_dispatch_choice_is_its_namesake() {
        use super::{DispatchArg, DispatchLayout, RefusalArg, RefusalPolicy};
        let refusals = [RefusalArg::Fail, RefusalArg::Overflow, RefusalArg::NextBest].map(RefusalPolicy::from);
        assert_eq!(refusals, [RefusalPolicy::Fail, RefusalPolicy::Overflow, RefusalPolicy::NextBest]);
        let layouts = [DispatchArg::TokenMajor, DispatchArg::ExpertMajor].map(DispatchLayout::from);
        assert_eq!(layouts, [DispatchLayout::TokenMajor, DispatchLayout::ExpertMajor]);
    }

    #[test]
    fn numbers_out_of_their_range_are_refused_naming_the_value() {
        use super::{parse_count, parse_fraction, parse_positive, parse_positive_duration};
        assert_eq!(parse_count::<usize>("4"), Ok(4));
        assert_eq!(parse_count::<u32>("0"), Err("0: give at least 1".to_owned()));
        assert_eq!(parse_count::<u32>("5000000000"), Err("5000000000 is too large".to_owned()));
        assert!(parse_count::<usize>("-1").is_err() && parse_count::<usize>("two").is_err());
        assert_eq!(parse_positive::<f64>("200"), Ok(200.0));
        assert_eq!(parse_positive::<f32>("1.25"), Ok(1.25));
        for bad in ["0", "-3", "nan", "inf"] {
            assert_eq!(parse_positive::<f64>(bad), Err(format!("{bad} is not a positive, finite number")));
        }
        assert_eq!(parse_positive::<f32>("many"), Err("\"many\" is not a number".to_owned()));
        assert_eq!(parse_fraction("0.01"), Ok(0.01));
        assert!(parse_fraction("-1").is_err() && parse_fraction("1.5").is_err());
        assert_eq!(parse_positive_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_positive_duration("0s").expect_err("no time").contains("positive"));
    }

    #[test]
    fn layers_parse_as_one_a_list_or_all() {
        use super::{LayerArg, parse_layer};
        assert_eq!(parse_layer("3"), Ok(LayerArg::One(3)));
        assert_eq!(parse_layer("All"), Ok(LayerArg::All));
        assert_eq!(parse_layer("1, 3,5"), Ok(LayerArg::List(vec![1, 3, 5])));
        let refused = parse_layer("1,x").expect_err("not a layer");
        assert!(refused.contains("\"x\"") && refused.contains("all"), "{refused}");
    }

    #[test]
    fn stages_parse_with_each_error_named() {
        let stages = super::parse_stages("10s:50, 1m:200.5,500ms:0").expect("stages");
        let parsed: Vec<(Duration, f64)> = stages.0.iter().map(|stage| (stage.duration, stage.target)).collect();
        assert_eq!(
            parsed,
            [(Duration::from_secs(10), 50.0), (Duration::from_secs(60), 200.5), (Duration::from_millis(500), 0.0)]
        );
        for (text, said) in [
            ("10s", "expected DURATION:RATE"),
            ("ten:5", "stage \"ten:5\""),
            ("10s:fast", "not a number"),
            ("0s:5", "must be positive"),
            ("5s:-1", "not negative"),
            ("5s:0,1s:0", "nothing would be sent"),
        ] {
            let error = super::parse_stages(text).expect_err(text);
            assert!(error.contains(said), "{text}: {error}");
        }
    }

    use clap::ValueEnum;

    use super::*;

    #[test]
    fn addresses_without_a_scheme_are_taken_and_others_refused_clearly() {
        assert_eq!(parse_endpoint("127.0.0.1:50051").as_deref(), Ok("http://127.0.0.1:50051"));
        assert_eq!(parse_endpoint("https://coordinator:443").as_deref(), Ok("https://coordinator:443"));
        assert!(parse_endpoint("ftp://host:21").unwrap_err().contains("expected http://host:port"));
        assert!(parse_endpoint("coordinator").unwrap_err().contains("no host and port"));
        assert!(parse_endpoint("http://[::1").unwrap_err().contains("is not an address"));
    }

    #[test]
    fn throttle_ratios_below_one_are_refused() {
        assert_eq!(parse_throttle_ratio("0"), Ok(0.0));
        assert_eq!(parse_throttle_ratio("2"), Ok(2.0));
        assert_eq!(parse_throttle_ratio("1.5"), Ok(1.5));
        assert!(parse_throttle_ratio("0.5").unwrap_err().contains("below 1"));
        assert!(parse_throttle_ratio("NaN").is_err());
        assert!(parse_throttle_ratio("two").unwrap_err().contains("not a number"));
    }

    #[test]
    fn names_are_the_documented_ones() {
        assert_eq!(PolicyName::from_str("group-limited", false), Ok(PolicyName::GroupLimited));
        assert_eq!(
            OverflowPolicy::from(OverflowArg::from_str("batch-prioritized", false).unwrap()),
            OverflowPolicy::BatchPrioritized
        );
        assert_eq!(WireDtype::from(WireDtypeArg::from_str("bf16", false).unwrap()), WireDtype::Bf16);
        assert_eq!(WireDtype::from(WireDtypeArg::from_str("fp8", false).unwrap()), WireDtype::Fp8E4m3);
        assert!(DtypeArg::from_str("fp8", false).is_err(), "weights are never fp8");
        assert_eq!(Activation::from(ActivationArg::from_str("clamped-swiglu", false).unwrap()), Activation::GPT_OSS);
        assert_eq!(parse_duration("250ms").ok(), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m").ok(), Some(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
    }
}
