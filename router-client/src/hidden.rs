//! [`Hidden`]: the `[tokens, d_model]` f32 rows of one layer call, shared, so that the call's CPU
//! work can run on the client's pool while the caller's task awaits.

use std::ops::Deref;
use std::sync::Arc;

/// From a `Vec` or an `Arc<Vec>` without a copy; from a slice with one.
#[derive(Debug, Clone)]
pub struct Hidden(Arc<Vec<f32>>);

impl Deref for Hidden {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl From<Vec<f32>> for Hidden {
    fn from(rows: Vec<f32>) -> Self {
        Self(Arc::new(rows))
    }
}

impl From<Arc<Vec<f32>>> for Hidden {
    fn from(rows: Arc<Vec<f32>>) -> Self {
        Self(rows)
    }
}

impl From<&Arc<Vec<f32>>> for Hidden {
    fn from(rows: &Arc<Vec<f32>>) -> Self {
        Self(rows.clone())
    }
}

impl From<&[f32]> for Hidden {
    fn from(rows: &[f32]) -> Self {
        Self(Arc::new(rows.to_vec()))
    }
}

impl From<&Vec<f32>> for Hidden {
    fn from(rows: &Vec<f32>) -> Self {
        Self::from(rows.as_slice())
    }
}
