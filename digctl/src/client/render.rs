//! Output for people: sizes, durations, times, tables, job summaries, and a
//! progress [`Meter`] that is a bar on a terminal and log lines elsewhere
//! (the house style of `crate::progress`).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dig_common::job::JobState;
use indicatif::{ProgressBar, ProgressStyle};

use super::http::JobView;

/// The API's name of a state (`queued`, `running`, ...).
pub fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// `512 B`, `1.5 KiB`, `3.2 MiB`, ...
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `42s`, `3m 05s`, `2h 03m`, `1d 04h`: two units at most, rounded to the
/// second; negative or non-finite input reads `?`.
pub fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `done / total (pct%)`, with one decimal.
pub fn fraction(done: u64, total: u64) -> String {
    if total == 0 {
        return format!("{done} / {total}");
    }
    format!(
        "{done} / {total} ({:.1}%)",
        100.0 * done as f64 / total as f64
    )
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian).
pub fn format_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Left-aligned columns separated by two spaces, a header row first, no
/// trailing spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            out.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.trim_end().to_string()
    };
    let mut out = line(&mut headers.iter().copied());
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// The human summary of `digctl status`.
pub fn job_summary(v: &JobView) -> String {
    let mut lines = vec![
        format!("job       {}", v.id),
        format!("state     {}", state_name(v.state)),
        format!("samples   {}", fraction(v.samples_done, v.num_samples)),
        format!(
            "shards    {} done, {} failed, {} total",
            v.shards.done, v.shards.failed, v.shards.total
        ),
    ];
    if let Some(rate) = v.samples_per_sec {
        lines.push(format!("rate      {rate:.2} samples/s"));
    }
    if let Some(eta) = v.eta_seconds.filter(|_| !v.state.is_final()) {
        lines.push(format!("eta       {}", human_duration(eta)));
    }
    for (label, t) in [
        ("created ", v.created_at),
        ("started ", v.started_at),
        ("finished", v.finished_at),
    ] {
        if let Some(t) = t {
            lines.push(format!("{label}  {}", format_unix(t)));
        }
    }
    if let Some(took) = run_time(v) {
        lines.push(format!("took      {}", human_duration(took)));
    }
    if let Some(e) = &v.error {
        lines.push(format!("error     {e}"));
    }
    if let Some(w) = &v.webhook {
        let attempts = if w.attempts == 1 {
            "attempt"
        } else {
            "attempts"
        };
        let mut line = format!(
            "webhook   {} ({} {attempts}) {}",
            w.state, w.attempts, w.url
        );
        if let Some(e) = w.last_error.as_ref().filter(|_| w.state != "delivered") {
            line.push_str(&format!(": {e}"));
        }
        lines.push(line);
    }
    lines.join("\n")
}

/// Seconds from start (or creation) to the end of a finished job.
pub fn run_time(v: &JobView) -> Option<f64> {
    let end = v.finished_at?;
    let start = v.started_at.or(v.created_at)?;
    Some(end.saturating_sub(start) as f64)
}

/// One line of `digctl wait`'s bar: state, shards, rate, ETA.
pub fn progress_message(v: &JobView) -> String {
    let mut msg = format!(
        "{} shards {}/{}",
        state_name(v.state),
        v.shards.done,
        v.shards.total
    );
    if v.shards.failed > 0 {
        msg.push_str(&format!(" ({} failed)", v.shards.failed));
    }
    if let Some(rate) = v.samples_per_sec {
        msg.push_str(&format!(" {rate:.1}/s"));
    }
    if let Some(eta) = v.eta_seconds.filter(|_| !v.state.is_final()) {
        msg.push_str(&format!(" eta {}", human_duration(eta)));
    }
    msg
}

// ---------------------------------------------------------------- progress

/// What a [`Meter`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Samples,
}

impl Unit {
    fn show(self, n: u64) -> String {
        match self {
            Unit::Bytes => human_bytes(n),
            Unit::Samples => n.to_string(),
        }
    }
}

struct Counts {
    total: Option<u64>,
    done: u64,
    next_log: u64,
    last_log: Instant,
}

/// Progress on stderr: an indicatif bar on a terminal; elsewhere an info
/// line at every 10 % (when the total is known), at most one a second, so
/// quick transfers stay quiet. Shared by concurrent downloads, so
/// everything takes `&self`.
pub struct Meter {
    bar: Option<ProgressBar>,
    label: String,
    unit: Unit,
    counts: Mutex<Counts>,
    started: Instant,
}

