//! Real coordinator and worker processes on 127.0.0.1, one test binary for the suites that share
//! the machine with their neighbours (as eleven binaries, each linked alone, they took 20-21 s of
//! a build's CPU; as one, 8-10 s). Apart, each a binary of its own: `chaos.rs` and
//! `load_balancing.rs`, whose loads take the whole machine; `separate_hosts.rs`, whose tests run
//! one at a time, each checking that the process left no network namespace behind;
//! `mutual_tls.rs` and `separate_hosts_tls.rs`, which give the process a TLS identity;
//! `trace_export.rs`, which installs its global tracing subscriber.

mod bounded_memory;
mod checkpoints;
mod cli_reaching_a_cluster;
mod device_check;
mod forward_path;
mod insecure_cluster;
mod layout;
mod load_test_command;
mod measurement;
mod metrics_exposition;
mod routing_policies;
mod worker_cap;
