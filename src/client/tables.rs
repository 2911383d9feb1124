//! What the client prints: left-aligned tables with an upper-case header line, and
//! events as log lines.

use comfy_table::{Table, presets};
use serde_json::Value;

/// Renders rows as a left-aligned table with an upper-case header line, columns two
/// spaces apart, no borders.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_header(headers.iter().map(|h| h.to_uppercase()))
        .add_rows(rows.iter().cloned());
    let last = headers.len().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
    }
    table.trim_fmt()
}

/// A JSON value as a table cell: strings bare, null as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One event as a log line.
pub fn event_line(e: &Value) -> String {
    format!(
        "{}  {:<22} {:<10} {}",
        cell(&e["at"]),
        cell(&e["kind"]),
        cell(&e["worker"]),
        cell(&e["message"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_show_null_as_dash() {
        let rows = vec![
            vec!["worker_1".into(), "alive".into()],
            vec!["w2".into(), cell(&Value::Null)],
        ];
        let t = table(&["name", "status"], &rows);
        assert_eq!(t, "NAME      STATUS\nworker_1  alive\nw2        -");
    }
}
