//! Shared output helpers: times, sizes and progress indicators.
//!
//! Progress goes to stderr and only on a terminal (indicatif hides it
//! elsewhere), so piped and `--json` output stays clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use session2::Timestamp;

/// `2026-11-26 00:29:11Z`, or the raw milliseconds if out of range.
pub(crate) fn format_time(at: Timestamp) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at.as_millis()) * 1_000_000)
        .ok()
        .and_then(|at| at.format(&format).ok())
        .unwrap_or_else(|| format!("@{}ms", at.as_millis()))
}

/// Bytes in human units.
pub(crate) fn size_text(bytes: usize) -> String {
    match bytes {
        0..1_024 => format!("{bytes} B"),
        1_024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1_024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// A bar with rate and ETA for `total` items.
pub(crate) fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// A spinner for work of unknown length.
pub(crate) fn progress_spinner(what: &str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(what.to_owned());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(
            format_time(Timestamp::from_millis(0)),
            "1970-01-01 00:00:00Z"
        );
        assert_eq!(
            format_time(Timestamp::from_millis(1_764_115_200_000)),
            "2025-11-26 00:00:00Z"
        );
        assert_eq!(size_text(12), "12 B");
        assert_eq!(size_text(2_048), "2.0 KiB");
        assert_eq!(size_text(3 * 1_048_576), "3.0 MiB");
    }
}
