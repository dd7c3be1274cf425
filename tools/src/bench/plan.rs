//! Which points a sweep measures. Tokens per call and wire dtype are properties of a call, so each
//! cluster runs all of their combinations; the cluster axes (workers, experts, top-k, model size)
//! vary one at a time around the first value of each list (or as a full grid with `--grid`), since
//! every cluster shape costs a restart. The DeepEP presets and the whole-model step are the run's
//! other parts ([`BenchPlan`]).

use std::time::Duration;

use switchyard_loadtest::loadtest::AttentionStandIn;
use switchyard_loadtest::local_cluster::Hosts;
use switchyard_loadtest::shaped_network::{CongestionControl, LinkRate};
use switchyard_proto::wire::WireDtype;

/// The shape of one cluster: what a restart changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ClusterShape {
    pub workers: usize,
    pub experts: u32,
    pub top_k: u32,
    pub d_model: u32,
    pub d_ff: u32,
}

impl std::fmt::Display for ClusterShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} workers, {} experts, top-{}, {}x{}",
            self.workers, self.experts, self.top_k, self.d_model, self.d_ff
        )
    }
}

/// One measured point: a cluster shape, tokens per call and the wire dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub shape: ClusterShape,
    pub tokens: usize,
    #[serde(with = "dtype_name")]
    pub wire_dtype: WireDtype,
}

/// A wire dtype in reports: its name.
mod dtype_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use switchyard_proto::wire::WireDtype;

    pub fn serialize<S: Serializer>(dtype: &WireDtype, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(dtype.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<WireDtype, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The lists a sweep draws from; the first value of each is the base.
#[derive(Debug, Clone, PartialEq)]
pub struct Axes {
    pub tokens: Vec<usize>,
    pub wire_dtypes: Vec<WireDtype>,
    pub workers: Vec<usize>,
    pub experts: Vec<u32>,
    pub top_k: Vec<u32>,
    /// `(d_model, d_ff)` pairs.
    pub dims: Vec<(u32, u32)>,
}

impl Axes {
    /// Cluster shapes: the base, then each cluster axis varied alone (`grid = false`), or every
    /// combination (`grid = true`). No shape twice; a top-k above the experts is skipped.
    pub fn shapes(&self, grid: bool) -> Vec<ClusterShape> {
        let base = ClusterShape {
            workers: self.workers[0],
            experts: self.experts[0],
            top_k: self.top_k[0],
            d_model: self.dims[0].0,
            d_ff: self.dims[0].1,
        };
        let mut shapes = vec![base];
        let mut push = |shape: ClusterShape| {
            if shape.top_k <= shape.experts && !shapes.contains(&shape) {
                shapes.push(shape);
            }
        };
        if grid {
            for &workers in &self.workers {
                for &experts in &self.experts {
                    for &top_k in &self.top_k {
                        for &(d_model, d_ff) in &self.dims {
                            push(ClusterShape { workers, experts, top_k, d_model, d_ff });
                        }
                    }
                }
            }
        } else {
            self.workers.iter().for_each(|&workers| push(ClusterShape { workers, ..base }));
            self.experts.iter().for_each(|&experts| push(ClusterShape { experts, ..base }));
            self.top_k.iter().for_each(|&top_k| push(ClusterShape { top_k, ..base }));
            self.dims.iter().for_each(|&(d_model, d_ff)| push(ClusterShape { d_model, d_ff, ..base }));
        }
        shapes
    }

    /// Every point of `shape`: tokens × wire dtypes.
    pub fn points_of(&self, shape: ClusterShape) -> Vec<Point> {
        self.tokens
            .iter()
            .flat_map(|&tokens| self.wire_dtypes.iter().map(move |&wire_dtype| Point { shape, tokens, wire_dtype }))
            .collect()
    }
}

/// DeepEP's published settings: hidden 7168, top-8 of 256 experts (DeepSeek-V3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 4096 tokens per call (the normal, throughput-oriented kernels).
    DeepEpNormal,
    /// 128 tokens per call (the low-latency decoding kernels).
    DeepEpLowLatency,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::DeepEpNormal => "deepep-normal",
            Preset::DeepEpLowLatency => "deepep-low-latency",
        }
    }

    pub fn tokens(self) -> usize {
        match self {
            Preset::DeepEpNormal => 4096,
            Preset::DeepEpLowLatency => 128,
        }
    }

    /// The cluster: identity experts need no real d_ff; capacity never drops (DeepEP does not).
    pub fn shape(self, workers: usize) -> ClusterShape {
        ClusterShape { workers, experts: 256, top_k: 8, d_model: 7168, d_ff: 64 }
    }
}

/// A whole-model step: a synthetic model of `layers` MoE layers of the sweep's first shape, each
/// call `tokens` through all of them in order with `attention` before each.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    pub layers: u32,
    pub tokens: usize,
    pub attention: AttentionStandIn,
}

/// What `run` measures.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub axes: Axes,
    pub grid: bool,
    /// Skip the sweep (presets only).
    pub sweep: bool,
    pub presets: Vec<Preset>,
    pub preset_workers: usize,
    /// Measured calls of each preset, and the most time they may take (a DeepEP-normal call moves
    /// ~470 MB each way: seconds, not milliseconds, on one CPU host).
    pub preset_calls: u64,
    pub preset_time: Duration,
    /// Whether the presets' workers start on each request of a call as it arrives, the rest of the
    /// dispatch still on the wire; otherwise each waits for its whole dispatch
    /// ([`super::WHOLE_DISPATCH_WAIT`]).
    pub preset_overlap: bool,
    /// Run the presets (and the step) once per rate, the workers behind links of that rate;
    /// empty: on loopback.
    pub link_rates: Vec<LinkRate>,
    /// Every host's TCP congestion control on the links.
    pub link_congestion: CongestionControl,
    /// A whole-model step to measure, if any.
    pub step: Option<StepPlan>,
}

