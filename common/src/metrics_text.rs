//! OpenMetrics text, as prometheus-client writes it, rewritten into Prometheus' classic text
//! format (version 0.0.4): what `promtool check metrics`, older scrapers and people with `curl`
//! read. The two differ only in how families are named and typed: a counter family `x` is
//! `x_total` in the classic format (OpenMetrics names only its samples so), an info family `x`
//! is a gauge `x_info`, and there are no `# UNIT` lines and no `# EOF`.

use std::fmt::Write as _;

/// The classic format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics' content type, for scrapers that ask for it (Prometheus does).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `openmetrics` in the classic text format.
pub fn from_openmetrics(openmetrics: &str) -> String {
    let mut classic = String::with_capacity(openmetrics.len());
    // prometheus-client writes a family's HELP line before its TYPE line; the name both carry
    // in the classic format depends on the type, so HELP waits for TYPE.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                "unknown" => (family.to_owned(), "untyped"),
                "stateset" => (family.to_owned(), "gauge"),
                "gaugehistogram" => (family.to_owned(), "histogram"),
                other => (family.to_owned(), other),
            };
            if let Some((_, text)) = help.take().filter(|(helped, _)| *helped == family) {
                let _ = writeln!(classic, "# HELP {name} {text}");
            }
            let _ = writeln!(classic, "# TYPE {name} {kind}");
        } else if line.starts_with('#') {
            // `# UNIT` and `# EOF` have no classic counterpart.
        } else {
            // A sample, less its exemplar (` # {labels} value`), which the classic format lacks.
            let sample = line.split_once(" # ").map_or(line, |(sample, _exemplar)| sample);
            classic.push_str(sample);
            classic.push('\n');
        }
    }
    classic
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::{Registry, Unit};

    use super::*;

    #[test]
    fn every_family_is_named_and_typed_as_the_classic_format_names_it() {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("demo");
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        requests.get_or_create(&vec![("code".into(), "OK".into())]).inc_by(3);
        sub.register("requests", "Requests \"served\", by code", requests);
        let queued = Gauge::<i64>::default();
        queued.set(7);
        sub.register("queued", "Rows waiting", queued);
        let latency = Histogram::new([0.1, 1.0]);
        latency.observe(0.5);
        sub.register_with_unit("latency", "Time per call", Unit::Seconds, latency);
        sub.register("build", "The build", Info::new(vec![("version", "1.2.3")]));
        let mut openmetrics = String::new();
        prometheus_client::encoding::text::encode(&mut openmetrics, &registry).expect("encodes");

        let classic = from_openmetrics(&openmetrics);
        let expected = [
            "# HELP demo_requests_total Requests \"served\", by code.",
            "# TYPE demo_requests_total counter",
            "demo_requests_total{code=\"OK\"} 3",
            "# HELP demo_queued Rows waiting.",
            "# TYPE demo_queued gauge",
            "demo_queued 7",
            "# HELP demo_latency_seconds Time per call.",
            "# TYPE demo_latency_seconds histogram",
            "demo_latency_seconds_sum 0.5",
            "demo_latency_seconds_count 1",
            "demo_latency_seconds_bucket{le=\"0.1\"} 0",
            "demo_latency_seconds_bucket{le=\"1.0\"} 1",
            "demo_latency_seconds_bucket{le=\"+Inf\"} 1",
            "# HELP demo_build_info The build.",
            "# TYPE demo_build_info gauge",
            "demo_build_info{version=\"1.2.3\"} 1",
        ];
        assert_eq!(classic.lines().collect::<Vec<_>>(), expected, "from:\n{openmetrics}");
    }

    #[test]
    fn exemplars_units_and_the_end_marker_are_left_out() {
        let openmetrics = "# HELP x_seconds Time.\n# TYPE x_seconds counter\n# UNIT x_seconds seconds\n\
                           x_seconds_total 2 # {trace_id=\"ab\"} 1.0\n# EOF\n";
        assert_eq!(
            from_openmetrics(openmetrics),
            "# HELP x_seconds_total Time.\n# TYPE x_seconds_total counter\nx_seconds_total 2\n"
        );
    }
}
