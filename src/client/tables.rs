//! What the client prints: left-aligned tables with an upper-case header line, and
//! events as log lines.

use serde_json::Value;

/// Renders rows as a left-aligned table with a header line.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
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