impl Meter {
    pub fn new(total: Option<u64>, unit: Unit, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = match (unit, total) {
                (Unit::Bytes, Some(_)) => {
                    "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}"
                }
                (Unit::Bytes, None) => "{spinner} {msg} {binary_bytes} {binary_bytes_per_sec} {elapsed_precise}",
                (Unit::Samples, _) => "[{bar:40}] {pos}/{len} {percent:>3}% {elapsed_precise} {msg}",
            };
            let bar = ProgressBar::new(total.unwrap_or(0));
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            if total.is_none() {
                bar.enable_steady_tick(Duration::from_millis(200));
            }
            bar
        });
        Meter {
            bar,
            label: label.into(),
            unit,
            counts: Mutex::new(Counts {
                total,
                done: 0,
                next_log: next_mark(0, total.unwrap_or(0)),
                last_log: Instant::now(),
            }),
            started: Instant::now(),
        }
    }

    /// Whether a bar is shown (stderr is a terminal).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    pub fn set_message(&self, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        }
    }

    pub fn set_total(&self, total: u64) {
        let mut c = self.counts.lock().expect("meter lock");
        if c.total != Some(total) {
            c.total = Some(total);
            c.next_log = next_mark(c.done, total);
            if let Some(bar) = &self.bar {
                bar.set_length(total);
            }
        }
    }

    pub fn inc(&self, n: u64) {
        let done = self.counts.lock().expect("meter lock").done + n;
        self.set_position(done);
    }

    pub fn set_position(&self, done: u64) {
        let mut c = self.counts.lock().expect("meter lock");
        c.done = done;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let Some(total) = c.total.filter(|t| *t > 0) else {
            return;
        };
        if done >= c.next_log && done < total && c.last_log.elapsed() >= LOG_GAP {
            tracing::info!(
                "{}: {}% ({} of {}, {})",
                self.label,
                100 * done / total,
                self.unit.show(done),
                self.unit.show(total),
                human_duration(self.started.elapsed().as_secs_f64())
            );
            c.next_log = next_mark(done, total);
            c.last_log = Instant::now();
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The least time between two log lines of a [`Meter`].
const LOG_GAP: Duration = Duration::from_secs(1);

/// The next multiple of a tenth of `total` above `done`.
fn next_mark(done: u64, total: u64) -> u64 {
    let step = (total / 10).max(1);
    (done / step + 1) * step
}

#[cfg(test)]
mod tests {
    use super::*;
    use dig_common::job::JobId;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(3 * (1 << 30) + (1 << 29)), "3.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations_read_in_two_units() {
        assert_eq!(human_duration(0.0), "0s");
        assert_eq!(human_duration(42.4), "42s");
        assert_eq!(human_duration(59.6), "1m 00s");
        assert_eq!(human_duration(185.0), "3m 05s");
        assert_eq!(human_duration(7380.0), "2h 03m");
        assert_eq!(human_duration(86_400.0 + 4.0 * 3600.0 + 59.0), "1d 04h");
        assert_eq!(human_duration(-1.0), "?");
        assert_eq!(human_duration(f64::NAN), "?");
        assert_eq!(human_duration(f64::INFINITY), "?");
    }

    #[test]
    fn unix_times_are_utc_dates() {
        assert_eq!(format_unix(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_unix(4_107_542_399), "2100-02-28 23:59:59 UTC");
    }

    #[test]
    fn fractions_show_a_percentage() {
        assert_eq!(fraction(1200, 5000), "1200 / 5000 (24.0%)");
        assert_eq!(fraction(0, 0), "0 / 0");
        assert_eq!(fraction(1, 3), "1 / 3 (33.3%)");
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["a".to_string(), "running".to_string(), "1".to_string()],
            vec!["bbbb".to_string(), "queued".to_string(), "".to_string()],
        ];
        assert_eq!(
            table(&["ID", "STATE", "N"], &rows),
            "ID    STATE    N\na     running  1\nbbbb  queued\n"
        );
    }

    fn view(state: JobState) -> JobView {
        JobView {
            id: JobId::new(),
            state,
            num_samples: 5000,
            samples_done: 1200,
            shards: super::super::http::ShardCounts {
                done: 3,
                failed: 1,
                total: 10,
            },
            error: None,
            created_at: Some(1_700_000_000),
            started_at: Some(1_700_000_010),
            finished_at: None,
            samples_per_sec: Some(12.345),
            eta_seconds: Some(309.0),
            webhook: None,
        }
    }

    #[test]
    fn summaries_show_progress_rate_and_eta() {
        let v = view(JobState::Running);
        let s = job_summary(&v);
        assert!(s.contains("state     running"), "{s}");
        assert!(s.contains("samples   1200 / 5000 (24.0%)"), "{s}");
        assert!(s.contains("shards    3 done, 1 failed, 10 total"), "{s}");
        assert!(s.contains("rate      12.35 samples/s"), "{s}");
        assert!(s.contains("eta       5m 09s"), "{s}");
        assert!(s.contains("created   2023-11-14 22:13:20 UTC"), "{s}");
        assert!(!s.contains("error"), "{s}");
        assert_eq!(
            progress_message(&v),
            "running shards 3/10 (1 failed) 12.3/s eta 5m 09s"
        );

        let mut v = view(JobState::Failed);
        v.finished_at = Some(1_700_000_100);
        v.error = Some("shard 3: out of memory".into());
        let s = job_summary(&v);
        assert!(s.contains("error     shard 3: out of memory"), "{s}");
        assert!(s.contains("took      1m 30s"), "{s}");
        assert!(!s.contains("eta"), "{s}");
        assert!(!s.contains("webhook"), "{s}");

        v.webhook = Some(super::super::http::WebhookView {
            url: "https://lab.example.org/h".into(),
            state: "pending".into(),
            attempts: 1,
            last_error: Some("HTTP 500 Internal Server Error".into()),
        });
        let s = job_summary(&v);
        assert!(
            s.contains("webhook   pending (1 attempt) https://lab.example.org/h: HTTP 500"),
            "{s}"
        );
    }

    #[test]
    fn log_marks_step_by_a_tenth() {
        assert_eq!(next_mark(0, 100), 10);
        assert_eq!(next_mark(10, 100), 20);
        assert_eq!(next_mark(35, 100), 40);
        assert_eq!(next_mark(0, 5), 1);
        assert_eq!(next_mark(0, 0), 1);
    }
}
