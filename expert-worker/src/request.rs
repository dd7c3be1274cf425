//! Forward requests, validated: wire types in, domain types out (`TryFrom`), every rejection naming
//! the field at fault. Checks that need the worker's state (is the expert served here, is the width
//! its `d_model`) happen at admission, in [`crate::scheduler`].

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use switchyard_model::ExpertId;
use switchyard_proto::v1;
use switchyard_proto::wire::WireDtype;

use crate::error::WorkerError;

/// The rows of one expert in one request: `tokens` rows of `width` in `dtype`.
#[derive(Debug, Clone)]
pub struct ExpertRowsIn {
    /// Position in the request's `batches` (expert-major), or among its experts (token-major).
    pub index: usize,
    pub expert: ExpertId,
    pub dtype: WireDtype,
    pub tokens: usize,
    pub width: usize,
    pub rows: RowsSource,
}

/// Where a part's rows are.
#[derive(Debug, Clone)]
pub enum RowsSource {
    /// Its own `[tokens, width]` rows, answered as they are.
    Own(Bytes),
    /// Rows of a token-major request, whose gate-weighted outputs go into the request's sum.
    Gathered(Gathered),
}

/// One expert's share of a token-major request.
#[derive(Debug, Clone)]
pub struct Gathered {
    pub shared: Arc<SharedRows>,
    /// The rows (tokens of the request) that chose this expert, ascending.
    pub indices: Vec<i64>,
    /// Their gate weights for this expert.
    pub weights: Vec<f32>,
}

/// The rows of a token-major request, each token once; every expert part gathers from them.
#[derive(Debug)]
pub struct SharedRows {
    pub data: Bytes,
    pub dtype: WireDtype,
    pub tokens: usize,
    pub width: usize,
    /// Expert parts whose outputs make up the sum.
    pub parts: usize,
}

impl ExpertRowsIn {
    pub fn field(&self) -> String {
        match self.rows {
            RowsSource::Own(_) => format!("batches[{}]", self.index),
            RowsSource::Gathered(_) => format!("tokens.experts ({})", self.expert),
        }
    }
}

/// A validated forward request.
#[derive(Debug, Clone)]
pub struct ForwardBatch {
    pub request_id: u64,
    pub parts: Vec<ExpertRowsIn>,
    /// The dtype answers are encoded in; `None` answers each part in its own dtype.
    pub output_dtype: Option<WireDtype>,
    /// Set for a token-major request: its rows, summed per token into one answer.
    pub token_major: Option<Arc<SharedRows>>,
}

impl ForwardBatch {
    pub fn total_tokens(&self) -> usize {
        self.parts.iter().map(|part| part.tokens).sum()
    }
}

fn parse_dtype(value: i32, field: &str) -> Result<WireDtype, WorkerError> {
    WireDtype::try_from(value).map_err(|error| WorkerError::invalid(field, error.to_string()))
}

/// A checked `[tokens, width]` tensor.
struct Tensor2 {
    dtype: WireDtype,
    tokens: usize,
    width: usize,
    data: Bytes,
}

fn parse_rows(index: usize, part: v1::ExpertRows) -> Result<ExpertRowsIn, WorkerError> {
    let field = format!("batches[{index}]");
    let expert = ExpertId::from(part.expert.ok_or_else(|| WorkerError::invalid(format!("{field}.expert"), "missing"))?);
    let rows = part.rows.ok_or_else(|| WorkerError::invalid(format!("{field}.rows"), "missing"))?;
    let Tensor2 { dtype, tokens, width, data } = parse_tensor(rows, &format!("{field}.rows"))?;
    Ok(ExpertRowsIn { index, expert, dtype, tokens, width, rows: RowsSource::Own(data) })
}

