//! Load reports as CSV: one column per scalar figure of [`LoadSummary`], in its declared order, one
//! row per report. Lists and maps (errors by code, loads, the ledger) are in the JSON only.

use crate::loadtest::LoadSummary;

/// A header, then one row per summary.
pub fn load_reports(summaries: &[LoadSummary]) -> String {
    let objects: Vec<serde_json::Map<String, serde_json::Value>> = summaries
        .iter()
        .filter_map(|summary| match serde_json::to_value(summary) {
            Ok(serde_json::Value::Object(object)) => Some(object),
            _ => None,
        })
        .collect();
    let Some(first) = objects.first() else { return String::new() };
    let columns: Vec<&String> = first.iter().filter(|(_, value)| is_scalar(value)).map(|(name, _)| name).collect();
    let mut csv = columns.iter().map(|name| name.as_str()).collect::<Vec<_>>().join(",") + "\n";
    for object in &objects {
        let cells: Vec<String> = columns.iter().map(|name| cell(&object[name.as_str()])).collect();
        csv.push_str(&cells.join(","));
        csv.push('\n');
    }
    csv
}

fn is_scalar(value: &serde_json::Value) -> bool {
    !matches!(value, serde_json::Value::Array(_) | serde_json::Value::Object(_))
}

fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => format!("\"{}\"", text.replace('"', "\"\"")),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}
