//! Forward messages encoded with their payload's bytes at the very end of the message.
//!
//! prost writes fields in their numbers' order, so a token-major request's small fields after its
//! rows (`offsets`, `experts`, `weights`: a few KiB) followed the multi-megabyte payload as a chunk
//! of their own ([`crate::zero_copy::encode_frame`]), and so does a streamed answer's `sequence`
//! after its `combined` sum. HTTP/2 sent that tail only once the payload had left the stream's send
//! buffer and the body's task had run again, and the reader cannot decode the message before the
//! tail is in: a trace of DeepEP's low-latency preset showed each request complete ~0.4 ms after
//! its payload, with both cores busy. Protobuf parsers accept fields in any order (the encoding
//! guide's rule), so the payload goes last instead: the same bytes and the same length, reordered,
//! and the message is whole when its payload is.

use bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint, message};
use prost::{DecodeError, Message};

use crate::v1::{ForwardRequest, ForwardResponse};

/// `ForwardRequest.tokens`, `TokenRows.rows` and `ForwardResponse.combined` (`expert_worker.proto`).
const TOKENS_FIELD: u32 = 4;
const ROWS_FIELD: u32 = 2;
const COMBINED_FIELD: u32 = 7;

/// A message that encodes with its payload last and decodes as the plain message does:
/// `PayloadLast(request)` sends a `ForwardRequest` with `tokens` last and `rows` last within it,
/// `PayloadLast(answer)` a `ForwardResponse` with `combined` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PayloadLast<M>(pub M);

/// How a message writes its fields with its payload last.
pub trait PayloadOrder: Message {
    fn encode_payload_last(&self, buf: &mut impl BufMut);
}

impl PayloadOrder for ForwardRequest {
    fn encode_payload_last(&self, buf: &mut impl BufMut) {
        let Some(tokens) = &self.tokens else {
            self.encode_raw(buf);
            return;
        };
        // Clones share the payloads (`Bytes`): only the small fields' containers are copied.
        ForwardRequest { tokens: None, ..self.clone() }.encode_raw(buf);
        let rest = crate::v1::TokenRows { rows: None, ..tokens.clone() };
        let rows_length = tokens.rows.as_ref().map_or(0, |rows| message::encoded_len(ROWS_FIELD, rows));
        encode_key(TOKENS_FIELD, WireType::LengthDelimited, buf);
        encode_varint((rest.encoded_len() + rows_length) as u64, buf);
        rest.encode_raw(buf);
        if let Some(rows) = &tokens.rows {
            message::encode(ROWS_FIELD, rows, buf);
        }
    }
}

impl PayloadOrder for ForwardResponse {
    fn encode_payload_last(&self, buf: &mut impl BufMut) {
        let Some(combined) = &self.combined else {
            self.encode_raw(buf);
            return;
        };
        ForwardResponse { combined: None, ..self.clone() }.encode_raw(buf);
        message::encode(COMBINED_FIELD, combined, buf);
    }
}

impl<M: PayloadOrder> Message for PayloadLast<M> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.0.encode_payload_last(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        context: DecodeContext,
    ) -> Result<(), DecodeError> {
        self.0.merge_field(tag, wire_type, buf, context)
    }

    fn encoded_len(&self) -> usize {
        self.0.encoded_len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::v1;
    use crate::zero_copy::encode_frame;

    fn token_major(payload: Bytes, sequence: u32) -> ForwardRequest {
        ForwardRequest {
            request_id: 9,
            output_dtype: 2,
            sequence,
            tokens: Some(v1::TokenRows {
                layer: 3,
                rows: Some(v1::WireTensor { dtype: 3, shape: vec![4, payload.len() as u64 / 8], data: payload }),
                offsets: Bytes::from(vec![1; 20]),
                experts: Bytes::from(vec![2; 5000]),
                weights: Bytes::from(vec![3; 5000]),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_reordered_message_is_the_same_message_of_the_same_length() {
        for sequence in [0, 7] {
            let message = token_major(Bytes::from((0..64 * 1024).map(|i| i as u8).collect::<Vec<_>>()), sequence);
            let reordered = PayloadLast(message.clone()).encode_to_vec();
            assert_eq!(reordered.len(), message.encoded_len());
            assert_eq!(PayloadLast(message.clone()).encoded_len(), reordered.len(), "what encoders reserve");
            assert_ne!(reordered, message.encode_to_vec(), "the fields moved");
            assert_eq!(ForwardRequest::decode(reordered.as_slice()).expect("decodes"), message);
            let mut decoded = PayloadLast::<ForwardRequest>::decode(reordered.as_slice()).expect("decodes");
            assert_eq!(decoded, PayloadLast(message));
            decoded.clear();
            assert_eq!(decoded.0, ForwardRequest::default());
        }
    }

    #[test]
    fn the_frame_ends_with_the_payload_itself() {
        let payload = Bytes::from(vec![5u8; 64 * 1024]);
        let chunks = encode_frame(&PayloadLast(token_major(payload.clone(), 1))).expect("encodes");
        let last = chunks.last().expect("chunks");
        assert_eq!((last.as_ptr(), last.len()), (payload.as_ptr(), payload.len()), "nothing after the rows");
        // With prost's order the small fields trail it.
        let plain = encode_frame(&token_major(payload.clone(), 1)).expect("encodes");
        assert_ne!(plain.last().expect("chunks").as_ptr(), payload.as_ptr());
    }

    #[test]
    fn a_request_without_token_rows_encodes_as_prost_does() {
        let message = ForwardRequest {
            request_id: 4,
            batches: vec![v1::ExpertRows::default()],
            tokens: Some(v1::TokenRows { layer: 1, ..Default::default() }),
            ..Default::default()
        };
        let without_tokens = ForwardRequest { tokens: None, ..message.clone() };
        assert_eq!(PayloadLast(without_tokens.clone()).encode_to_vec(), without_tokens.encode_to_vec());
        let reordered = PayloadLast(message.clone()).encode_to_vec();
        assert_eq!(ForwardRequest::decode(reordered.as_slice()).expect("decodes"), message);
    }

    #[test]
    fn a_streamed_answer_ends_with_its_sum() {
        let payload = Bytes::from(vec![6u8; 64 * 1024]);
        let answer = ForwardResponse {
            request_id: 3,
            worker_us: 120,
            sequence: 5,
            combined: Some(v1::WireTensor { dtype: 3, shape: vec![4, 8192], data: payload.clone() }),
            ..Default::default()
        };
        let reordered = PayloadLast(answer.clone()).encode_to_vec();
        assert_eq!(reordered.len(), answer.encoded_len());
        assert_eq!(ForwardResponse::decode(reordered.as_slice()).expect("decodes"), answer);
        let chunks = encode_frame(&PayloadLast(answer.clone())).expect("encodes");
        let last = chunks.last().expect("chunks");
        assert_eq!((last.as_ptr(), last.len()), (payload.as_ptr(), payload.len()), "nothing after the sum");
        let without = ForwardResponse { combined: None, ..answer };
        assert_eq!(PayloadLast(without.clone()).encode_to_vec(), without.encode_to_vec());
    }
}
