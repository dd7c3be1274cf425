//! Forward requests, validated: wire types in, domain types out (`TryFrom`), every rejection naming
//! the field at fault. Checks that need the worker's state (is the expert served here, is the width
//! its `d_model`) happen at admission, in [`crate::scheduler`].

use bytes::Bytes;
use switchyard_model::ExpertId;
use switchyard_proto::v1;
use switchyard_proto::wire::WireDtype;

use crate::error::WorkerError;

/// The rows of one expert in one request: `[tokens, width]` of `dtype`, exactly sized.
#[derive(Debug, Clone)]
pub struct ExpertRowsIn {
    /// Position in the request's `batches`, for error messages.
    pub index: usize,
    pub expert: ExpertId,
    pub dtype: WireDtype,
    pub tokens: usize,
    pub width: usize,
    pub data: Bytes,
}

impl ExpertRowsIn {
    pub fn field(&self) -> String {
        format!("batches[{}]", self.index)
    }
}

/// A validated forward request.
#[derive(Debug, Clone)]
pub struct ForwardBatch {
    pub request_id: u64,
    pub parts: Vec<ExpertRowsIn>,
    /// The dtype answers are encoded in; `None` answers each part in its own dtype.
    pub output_dtype: Option<WireDtype>,
}

impl ForwardBatch {
    pub fn total_tokens(&self) -> usize {
        self.parts.iter().map(|part| part.tokens).sum()
    }
}

fn parse_dtype(value: i32, field: &str) -> Result<WireDtype, WorkerError> {
    WireDtype::try_from(value).map_err(|error| WorkerError::invalid(field, error.to_string()))
}

fn parse_rows(index: usize, part: v1::ExpertRows) -> Result<ExpertRowsIn, WorkerError> {
    let field = format!("batches[{index}]");
    let expert = ExpertId::from(part.expert.ok_or_else(|| WorkerError::invalid(format!("{field}.expert"), "missing"))?);
    let rows = part.rows.ok_or_else(|| WorkerError::invalid(format!("{field}.rows"), "missing"))?;
    let dtype = parse_dtype(rows.dtype, &format!("{field}.rows.dtype"))?;
    let [tokens, width] = rows.shape[..] else {
        return Err(WorkerError::invalid(
            format!("{field}.rows.shape"),
            format!("expected [tokens, d_model], got {:?}", rows.shape),
        ));
    };
    let row_bytes = usize::try_from(width).ok().map(|width| dtype.row_bytes(width) as u64);
    let expected_bytes = row_bytes.and_then(|row_bytes| tokens.checked_mul(row_bytes));
    if expected_bytes != Some(rows.data.len() as u64) {
        return Err(WorkerError::invalid(
            format!("{field}.rows.data"),
            format!(
                "shape {:?} of {} needs {} bytes, got {}",
                rows.shape,
                dtype,
                expected_bytes.map_or("more than u64".to_owned(), |n| n.to_string()),
                rows.data.len()
            ),
        ));
    }
    Ok(ExpertRowsIn { index, expert, dtype, tokens: tokens as usize, width: width as usize, data: rows.data })
}

impl TryFrom<v1::ForwardRequest> for ForwardBatch {
    type Error = WorkerError;

    fn try_from(request: v1::ForwardRequest) -> Result<Self, Self::Error> {
        let output_dtype = match request.output_dtype {
            0 => None,
            value => match parse_dtype(value, "output_dtype")? {
                dtype if dtype.answers() => Some(dtype),
                dtype => {
                    let reason = format!("{dtype} is a dispatch format; answers are f32, f16 or bf16");
                    return Err(WorkerError::invalid("output_dtype", reason));
                }
            },
        };
        let parts = request
            .batches
            .into_iter()
            .enumerate()
            .map(|(index, part)| parse_rows(index, part))
            .collect::<Result<_, _>>()?;
        Ok(ForwardBatch { request_id: request.request_id, parts, output_dtype })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(dtype: i32, shape: Vec<u64>, bytes: usize) -> v1::ForwardRequest {
        v1::ForwardRequest {
            request_id: 1,
            batches: vec![v1::ExpertRows {
                expert: Some(v1::ExpertKey::new(0, 1)),
                rows: Some(v1::WireTensor { dtype, shape, data: Bytes::from(vec![0u8; bytes]) }),
            }],
            output_dtype: 0,
        }
    }

    fn rejection(request: v1::ForwardRequest) -> String {
        ForwardBatch::try_from(request).unwrap_err().to_string()
    }

    #[test]
    fn accepts_a_well_formed_batch() {
        let batch = ForwardBatch::try_from(request(v1::Dtype::Bf16 as i32, vec![3, 8], 48)).expect("valid");
        assert_eq!(batch.total_tokens(), 3);
        assert_eq!((batch.parts[0].width, batch.parts[0].dtype), (8, WireDtype::Bf16));
    }

    #[test]
    fn rejections_name_the_field() {
        assert!(rejection(request(0, vec![1, 4], 16)).starts_with("batches[0].rows.dtype: dtype 0 is unspecified"));
        assert!(rejection(request(9, vec![1, 4], 16)).starts_with("batches[0].rows.dtype"));
        assert!(rejection(request(1, vec![16], 16)).starts_with("batches[0].rows.shape: expected [tokens, d_model]"));
        assert_eq!(
            rejection(request(1, vec![2, 4], 30)),
            "batches[0].rows.data: shape [2, 4] of f32 needs 32 bytes, got 30"
        );
        assert!(rejection(request(1, vec![u64::MAX, 4], 0)).contains("more than u64"));
        let mut missing = request(1, vec![1, 4], 16);
        missing.batches[0].expert = None;
        assert_eq!(rejection(missing), "batches[0].expert: missing");
        let mut bad_output = request(1, vec![1, 4], 16);
        bad_output.output_dtype = 7;
        assert!(rejection(bad_output).starts_with("output_dtype"));
    }
}
