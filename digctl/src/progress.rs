//! Progress reporting: a bar on a terminal, plain log lines otherwise (so
//! batch logs stay readable), and the logging set-up.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DIG_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
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