/// A token-major request's parts: one per expert, in expert order, each with the rows that chose it.
fn parse_token_rows(tokens: v1::TokenRows) -> Result<(Vec<ExpertRowsIn>, Arc<SharedRows>), WorkerError> {
    let rows = tokens.rows.ok_or_else(|| WorkerError::invalid("tokens.rows", "missing"))?;
    let Tensor2 { dtype, tokens: count, width, data } = parse_tensor(rows, "tokens.rows")?;
    let offsets = words_of(&tokens.offsets, "tokens.offsets", |word| u32::from_le_bytes(word) as usize)?;
    let experts = words_of(&tokens.experts, "tokens.experts", u32::from_le_bytes)?;
    let weights = words_of(&tokens.weights, "tokens.weights", f32::from_le_bytes)?;
    if offsets.len() != count + 1 {
        return Err(WorkerError::invalid(
            "tokens.offsets",
            format!("{count} tokens need {} offsets, got {}", count + 1, offsets.len()),
        ));
    }
    if offsets[0] != 0 || offsets.windows(2).any(|pair| pair[0] > pair[1]) || offsets[count] != experts.len() {
        return Err(WorkerError::invalid(
            "tokens.offsets",
            format!("must rise from 0 to the {} expert choices", experts.len()),
        ));
    }
    if weights.len() != experts.len() {
        return Err(WorkerError::invalid(
            "tokens.weights",
            format!("{} weights for {} expert choices", weights.len(), experts.len()),
        ));
    }
    let mut by_expert: BTreeMap<u32, (Vec<i64>, Vec<f32>)> = BTreeMap::new();
    for token in 0..count {
        for choice in offsets[token]..offsets[token + 1] {
            let (indices, token_weights) = by_expert.entry(experts[choice]).or_default();
            if indices.last() == Some(&(token as i64)) {
                // A router picks distinct experts; a repeat would also count the row twice against
                // the expert's capacity.
                return Err(WorkerError::invalid(
                    "tokens.experts",
                    format!("token {token} chooses expert {} more than once", experts[choice]),
                ));
            }
            indices.push(token as i64);
            token_weights.push(weights[choice]);
        }
    }
    let shared = Arc::new(SharedRows { data, dtype, tokens: count, width, parts: by_expert.len() });
    let parts = by_expert
        .into_iter()
        .enumerate()
        .map(|(index, (expert, (indices, weights)))| ExpertRowsIn {
            index,
            expert: ExpertId::new(tokens.layer, expert),
            dtype,
            tokens: indices.len(),
            width,
            rows: RowsSource::Gathered(Gathered { shared: shared.clone(), indices, weights }),
        })
        .collect();
    Ok((parts, shared))
}

/// `bytes` read as little-endian 4-byte values, each converted by `from`.
fn words_of<T>(bytes: &Bytes, field: &str, from: impl Fn([u8; 4]) -> T) -> Result<Vec<T>, WorkerError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(WorkerError::invalid(
            field,
            format!("{} bytes is not a whole number of 4-byte values", bytes.len()),
        ));
    }
    Ok(switchyard_proto::wire::le_words(bytes).map(from).collect())
}

