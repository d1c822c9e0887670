//! `digctl density` on the AdK-fragment model: per-structure log-densities
//! in file order, deterministic whatever the batch, the exact divergence and
//! Hutchinson's agreeing within the stated error, and bad inputs named.

use std::path::Path;
use std::process::Command;

use dig_model::structure::Ensemble;
use dig_tests::digctl_path;
use dig_tests::fragment::data;

/// A multi-model PDB of the given single-structure PDBs, in order.
fn models(out: &Path, files: &[&str]) {
    let mut text = String::new();
    for (i, f) in files.iter().enumerate() {
        text.push_str(&format!("MODEL     {:>4}\n", i + 1));
        for line in std::fs::read_to_string(data(f)).unwrap().lines() {
            if line.starts_with("ATOM") {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str("ENDMDL\n");
    }
    text.push_str("END\n");
    std::fs::write(out, text).unwrap();
}

fn density(structures: &Path, extra: &[&str]) -> (bool, String, String) {
    let o = Command::new(digctl_path())
        .args([
            "density",
            "--model",
            data("model").to_str().unwrap(),
            "--features",
            data("features.npz").to_str().unwrap(),
            "--structures",
            structures.to_str().unwrap(),
            "--threads",
            "1",
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn results(json: &str) -> Vec<(f64, f64)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r["index"], i);
            (
                r["log_density"].as_f64().unwrap(),
                r["std_error"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn densities_come_in_file_order_whatever_the_batch_and_both_divergences_agree() {
    let dir = tempfile::tempdir().unwrap();
    let three = dir.path().join("three.pdb");
    models(&three, &["closed.pdb", "open.pdb", "closed.pdb"]);
    let flow = ["--flow-steps", "20", "--divergence", "hutchinson:4"];
    let (ok, one_batch, err) = density(&three, &[&flow[..], &["--batch-size", "3"]].concat());
    assert!(ok, "{err}");
    let (ok, singles, err) = density(&three, &[&flow[..], &["--batch-size", "1"]].concat());
    assert!(ok, "{err}");
    let (a, b) = (results(&one_batch), results(&singles));
    assert_eq!(a.len(), 3);
    for i in 0..3 {
        // Each structure's probes are its own stream: the batch changes
        // nothing but float rounding.
        assert!(
            (a[i].0 - b[i].0).abs() < 1e-3 * a[i].0.abs().max(1.0),
            "{i}: {a:?} vs {b:?}"
        );
        assert!(a[i].1 > 0.0, "{a:?}");
    }
    // The same structure at positions 0 and 2: the same poses, other probes.
    assert!(
        (a[0].0 - a[2].0).abs() < 4.0 * (a[0].1.powi(2) + a[2].1.powi(2)).sqrt(),
        "{a:?}"
    );
    // The exact divergence: no error, and Hutchinson's estimate within its own.
    let (ok, exact, err) = density(
        &three,
        &[
            "--flow-steps",
            "20",
            "--divergence",
            "exact",
            "--batch-size",
            "3",
        ],
    );
    assert!(ok, "{err}");
    let e = results(&exact);
    let v: serde_json::Value = serde_json::from_str(&exact).unwrap();
    assert_eq!(v["network_forward_passes_per_structure"], 40);
    assert_eq!(v["vector_jacobian_products_per_structure"], 40 * 6 * 24);
    for i in 0..3 {
        assert_eq!(e[i].1, 0.0);
        println!(
            "structure {i}: exact {:.3}, Hutchinson {:.3} +- {:.3}",
            e[i].0, a[i].0, a[i].1
        );
        assert!(
            (e[i].0 - a[i].0).abs() < 4.0 * a[i].1,
            "{i}: exact {e:?}, Hutchinson {a:?}"
        );
    }
    assert!(
        (e[0].0 - e[2].0).abs() < 1e-6 * e[0].0.abs().max(1.0),
        "{e:?}"
    );
    // CSV: the same numbers, one line each.
    let (ok, csv, err) = density(
        &three,
        &[
            "--flow-steps",
            "20",
            "--divergence",
            "exact",
            "--format",
            "csv",
        ],
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "index,log_density,per_residue,std_error");
    assert_eq!(lines.len(), 4);
    let first: Vec<f64> = lines[1].split(',').map(|x| x.parse().unwrap()).collect();
    assert!((first[1] - e[0].0).abs() < 1e-5 * e[0].0.abs().max(1.0));
    assert!((first[2] - e[0].0 / 24.0).abs() < 1e-5 * e[0].0.abs().max(1.0));
}

#[test]
fn bad_structures_and_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let full = dig_tests::repo_root().join("examples/adk/closed.pdb");
    let (ok, out, err) = density(&full, &[]);
    assert!(!ok && out.is_empty());
    assert!(
        err.contains(
            "closed.pdb: 214 residues per structure, but the protein (its features) has 24"
        ),
        "{err}"
    );
    let text = dir.path().join("notes.pdb");
    std::fs::write(&text, "these are notes, not atoms\n").unwrap();
    let (ok, _, err) = density(&text, &[]);
    assert!(!ok);
    assert!(err.contains("notes.pdb: no ATOM records"), "{err}");
    let other = dir.path().join("structure.cif");
    std::fs::write(&other, "data_x\n").unwrap();
    let (ok, _, err) = density(&other, &[]);
    assert!(!ok);
    assert!(
        err.contains("unknown trajectory format (expected .pdb, .dcd or .xtc)"),
        "{err}"
    );
    let closed = data("closed.pdb");
    let (ok, _, err) = density(&closed, &["--divergence", "hutchinson:1"]);
    assert!(!ok);
    assert!(err.contains("hutchinson needs at least 2 probes"), "{err}");
    let (ok, _, err) = density(&closed, &["--divergence", "trace"]);
    assert!(!ok);
    assert!(err.contains("use exact or hutchinson:K"), "{err}");
    let (ok, _, err) = density(&closed, &["--flow-steps", "0"]);
    assert!(!ok);
    assert!(
        err.contains("--flow-steps must be between 1 and 1000, got 0"),
        "{err}"
    );
    let (ok, _, err) = density(
        &closed,
        &["--out", "/nonexistent/dir/d.json", "--flow-steps", "1"],
    );
    assert!(!ok);
    assert!(err.contains("/nonexistent/dir/d.tmp"), "{err}");
}

#[test]
fn interpolation_runs_from_one_end_to_the_other_with_a_density_per_frame() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("path");
    let run = |extra: &[&str]| {
        Command::new(digctl_path())
            .args([
                "interpolate",
                "--model",
                data("model").to_str().unwrap(),
                "--features",
                data("features.npz").to_str().unwrap(),
                "--from",
                data("closed.pdb").to_str().unwrap(),
                "--to",
                data("open.pdb").to_str().unwrap(),
                "--flow-steps",
                "20",
                "--threads",
                "1",
                "--out",
                out.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--frames", "5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("path.json")).unwrap()).unwrap();
    let path = report["path"].as_array().unwrap();
    assert_eq!(path.len(), 5);
    for (i, f) in path.iter().enumerate() {
        assert_eq!(f["frame"], i);
        assert!((f["fraction"].as_f64().unwrap() - i as f64 / 4.0).abs() < 1e-12);
        assert!(f["log_density"].as_f64().unwrap().is_finite(), "{f}");
        assert!(f["std_error"].as_f64().unwrap() > 0.0, "{f}");
    }
    // The ends come back (encode then decode) within 0.3 Å CA-RMSD.
    let e = Ensemble::read_npz(&out.join("samples.npz"), dig_tests::fragment::SEQUENCE).unwrap();
    assert_eq!(e.num_samples(), 5);
    for (frame, file) in [(0, "closed.pdb"), (4, "open.pdb")] {
        let reference = dig_model::backbone::read_pdb(&data(file)).unwrap();
        let rmsd = dig_model::evaluate::ca_rmsd(&e.backbone(frame), &reference.frames[0]);
        println!("frame {frame} vs {file}: {rmsd:.3} Å");
        assert!(rmsd < 0.3, "frame {frame} is {rmsd} Å from {file}");
    }
    // The same path one frame at a time: the frames within 1e-3 Å and the
    // same densities (per-frame probe streams).
    let first = std::fs::read(out.join("path.json")).unwrap();
    let o = run(&["--frames", "5", "--batch-size", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let single =
        Ensemble::read_npz(&out.join("samples.npz"), dig_tests::fragment::SEQUENCE).unwrap();
    let worst =
        e.tr.iter()
            .zip(&single.tr)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
    assert!(worst < 1e-3, "batch 1 moves a frame by {worst} Å");
    let densities = |bytes: &[u8]| -> Vec<f64> {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        v["path"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["log_density"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (
        densities(&first),
        densities(&std::fs::read(out.join("path.json")).unwrap()),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-3 * x.abs().max(1.0), "{a:?} vs {b:?}");
    }
    let o = run(&["--frames", "1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--frames must be between 2 and 1000 (both ends included), got 1"),
        "{err}"
    );
}

#[test]
fn a_job_with_log_density_through_the_services_equals_digctl_sample() {
    use dig_tests::cluster::Cluster;
    use dig_tests::fragment::{self, BATCH, MODEL, SEQUENCE};
    std::env::set_var("OMP_NUM_THREADS", "1");
    let mut c = Cluster::distributed("density");
    c.upload_model_dir(&data("model"), MODEL);
    let _api = c.start_api();
    let _coordinator = c.start_coordinator();
    let _worker = c.start_worker();
    let sha = c.upload_features_from(&c.key_a, &data("features.npz"));
    // 10 samples in shards of 5 (the workers' batch): two shards.
    let job = fragment::submit(
        &c,
        &sha,
        (10, 3, 20),
        5,
        &["--log-density", "--solver", "flow"],
    );
    c.client_ok(
        &c.key_a,
        &["wait", &job, "--poll-ms", "200", "--timeout", "600"],
    );
    let view = c.status(&c.key_a, &job);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["sampling"]["log_density"], true, "{view}");
    assert_eq!(view["sampling"]["solver"], "flow", "{view}");
    assert_eq!(view["sampling"]["network_calls_per_sample"], 39, "{view}");
    let shards = c.fetch_with_sequence(&c.key_a, &job, SEQUENCE);
    let mut fetched = shards[0].clone();
    fetched.append(shards[1].clone());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("local");
    let (ok, err) = fragment::sample(
        &out,
        (10, 3, 20),
        BATCH,
        &["--log-density", "--solver", "flow"],
    );
    assert!(ok, "{err}");
    let local = Ensemble::read_npz(&out.join("samples.npz"), SEQUENCE).unwrap();
    assert_eq!(fetched.sample_index, local.sample_index);
    assert_eq!(fetched.tr, local.tr, "samples differ");
    assert_eq!(fetched.rot_mat, local.rot_mat);
    let (a, b) = (fetched.log_density.unwrap(), local.log_density.unwrap());
    assert_eq!(a.log_density.len(), 10);
    assert_eq!(a, b, "log-densities differ");
    assert!(a.std_error.iter().all(|&e| e > 0.0));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(c.cleanup());
}
