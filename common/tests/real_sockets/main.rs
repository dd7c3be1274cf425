//! The transport over real sockets on 127.0.0.1: one test binary, one module per subject (as
//! three binaries, each linked alone with its own copy of the async stack's code, they took
//! 40-45 s of a build's CPU; as one, 22-23 s). `freed_buffers.rs` stays apart: it sets the whole
//! process's allocator before any thread starts.

mod connection_limits;
mod h2_channel;
mod mutual_tls;
