//! The configuration reference (`docs/reference/configuration.md`) is generated from
//! `orion.example.toml`, so the two cannot disagree: the example holds every field, its
//! default and why it is there, once; the reference shows them as tables, one per
//! section. A test regenerates the tables and fails when the committed reference differs;
//! `ORION_UPDATE_DOCS=1` makes it write them instead:
//!
//! ```sh
//! ORION_UPDATE_DOCS=1 cargo nextest run -E 'test(configuration_reference)'
//! ```

/// Where the generated tables start and end in the reference; the text around them is
/// written by hand.
const BEGIN: &str =
    "<!-- generated from orion.example.toml: do not edit, see src/config/reference.rs -->";
const END: &str = "<!-- end of the generated part -->";

/// The reference, from the example's text: its header a paragraph, each section a table, each field
/// a row with its example value and the comment above it. A field written commented out
/// (`# instance = "orion-1"`) is unset by default; the value shown is an example. Fields
/// sharing one comment (the comment above the first) say so.
fn render(example: &str) -> String {
    let mut out = String::from("\n");
    let mut comment: Vec<&str> = Vec::new();
    let mut lines = example.lines().peekable();
    // The file's own header, up to the first blank line, is about the whole file: a
    // paragraph of its own, its indented lines (examples) as code.
    let mut header = Vec::new();
    while let Some(line) = lines.next_if(|l| !l.trim().is_empty()) {
        let text = line.trim_start_matches('#');
        header.push(match text.strip_prefix("   ") {
            Some(code) => format!("`{}`", code.trim()),
            None => text.trim().to_owned(),
        });
    }
    out.push_str(&header.join(" "));
    out.push('\n');
    let mut section = "top level".to_owned();
    let mut open = false;
    for line in lines {
        let line = line.trim();
        if line.is_empty() {
            comment.clear();
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("`[{name}]`");
            open = false;
            comment.clear();
        } else if let Some((key, value, set)) = field(line) {
            if !open {
                out.push_str(&format!(
                    "\n### {section}\n\n| field | in the example | what it is for |\n|---|---|---|\n"
                ));
                open = true;
            }
            let value = if set {
                format!("`{value}`")
            } else {
                format!("unset (e.g. `{value}`)")
            };
            let what = if comment.is_empty() {
                "as the field above".to_owned()
            } else {
                comment.join(" ")
            };
            out.push_str(&format!(
                "| `{key}` | {} | {} |\n",
                cell(&value),
                cell(&what)
            ));
            comment.clear();
        } else if let Some(text) = line.strip_prefix('#') {
            comment.push(text.trim());
        }
    }
    out
}

/// `key = value` (set) or `# key = value` (unset by default, shown as an example).
fn field(line: &str) -> Option<(&str, &str, bool)> {
    let (set, line) = match line.strip_prefix('#') {
        Some(rest) => (false, rest.trim_start()),
        None => (true, line),
    };
    let (key, value) = line.split_once(" = ")?;
    let is_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    is_key.then_some((key, value.trim(), set))
}

/// Text made safe for a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = env!("CARGO_MANIFEST_DIR");

    #[test]
    fn the_configuration_reference_is_generated_from_the_example() {
        let example = std::fs::read_to_string(format!("{ROOT}/orion.example.toml")).unwrap();
        let path = format!("{ROOT}/docs/reference/configuration.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let (before, rest) = doc
            .split_once(BEGIN)
            .unwrap_or_else(|| panic!("{path} lacks the line {BEGIN}"));
        let (generated, after) = rest
            .split_once(END)
            .unwrap_or_else(|| panic!("{path} lacks the line {END}"));
        let tables = render(&example);
        if generated.trim() == tables.trim() {
            return;
        }
        if std::env::var_os("ORION_UPDATE_DOCS").is_some() {
            std::fs::write(&path, format!("{before}{BEGIN}\n{tables}\n{END}{after}")).unwrap();
            return;
        }
        panic!(
            "{path} does not show orion.example.toml as it is: regenerate it with \
             ORION_UPDATE_DOCS=1 cargo nextest run -E 'test(configuration_reference)'"
        );
    }

    #[test]
    fn every_field_of_the_example_has_a_row_and_commented_ones_read_as_unset() {
        let example = "# header\n\n# The address.\nlisten = \"x\"\n\n[a]\n# Why b.\n# More.\nb = 1\nc = 2\n# d = \"e\"\n# A sentence = not a field\nf = 3\n";
        let tables = render(example);
        for row in [
            "header\n",
            "### top level",
            "| `listen` | `\"x\"` | The address. |",
            "### `[a]`",
            "| `b` | `1` | Why b. More. |",
            "| `c` | `2` | as the field above |",
            "| `d` | unset (e.g. `\"e\"`) | as the field above |",
            "| `f` | `3` | A sentence = not a field |",
        ] {
            assert!(tables.contains(row), "{row} is not in {tables}");
        }
    }
}