/// Checks that `rows` is `[tokens, width]` of a known dtype with exactly the bytes that takes.
fn parse_tensor(rows: v1::WireTensor, field: &str) -> Result<Tensor2, WorkerError> {
    let dtype = parse_dtype(rows.dtype, &format!("{field}.dtype"))?;
    let [tokens, width] = rows.shape[..] else {
        return Err(WorkerError::invalid(
            format!("{field}.shape"),
            format!("expected [tokens, d_model], got {:?}", rows.shape),
        ));
    };
    if width == 0 {
        // Rows of no values take no bytes, so any token count would match the data.
        return Err(WorkerError::invalid(format!("{field}.shape"), format!("rows of 0 values in {:?}", rows.shape)));
    }
    let row_bytes = usize::try_from(width).ok().and_then(|width| dtype.checked_row_bytes(width));
    let expected_bytes = row_bytes.and_then(|row_bytes| tokens.checked_mul(row_bytes as u64));
    if expected_bytes != Some(rows.data.len() as u64) {
        return Err(WorkerError::invalid(
            format!("{field}.data"),
            format!(
                "shape {:?} of {} needs {} bytes, got {}",
                rows.shape,
                dtype,
                expected_bytes.map_or("more than u64".to_owned(), |n| n.to_string()),
                rows.data.len()
            ),
        ));
    }
    Ok(Tensor2 { dtype, tokens: tokens as usize, width: width as usize, data: rows.data })
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
        if let Some(tokens) = request.tokens {
            if !request.batches.is_empty() {
                return Err(WorkerError::invalid("tokens", "a request carries batches or tokens, not both"));
            }
            let (parts, shared) = parse_token_rows(tokens)?;
            return Ok(ForwardBatch { request_id: request.request_id, parts, output_dtype, token_major: Some(shared) });
        }
        let parts = request
            .batches
            .into_iter()
            .enumerate()
            .map(|(index, part)| parse_rows(index, part))
            .collect::<Result<_, _>>()?;
        Ok(ForwardBatch { request_id: request.request_id, parts, output_dtype, token_major: None })
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
            tokens: None,
            sequence: 0,
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
        assert!(rejection(request(1, vec![1, 1 << 62], 0)).contains("more than u64"));
        assert_eq!(rejection(request(1, vec![5, 0], 0)), "batches[0].rows.shape: rows of 0 values in [5, 0]");
        let mut missing = request(1, vec![1, 4], 16);
        missing.batches[0].expert = None;
        assert_eq!(rejection(missing), "batches[0].expert: missing");
        let mut bad_output = request(1, vec![1, 4], 16);
        bad_output.output_dtype = 7;
        assert!(rejection(bad_output).starts_with("output_dtype"));
        let mut fp8_answers = request(1, vec![1, 4], 16);
        fp8_answers.output_dtype = v1::Dtype::Fp8E4m3 as i32;
        assert_eq!(rejection(fp8_answers), "output_dtype: fp8 is a dispatch format; answers are f32, f16 or bf16");
    }

    fn token_request(offsets: &[u32], experts: &[u32], weights: &[f32]) -> v1::ForwardRequest {
        let bytes = |words: Vec<[u8; 4]>| Bytes::from(words.concat());
        v1::ForwardRequest {
            tokens: Some(v1::TokenRows {
                layer: 2,
                rows: Some(v1::WireTensor { dtype: 1, shape: vec![2, 4], data: Bytes::from(vec![0u8; 32]) }),
                offsets: bytes(offsets.iter().map(|o| o.to_le_bytes()).collect()),
                experts: bytes(experts.iter().map(|e| e.to_le_bytes()).collect()),
                weights: bytes(weights.iter().map(|w| w.to_le_bytes()).collect()),
            }),
            ..request(1, vec![1, 4], 16)
        }
    }

    #[test]
    fn a_token_major_request_becomes_one_gathering_part_per_expert() {
        let mut valid = token_request(&[0, 2, 3], &[5, 1, 5], &[0.25, 0.75, 1.0]);
        valid.batches.clear();
        let batch = ForwardBatch::try_from(valid).expect("valid");
        let shared = batch.token_major.as_ref().expect("token-major");
        assert_eq!((shared.tokens, shared.width, shared.parts), (2, 4, 2));
        let parts: Vec<_> = batch
            .parts
            .iter()
            .map(|part| match &part.rows {
                RowsSource::Gathered(g) => (part.expert, g.indices.clone(), g.weights.clone()),
                RowsSource::Own(_) => panic!("token-major parts gather"),
            })
            .collect();
        assert_eq!(
            parts,
            [(ExpertId::new(2, 1), vec![0], vec![0.75]), (ExpertId::new(2, 5), vec![0, 1], vec![0.25, 1.0])]
        );
        assert_eq!(batch.parts[1].field(), "tokens.experts (layer 2 expert 5)");
    }

    #[test]
    fn token_major_rejections_name_the_field() {
        let rejection = |offsets: &[u32], experts: &[u32], weights: &[f32]| {
            let mut request = token_request(offsets, experts, weights);
            request.batches.clear();
            ForwardBatch::try_from(request).unwrap_err().to_string()
        };
        assert_eq!(rejection(&[0, 1], &[3], &[1.0]), "tokens.offsets: 2 tokens need 3 offsets, got 2");
        assert_eq!(
            rejection(&[0, 2, 1], &[3, 4], &[1.0, 1.0]),
            "tokens.offsets: must rise from 0 to the 2 expert choices"
        );
        assert_eq!(rejection(&[0, 1, 2], &[3, 4], &[1.0]), "tokens.weights: 1 weights for 2 expert choices");
        assert_eq!(
            rejection(&[0, 1, 3], &[3, 4, 4], &[1.0, 0.5, 0.5]),
            "tokens.experts: token 1 chooses expert 4 more than once"
        );
        let mut ragged = token_request(&[0, 1, 2], &[3, 4], &[1.0, 1.0]);
        ragged.batches.clear();
        ragged.tokens.as_mut().unwrap().weights.truncate(7);
        assert_eq!(
            ForwardBatch::try_from(ragged).unwrap_err().to_string(),
            "tokens.weights: 7 bytes is not a whole number of 4-byte values"
        );
        let both = ForwardBatch::try_from(token_request(&[0, 1, 1], &[3], &[1.0])).unwrap_err().to_string();
        assert_eq!(both, "tokens: a request carries batches or tokens, not both");
        let mut endless = token_request(&[], &[], &[]);
        endless.batches.clear();
        endless.tokens.as_mut().unwrap().rows =
            Some(v1::WireTensor { dtype: 1, shape: vec![u64::MAX, 0], data: Bytes::new() });
        assert_eq!(
            ForwardBatch::try_from(endless).unwrap_err().to_string(),
            format!("tokens.rows.shape: rows of 0 values in [{}, 0]", u64::MAX)
        );
    }
}
