//! The readiness line: once a process listens, it prints one line on stdout,
//! `SWITCHYARD_READY grpc=127.0.0.1:PORT metrics=127.0.0.1:PORT`, so a parent that started it on
//! port 0 (`switchyard local`, the integration tests) learns its real ports without races.

use std::net::SocketAddr;

pub const READY_PREFIX: &str = "SWITCHYARD_READY";

/// Prints the readiness line on stdout and flushes it.
pub fn announce(grpc: SocketAddr, metrics: SocketAddr) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{READY_PREFIX} grpc={grpc} metrics={metrics}");
    let _ = stdout.flush();
}

/// The addresses announced by a readiness line, or `None` for any other line.
pub fn parse(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix(READY_PREFIX)?;
    let mut grpc = None;
    let mut metrics = None;
    for field in rest.split_whitespace() {
        if let Some(value) = field.strip_prefix("grpc=") {
            grpc = value.parse().ok();
        } else if let Some(value) = field.strip_prefix("metrics=") {
            metrics = value.parse().ok();
        }
    }
    Some((grpc?, metrics?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_announce_prints() {
        let line = format!("{READY_PREFIX} grpc=127.0.0.1:5000 metrics=127.0.0.1:5001\n");
        let (grpc, metrics) = parse(&line).expect("a readiness line");
        assert_eq!(grpc.port(), 5000);
        assert_eq!(metrics.port(), 5001);
        assert_eq!(parse("2026-11-23 INFO listening"), None);
        assert_eq!(parse("SWITCHYARD_READY grpc=nonsense metrics=127.0.0.1:1"), None);
    }
}
