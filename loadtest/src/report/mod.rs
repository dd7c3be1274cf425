//! A load test's figures as its reports print them: [`text`] on the terminal, [`csv`] as rows (JSON
//! is the summary itself, through serde). The bench's Markdown and charts live in `switchyard-tools`.

pub mod csv;
pub mod text;

use switchyard_router_client::ledger::LedgerRow;

/// One ledger row's figures as every renderer prints them; the formats differ in layout only.
pub struct LedgerCells {
    /// `layer L → worker`.
    pub pair: String,
    pub rows: String,
    /// `(kind, sent, received)` for payload, message and socket bytes per call.
    pub bytes: [(&'static str, u64, u64); 3],
    /// `(step, microseconds per call)` in the order of a request's trip, then the whole RPC.
    pub micros: [(&'static str, String); 8],
    /// `S of C calls (by M µs)`: how often this worker was the one the call waited for.
    pub straggler: String,
}

impl LedgerCells {
    pub fn of(row: &LedgerRow) -> Self {
        let mean = &row.means;
        let us = |value: f64| format!("{value:.0}");
        Self {
            pair: format!("layer {} → {}", row.layer, row.worker),
            rows: format!("{:.0}", mean.rows),
            bytes: [
                ("payload", mean.payload_sent, mean.payload_received),
                ("message", mean.message_sent, mean.message_received),
                ("socket", mean.socket_sent, mean.socket_received),
            ],
            micros: [
                ("encode", us(mean.encode_us)),
                ("dispatch", us(mean.dispatch_us)),
                ("queue", us(mean.queue_wait_us)),
                ("compute", us(mean.compute_us)),
                ("combine-transfer", us(mean.combine_transfer_us)),
                ("decode", us(mean.decode_us)),
                ("combine", us(mean.combine_us)),
                ("rpc", us(mean.rpc_us)),
            ],
            straggler: format!(
                "{} of {} calls (by {:.0} µs)",
                row.straggler_calls, row.calls, mean.straggler_margin_us
            ),
        }
    }
}
