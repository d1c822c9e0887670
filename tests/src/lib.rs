//! End-to-end tests that drive the built `digctl` binary the way users do.
//!
//! This crate holds no product code: its `tests/` run the binary (built by
//! `make test` before `cargo test`) on the published code's fixtures and on
//! bad input, and the cluster's processes against real RabbitMQ, Redis and
//! S3 servers ([`cluster`]).

pub mod chaos;
pub mod cluster;
pub mod fragment;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The published code's outputs (`model/tests/data`, copied from `shared/fixtures/dig-small`).
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("model/tests/data").join(name)
}

/// The `digctl` binary of the profile these tests were built with
/// (`DIGCTL` overrides it).
pub fn digctl_path() -> PathBuf {
    if let Ok(p) = std::env::var("DIGCTL") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/digctl;
    // target/<profile>/<bench-binary> -> target/<profile>/digctl.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("binary dir");
    let path = if dir.ends_with("deps") {
        dir.parent().expect("target dir").join("digctl")
    } else {
        dir.join("digctl")
    };
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --workspace --no-run` or `cargo build -p digctl` (make test does the first)",
        path.display()
    );
    path
}

/// Runs `digctl` with `args`.
pub fn digctl(args: &[&str]) -> Output {
    Command::new(digctl_path())
        .args(args)
        .env("DIG_LOG", "warn")
        .output()
        .expect("run digctl")
}

/// Runs `digctl` and panics with its output unless it succeeds.
pub fn digctl_ok(args: &[&str]) -> String {
    let out = digctl(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "digctl {args:?} failed:\n{text}");
    text
}

/// Runs `digctl`, expects failure, returns stderr.
pub fn digctl_err(args: &[&str]) -> String {
    let out = digctl(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "digctl {args:?} should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// Runs a Python snippet with the project venv (numpy, mdtraj), returns stdout.
pub fn python(script: &str, args: &[&Path]) -> String {
    let py = repo_root().join(".venv/bin/python");
    let out = Command::new(&py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run `make setup`", py.display()));
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}
