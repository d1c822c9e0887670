//! The command line's surface: every command is listed and has help, and a
//! mistyped command gets clap's error naming it.
//!
//! Being an integration test of this package, it also makes `cargo test
//! --workspace` build `target/debug/digctl` itself, with the same feature
//! resolution as every other test target, so that `make test` builds the
//! dependency graph once (a separate `cargo build -p digctl` resolves
//! features for digctl alone and builds part of the graph a second time).

use std::process::Command;

const COMMANDS: [&str; 29] = [
    "sample",
    "evaluate",
    "density",
    "interpolate",
    "convert-checkpoint",
    "demo-model",
    "train",
    "frames",
    "features",
    "bench-fidelity",
    "bench",
    "gpu-check",
    "bench-train",
    "api",
    "coordinator",
    "worker",
    "standalone",
    "upload-model",
    "reconcile",
    "api-key",
    "upload-features",
    "submit",
    "status",
    "wait",
    "fetch",
    "cancel",
    "jobs",
    "batch",
    "models",
];

fn digctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_digctl"))
        .args(args)
        .output()
        .expect("run digctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn every_command_is_listed_and_has_help() {
    let (ok, help, _) = digctl(&["--help"]);
    assert!(ok);
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert_eq!(listed, COMMANDS);
    for c in COMMANDS {
        let (ok, text, err) = digctl(&[c, "--help"]);
        assert!(ok, "digctl {c} --help: {err}");
        assert!(text.contains(&format!("Usage: digctl {c}")), "{c}: {text}");
    }
    let (ok, version, _) = digctl(&["--version"]);
    assert!(ok);
    assert_eq!(
        version.trim(),
        format!("digctl {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_mistyped_command_is_named_with_a_suggestion() {
    let (ok, _, err) = digctl(&["sumbit"]);
    assert!(!ok);
    assert!(
        err.contains("unrecognized subcommand 'sumbit'") && err.contains("submit"),
        "{err}"
    );
}

#[test]
fn bench_train_times_the_native_update_and_refuses_an_odd_batch() {
    let (ok, _, err) = digctl(&["bench-train", "--batch-size", "3", "--native-only"]);
    assert!(!ok);
    assert!(err.contains("--batch-size must be even"), "{err}");
    let (ok, out, err) = digctl(&[
        "bench-train",
        "--sizes",
        "small",
        "--lengths",
        "12",
        "--threads",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--native-only",
    ]);
    assert!(ok, "{err}");
    // The shipped AdK model's size: 1 053 222 parameters, one row, no ratio.
    let row = out
        .lines()
        .find(|l| l.starts_with("small"))
        .unwrap_or_else(|| panic!("no row: {out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[..4], ["small", "12", "1", "1053222"], "{row}");
    assert!(cols[4].parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!(cols[5..], ["-", "-"], "{row}");
}
