//! The dispatch plan: the kept assignments grouped by worker, then packed into requests.
//!
//! One request per worker carries every expert that worker serves for this call. A worker whose
//! payload exceeds `split_bytes` gets several requests (an expert's rows are cut by whole rows), so
//! no batch is ever refused by a message size limit.

use std::collections::BTreeMap;
use std::sync::Arc;

use switchyard_model::ExpertId;
use switchyard_proto::v1;
use switchyard_proto::wire::{self, WireDtype};

use crate::codec::gather_rows;
use crate::error::ClientError;
use crate::router::ExpertAssignments;
use crate::table::RoutingTableView;
use crate::transport::Endpoint;

/// Rows `start..end` of group `group` (an index into the call's groups) placed in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub group: usize,
    pub start: usize,
    pub end: usize,
}

/// A request ready to send, with how to map its answer back.
#[derive(Debug, Clone)]
pub struct PlannedRequest {
    pub endpoint: Endpoint,
    pub request: v1::ForwardRequest,
    /// Aligned with `request.batches`.
    pub pieces: Vec<Piece>,
}

/// Groups `groups` by the worker serving each expert (its first endpoint).
pub fn by_worker(
    layer: u32,
    groups: &[ExpertAssignments],
    table: &RoutingTableView,
) -> Result<BTreeMap<Arc<str>, Vec<usize>>, ClientError> {
    let mut workers: BTreeMap<Arc<str>, Vec<usize>> = BTreeMap::new();
    for (index, group) in groups.iter().enumerate() {
        let endpoint = table
            .endpoints(layer, group.expert)
            .first()
            .ok_or(ClientError::Unplaced { version: table.version, expert: ExpertId::new(layer, group.expert) })?;
        workers.entry(endpoint.clone()).or_default().push(index);
    }
    Ok(workers)
}

/// What every request of one layer call shares.
#[derive(Debug, Clone, Copy)]
pub struct CallRows<'a> {
    pub layer: u32,
    /// The call's `[tokens, d_model]` input.
    pub hidden: &'a [f32],
    pub d_model: usize,
    pub dtype: WireDtype,
    /// Most payload bytes in one request.
    pub split_bytes: usize,
}

/// Packs one worker's groups into requests of at most `split_bytes` payload (at least one row each).
pub fn pack_requests(
    endpoint: &Arc<str>,
    group_indices: &[usize],
    groups: &[ExpertAssignments],
    call: CallRows<'_>,
) -> Vec<PlannedRequest> {
    let CallRows { layer, hidden, d_model, dtype, split_bytes } = call;
    let row_bytes = dtype.row_bytes(d_model);
    let rows_per_request = (split_bytes / row_bytes).max(1);
    let mut requests = Vec::new();
    let mut current = new_request(endpoint, dtype);
    let mut current_rows = 0;
    for &group_index in group_indices {
        let group = &groups[group_index];
        let group_rows = group.rows(d_model);
        let mut start = 0;
        while start < group_rows {
            if current_rows == rows_per_request {
                requests.push(std::mem::replace(&mut current, new_request(endpoint, dtype)));
                current_rows = 0;
            }
            let end = group_rows.min(start + rows_per_request - current_rows);
            let data = match &group.slots {
                Some(slots) => wire::encode_rows(&slots.inputs[start * d_model..end * d_model], d_model, dtype),
                None => gather_rows(hidden, d_model, &group.tokens[start..end], dtype),
            };
            current.request.batches.push(v1::ExpertRows {
                expert: Some(ExpertId::new(layer, group.expert).into()),
                rows: Some(v1::WireTensor {
                    dtype: dtype.to_proto() as i32,
                    shape: vec![(end - start) as u64, d_model as u64],
                    data,
                }),
            });
            current.pieces.push(Piece { group: group_index, start, end });
            current_rows += end - start;
            start = end;
        }
    }
    if !current.pieces.is_empty() {
        requests.push(current);
    }
    requests
}

fn new_request(endpoint: &Arc<str>, dtype: WireDtype) -> PlannedRequest {
    PlannedRequest {
        endpoint: endpoint.clone(),
        request: v1::ForwardRequest {
            request_id: 0,
            batches: Vec::new(),
            output_dtype: dtype.answer_dtype().to_proto() as i32,
            tokens: None,
        },
        pieces: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(expert: u32, tokens: usize) -> ExpertAssignments {
        ExpertAssignments { expert, tokens: (0..tokens as u32).collect(), weights: vec![1.0; tokens], slots: None }
    }

    #[test]
    fn small_payloads_travel_in_one_request_per_worker() {
        let groups = [group(0, 3), group(1, 2)];
        let hidden = vec![0.5; 3 * 4];
        let endpoint: Arc<str> = Arc::from("http://a");
        let call = CallRows { layer: 0, hidden: &hidden, d_model: 4, dtype: WireDtype::F32, split_bytes: 1 << 20 };
        let requests = pack_requests(&endpoint, &[0, 1], &groups, call);
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].request.batches.len(), 2);
        assert_eq!(requests[0].request.batches[0].rows.as_ref().map(|r| r.data.len()), Some(3 * 4 * 4));
    }

    #[test]
    fn large_payloads_split_by_whole_rows_and_cover_every_row_once() {
        let groups = [group(0, 5), group(1, 4)];
        let hidden = vec![0.5; 5 * 4];
        let endpoint: Arc<str> = Arc::from("http://a");
        // 16 bytes per row (4 x f32); 48 bytes per request = 3 rows.
        let call = CallRows { layer: 0, hidden: &hidden, d_model: 4, dtype: WireDtype::F32, split_bytes: 48 };
        let requests = pack_requests(&endpoint, &[0, 1], &groups, call);
        let pieces: Vec<Vec<Piece>> = requests.iter().map(|r| r.pieces.clone()).collect();
        assert_eq!(
            pieces,
            [
                vec![Piece { group: 0, start: 0, end: 3 }],
                vec![Piece { group: 0, start: 3, end: 5 }, Piece { group: 1, start: 0, end: 1 }],
                vec![Piece { group: 1, start: 1, end: 4 }],
            ]
        );
        assert!(requests.iter().all(|r| {
            r.request.batches.iter().map(|b| b.rows.as_ref().map_or(0, |t| t.data.len())).sum::<usize>() <= 48
        }));
    }
}
