//! What the client prints: left-aligned tables with an upper-case header line, and
//! events as log lines.

use comfy_table::{Table, presets};
use serde::Serialize;
use serde_json::Value;

use crate::store::Event;

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

/// A value as a table cell, written as in the API's JSON (so a table and `--json` agree
/// on numbers and dates): strings bare, `None` as `-`.
pub fn cell<T: Serialize + ?Sized>(v: &T) -> String {
    match serde_json::to_value(v).expect("a cell serialises") {
        Value::Null => "-".to_owned(),
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// One event as a log line.
pub fn event_line(e: &Event) -> String {
    format!(
        "{}  {:<22} {:<10} {}",
        cell(&e.at),
        e.kind,
        cell(&e.worker),
        e.message
    )
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::model::WorkerStatus;

    #[test]
    fn tables_align_columns_and_show_none_as_dash() {
        let rows = vec![
            vec!["worker_1".into(), cell(&WorkerStatus::Alive)],
            vec!["w2".into(), cell(&None::<WorkerStatus>)],
        ];
        let t = table(&["name", "status"], &rows);
        assert_eq!(t, "NAME      STATUS\nworker_1  alive\nw2        -");
    }

    #[test]
    fn cells_read_as_the_json_does() {
        let at = Utc.with_ymd_and_hms(2025, 3, 1, 12, 30, 5).unwrap();
        assert_eq!(cell(&at), "2025-03-01T12:30:05Z");
        let micros = at + chrono::Duration::microseconds(250);
        assert_eq!(cell(&Some(micros)), "2025-03-01T12:30:05.000250Z");
        assert_eq!(cell(&Some(22_u16)), "22");
        assert_eq!(cell(&false), "false");
        assert_eq!(cell("vic"), "vic");
    }

    #[test]
    fn an_event_is_one_aligned_line() {
        let e = Event {
            id: 7,
            at: Utc.with_ymd_and_hms(2025, 3, 1, 12, 30, 5).unwrap(),
            kind: "worker.drained".into(),
            worker: None,
            rental_id: None,
            message: "drained by the admin".into(),
        };
        assert_eq!(
            event_line(&e),
            "2025-03-01T12:30:05Z  worker.drained         -          drained by the admin"
        );
    }
}
