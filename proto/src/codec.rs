//! The gRPC codec of every `switchyard.v1` service: prost's, except that a message's buffer is
//! reserved at its encoded size before encoding.
//!
//! Tonic grows its encode buffer from 8 KiB as prost writes into it, so a 58 MB batch was copied
//! a dozen times over while the buffer doubled, each time into freshly mapped memory (a page
//! fault per 4 KiB). Reserved up front, the payload is copied into the frame buffer once. Decoding
//! is prost's: tonic reserves a message's length from its header, and `bytes` fields are slices
//! of that buffer.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstCodec;

/// [`ProstCodec`] with [`SizedEncoder`].
#[derive(Debug, Clone, Copy)]
pub struct SizedCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for SizedCodec<T, U> {
    fn default() -> Self {
        Self { _messages: PhantomData }
    }
}

impl<T, U> Codec for SizedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder { _message: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
    }
}

/// Encodes a message into a buffer reserved at its encoded length.
#[derive(Debug, Clone, Copy)]
pub struct SizedEncoder<T> {
    _message: PhantomData<T>,
}

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf).map_err(|error| Status::internal(format!("encoding a message: {error}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