impl BenchPlan {
    /// The cluster shapes the sweep runs: none without a sweep.
    pub(super) fn swept_shapes(&self) -> Vec<ClusterShape> {
        if self.sweep { self.axes.shapes(self.grid) } else { Vec::new() }
    }

    /// The links the presets and the step run on, each in turn; `None`: loopback.
    pub(super) fn links(&self) -> Vec<Option<LinkRate>> {
        match &self.link_rates[..] {
            [] => vec![None],
            rates => rates.iter().copied().map(Some).collect(),
        }
    }

    /// What the run measures, each counted once for its progress: every point of the sweep, then
    /// every preset and the step on each link.
    pub(super) fn measurements(&self) -> usize {
        let points: usize = self.swept_shapes().iter().map(|shape| self.axes.points_of(*shape).len()).sum();
        points + (self.presets.len() + usize::from(self.step.is_some())) * self.links().len()
    }

    /// Where a run on `link` puts the cluster: each worker behind a link of that rate, every host
    /// running the plan's congestion control; without a link, `otherwise`.
    pub(super) fn hosts_behind(&self, link: Option<LinkRate>, otherwise: Hosts) -> Hosts {
        link.map_or(otherwise, |rate| Hosts::Namespaces { worker_link: Some(rate), congestion: self.link_congestion })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn axes() -> Axes {
        Axes {
            tokens: vec![16, 256],
            wire_dtypes: vec![WireDtype::F32, WireDtype::Bf16],
            workers: vec![2, 1, 4],
            experts: vec![8, 16],
            top_k: vec![2, 1, 16],
            dims: vec![(512, 1024), (1024, 4096)],
        }
    }

    #[test]
    fn one_axis_at_a_time_around_the_base() {
        let shapes = axes().shapes(false);
        let base = ClusterShape { workers: 2, experts: 8, top_k: 2, d_model: 512, d_ff: 1024 };
        assert_eq!(shapes[0], base);
        assert_eq!(
            shapes[1..],
            [
                ClusterShape { workers: 1, ..base },
                ClusterShape { workers: 4, ..base },
                ClusterShape { experts: 16, ..base },
                ClusterShape { top_k: 1, ..base },
                ClusterShape { d_model: 1024, d_ff: 4096, ..base },
            ],
            "top-k 16 > 8 experts is skipped; the base is not repeated"
        );
        assert_eq!(axes().points_of(base).len(), 4);
        assert_eq!(base.to_string(), "2 workers, 8 experts, top-2, 512x1024");
    }

    #[test]
    fn the_presets_are_deepeps_published_settings() {
        let settings = [Preset::DeepEpNormal, Preset::DeepEpLowLatency].map(|preset| (preset.name(), preset.tokens()));
        assert_eq!(settings, [("deepep-normal", 4096), ("deepep-low-latency", 128)]);
        let shape = Preset::DeepEpNormal.shape(4);
        assert_eq!((shape.workers, shape.experts, shape.top_k, shape.d_model), (4, 256, 8, 7168));
    }

    /// The low-latency preset alone, on loopback.
    pub(crate) fn presets_plan() -> BenchPlan {
        BenchPlan {
            axes: axes(),
            grid: false,
            sweep: false,
            presets: vec![Preset::DeepEpLowLatency],
            preset_workers: 2,
            preset_calls: 11,
            preset_time: Duration::from_secs(9),
            preset_overlap: false,
            link_rates: Vec::new(),
            link_congestion: CongestionControl::Bbr,
            step: None,
        }
    }

    #[test]
    fn a_link_puts_each_worker_behind_it_in_a_namespace() {
        let plan = presets_plan();
        let rate = LinkRate::from_bits_per_second(10_000_000_000);
        assert_eq!(plan.hosts_behind(None, Hosts::Loopback), Hosts::Loopback);
        assert_eq!(
            plan.hosts_behind(Some(rate), Hosts::Loopback),
            Hosts::Namespaces { worker_link: Some(rate), congestion: CongestionControl::Bbr }
        );
    }

    #[test]
    fn a_grid_takes_every_valid_combination() {
        // 3 workers x (8 experts x top-k {2, 1} + 16 experts x top-k {2, 1, 16}) x 2 sizes = 3 x 5 x 2.
        assert_eq!(axes().shapes(true).len(), 30);
    }

    #[test]
    fn the_progress_counts_each_point_then_each_preset_and_step_on_each_link() {
        let presets = presets_plan();
        assert_eq!((presets.swept_shapes(), presets.links()), (Vec::new(), vec![None]));
        assert_eq!(presets.measurements(), 1);
        let rates = [1, 10].map(|gbit| LinkRate::from_bits_per_second(gbit * 1_000_000_000));
        let everything = BenchPlan {
            sweep: true,
            presets: vec![Preset::DeepEpNormal, Preset::DeepEpLowLatency],
            link_rates: rates.to_vec(),
            step: Some(StepPlan { layers: 2, tokens: 8, attention: AttentionStandIn::None }),
            ..presets_plan()
        };
        assert_eq!(everything.swept_shapes(), axes().shapes(false));
        assert_eq!(everything.links(), rates.map(Some));
        // 6 shapes x 2 token counts x 2 dtypes, then (2 presets + the step) x 2 links.
        assert_eq!(everything.measurements(), 6 * 2 * 2 + 3 * 2);
        let grid = BenchPlan { grid: true, ..everything };
        assert_eq!(grid.measurements(), 30 * 2 * 2 + 3 * 2);
    }
}
