//! Output: tables and text for people, JSON for scripts, both on stdout.
//! Logs and progress go to stderr (see [`crate::telemetry`]).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use comfy_table::{Cell, CellAlignment, ContentArrangement, Table, presets};
use serde::Serialize;

/// Set once a JSON document went to stdout, so that a failure after it does
/// not print a second one.
static JSON_PRINTED: AtomicBool = AtomicBool::new(false);

/// Whether a JSON document was printed.
pub fn json_printed() -> bool {
    JSON_PRINTED.load(Ordering::SeqCst)
}

/// Where a command's result goes.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// JSON instead of tables.
    pub json: bool,
    /// No progress on stderr.
    pub quiet: bool,
}

impl Output {
    /// Prints `value` as pretty JSON on stdout.
    pub fn json<T: Serialize + ?Sized>(&self, value: &T) {
        let text = serde_json::to_string_pretty(value)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialize the result: {e}\"}}"));
        print_stdout(&text);
        JSON_PRINTED.store(true, Ordering::SeqCst);
    }

    /// Prints text for people on stdout.
    pub fn text(&self, text: &str) {
        print_stdout(text);
    }
}

/// Writes a line to stdout, ignoring a closed pipe (`tandem stats | head`).
pub fn print_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// A table with a header; columns after the first are right-aligned when
/// `numeric` says so.
pub fn table(header: &[&str], numeric: &[bool], rows: Vec<Vec<String>>) -> String {
    build(Some(header), numeric, rows)
}

fn build(header: Option<&[&str]>, numeric: &[bool], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled);
    if let Some(header) = header {
        t.set_header(header.iter().map(Cell::new));
    }
    for row in rows {
        t.add_row(row.into_iter().enumerate().map(|(i, v)| {
            let cell = Cell::new(v);
            if numeric.get(i).copied().unwrap_or(false) {
                cell.set_alignment(CellAlignment::Right)
            } else {
                cell
            }
        }));
    }
    t.to_string()
}

/// A two-column key/value table.
pub fn kv_table(rows: Vec<(&str, String)>) -> String {
    build(
        None,
        &[false, true],
        rows.into_iter()
            .map(|(k, v)| vec![k.to_owned(), v])
            .collect(),
    )
}

/// A count with thousands separators: 12345 → "12,345".
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate, rounded: "4,321".
pub fn rate(n: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    count((n as f64 / secs).round() as u64)
}

/// `text` cut to `max` characters with an ellipsis.
pub fn truncate(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r', '\t'], " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut s: String = one_line.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_get_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(rate(1000, 0.5), "2,000");
    }

    #[test]
    fn truncate_cuts_on_characters() {
        assert_eq!(truncate("héllo wörld", 5), "héll…");
        assert_eq!(truncate("a\nb", 10), "a b");
    }

    #[test]
    fn tables_hold_every_cell() {
        let t = table(
            &["scope", "rows"],
            &[false, true],
            vec![vec!["books".into(), "12".into()]],
        );
        assert!(
            t.contains("scope") && t.contains("books") && t.contains("12"),
            "{t}"
        );
        let kv = kv_table(vec![("orphans", "0".into())]);
        assert!(kv.contains("orphans") && kv.contains('0'), "{kv}");
    }
}
