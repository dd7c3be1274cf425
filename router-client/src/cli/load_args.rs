//! Load flags shared by `switchyard loadtest` and `switchyard local --loadtest`.

use std::time::Duration;

use switchyard_proto::v1::Dtype;
use switchyard_router_client::loadtest::LoadSpec;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Concurrent callers, each in a closed loop (the next call starts when the last one answered).
    #[arg(long, env = "SWITCHYARD_LOAD_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Measured time, e.g. 10s, 500ms, 2m (after the warm-up).
    #[arg(long, env = "SWITCHYARD_LOAD_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many measured calls, if that comes before the duration.
    #[arg(long, env = "SWITCHYARD_LOAD_REQUESTS")]
    pub requests: Option<u64>,
    /// Tokens per layer call.
    #[arg(long, env = "SWITCHYARD_LOAD_TOKENS", default_value_t = 64)]
    pub tokens: usize,
    /// MoE layer the calls go to.
    #[arg(long, env = "SWITCHYARD_LOAD_LAYER", default_value_t = 0)]
    pub layer: u32,
    /// Unmeasured warm-up before the measured time.
    #[arg(long, env = "SWITCHYARD_LOAD_WARMUP", default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Seed of the generated hidden states.
    #[arg(long, env = "SWITCHYARD_LOAD_SEED", default_value_t = 1)]
    pub input_seed: u64,
    /// Capacity factor of the calls (default: the model's).
    #[arg(long = "call-capacity-factor", env = "SWITCHYARD_LOAD_CAPACITY_FACTOR")]
    pub call_capacity_factor: Option<f32>,
    /// Element type of rows on the wire: f32, f16 or bf16.
    #[arg(long, env = "SWITCHYARD_WIRE_DTYPE", default_value = "f32", value_parser = parse_dtype)]
    pub wire_dtype: Dtype,
}

impl LoadArgs {
    pub fn spec(&self) -> LoadSpec {
        LoadSpec {
            concurrency: self.concurrency,
            duration: self.duration,
            requests: self.requests,
            tokens_per_call: self.tokens,
            layer: self.layer,
            warmup: self.warmup,
            seed: self.input_seed,
            capacity_factor: self.call_capacity_factor,
        }
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("'{text}' is not a duration like 10s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "s" | "" => value,
        "m" => value * 60.0,
        other => return Err(format!("unknown duration unit '{other}' (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

pub fn parse_dtype(text: &str) -> Result<Dtype, String> {
    match text {
        "f32" => Ok(Dtype::F32),
        "f16" => Ok(Dtype::F16),
        "bf16" => Ok(Dtype::Bf16),
        other => Err(format!("unknown wire dtype '{other}' (use f32, f16 or bf16)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dtypes_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("'h'"));
        assert_eq!(parse_dtype("bf16"), Ok(Dtype::Bf16));
        assert!(parse_dtype("fp8").is_err());
    }
}
