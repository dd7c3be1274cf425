//! What the fuzz targets of every crate feed their decoders of outside input: valid seeds with a
//! few bytes changed, inserted or cut, or plain random bytes (feature `fuzzing`).

use proptest::prelude::*;

/// `seed` with up to eight edits: a byte overwritten, a byte inserted, or the rest cut off.
pub fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = seed.len().max(1);
    prop::collection::vec((0..len, any::<u8>(), 0u8..4), 1..8).prop_map(move |edits| {
        let mut bytes = seed.clone();
        for (at, value, kind) in edits {
            let at = at.min(bytes.len());
            match kind {
                0 | 1 if at < bytes.len() => bytes[at] ^= value | 1,
                2 => bytes.insert(at, value),
                3 => bytes.truncate(at),
                _ => {}
            }
        }
        bytes
    })
}

/// Up to 512 random bytes.
pub fn random_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}
