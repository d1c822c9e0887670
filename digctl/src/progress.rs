//! Progress reporting: a bar on a terminal, plain log lines otherwise (so
//! batch logs stay readable), and the logging set-up.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// Logs to stderr, filtered by `DIG_LOG` (default `info`): for a person on
/// a terminal, one JSON object per line elsewhere (log collectors), with
/// the fields of the spans an event is in (a worker's shard lines carry
/// `"span": {"job": ..., "shard": ...}`). `DIG_LOG_FORMAT=json|text` chooses
/// the format regardless of the terminal.
pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DIG_LOG").unwrap_or_else(|_| "info".into());
    let terminal = std::io::stderr().is_terminal();
    let (json, unknown) = log_format(std::env::var("DIG_LOG_FORMAT").ok().as_deref(), terminal);
    if json {
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(terminal)
            .with_target(false)
            .init();
    }
    if let Some(value) = unknown {
        tracing::warn!("DIG_LOG_FORMAT={value:?} is neither json nor text; ignored");
    }
}

/// Whether to log JSON, given `DIG_LOG_FORMAT` and whether stderr is a
/// terminal; and the variable's value when it is not one we know.
fn log_format(var: Option<&str>, terminal: bool) -> (bool, Option<String>) {
    match var.map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("json") => (true, None),
        Some(v) if v.eq_ignore_ascii_case("text") => (false, None),
        None | Some("") => (!terminal, None),
        Some(other) => (!terminal, Some(other.to_string())),
    }
}

/// Counts work units (sample-steps) and shows them.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    next_log: u64,
    started: Instant,
    label: String,
}

impl Progress {
    pub fn new(total: u64, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        Progress {
            bar,
            total,
            done: 0,
            next_log: total / 10,
            started: Instant::now(),
            label: label.into(),
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.done >= self.next_log && self.done < self.total => {
                let pct = 100 * self.done / self.total.max(1);
                tracing::info!(
                    "{}: {pct}% ({:.0} s)",
                    self.label,
                    self.started.elapsed().as_secs_f64()
                );
                self.next_log += (self.total / 10).max(1);
            }
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_format;

    #[test]
    fn json_off_a_terminal_unless_told_otherwise() {
        assert_eq!(log_format(None, false), (true, None));
        assert_eq!(log_format(None, true), (false, None));
        assert_eq!(log_format(Some("json"), true), (true, None));
        assert_eq!(log_format(Some("TEXT"), false), (false, None));
        assert_eq!(log_format(Some(""), false), (true, None));
        assert_eq!(log_format(Some("yaml"), true), (false, Some("yaml".into())));
    }
}
