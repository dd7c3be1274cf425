//! The client's pipeline over real in-process workers, no processes: one test binary, one module
//! per subject (as eight binaries, each with its own link and its own copy of the async stack's
//! code, they took 48 s of a build's CPU; as one, 18 s). `runtime_responsiveness.rs` stays a
//! binary of its own, so that no other test runs beside it while it times its ticker.

mod call_books;
mod client_throttling;
mod hf_fixtures;
mod hostile_answers;
mod hostile_tables;
mod in_process_exchange;
mod reference_config;
mod refusal_next_best;
mod replica_retries;
mod support;
