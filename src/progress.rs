//! Progress bars for long work run from a terminal (`orion check`, the benchmarks).
//! They draw on stderr only when it is a terminal, so scripts and CI logs stay clean.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting to `len`, labelled `what`; hidden when stderr is not a terminal.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:<18} [{bar:32}] {pos}/{len} {elapsed}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}
