//! Which points a sweep measures. Tokens per call and wire dtype are properties of a call, so each
//! cluster runs all of their combinations; the cluster axes (workers, experts, top-k, model size)
//! vary one at a time around the first value of each list (or as a full grid with `--grid`), since
//! every cluster shape costs a restart.

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

#[cfg(test)]
mod tests {
    use super::*;

    fn axes() -> Axes {
        Axes {
            tokens: vec![16, 256],
            wire_dtypes: vec![WireDtype::F32, WireDtype::Bf16],
            workers: vec![2, 1, 4],
            experts: vec![8, 16],
            top_k: vec![2, 1, 16],
            dims: vec![(512, 1024)],
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
            ],
            "top-k 16 > 8 experts is skipped; the base is not repeated"
        );
        assert_eq!(axes().points_of(base).len(), 4);
    }

    #[test]
    fn a_grid_takes_every_valid_combination() {
        // 3 workers x (8 experts x top-k {2, 1} + 16 experts x top-k {2, 1, 16}) = 3 x 5.
        assert_eq!(axes().shapes(true).len(), 15);
    }
}
