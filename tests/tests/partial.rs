//! Partial diffusion (`digctl sample --from-structure --from-time`) on the
//! AdK-fragment model: t = 1 is ordinary sampling bit for bit, a small t
//! stays near the input, every sample is a pure function of (seed, index)
//! whatever the batch, and bad inputs are named.

use std::path::Path;
use std::process::Command;

use dig_model::structure::Ensemble;
use dig_tests::digctl_path;
use dig_tests::fragment::{data, SEQUENCE};

fn sample(out: &Path, extra: &[&str]) -> (bool, String) {
    let o = Command::new(digctl_path())
        .args([
            "sample",
            "--model",
            data("model").to_str().unwrap(),
            "--features",
            data("features.npz").to_str().unwrap(),
            "--sequence",
            SEQUENCE,
            "--num-samples",
            "6",
            "--seed",
            "3",
            "--steps",
            "20",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn read(out: &Path) -> Ensemble {
    Ensemble::read_npz(&out.join("samples.npz"), SEQUENCE).unwrap()
}

#[test]
fn from_time_one_is_ordinary_sampling_and_a_small_time_stays_near_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let closed = data("closed.pdb");
    let closed = closed.to_str().unwrap();
    let plain = dir.path().join("plain");
    assert!(sample(&plain, &[]).0);
    let t1 = dir.path().join("t1");
    let (ok, err) = sample(&t1, &["--from-structure", closed, "--from-time", "1"]);
    assert!(ok, "{err}");
    let (a, b) = (read(&plain), read(&t1));
    assert_eq!(a.sample_index, b.sample_index);
    assert!(a
        .tr
        .iter()
        .zip(&b.tr)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(a
        .rot_mat
        .iter()
        .zip(&b.rot_mat)
        .all(|(x, y)| x.to_bits() == y.to_bits()));

    // t = 0.3 of 20 steps: steps 14..19 run from the noised input.
    let small = dir.path().join("small");
    let (ok, err) = sample(
        &small,
        &[
            "--from-structure",
            closed,
            "--from-time",
            "0.3",
            "--batch-size",
            "1",
        ],
    );
    assert!(ok, "{err}");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(small.join("run.json")).unwrap()).unwrap();
    let fs = &run["from_structure"];
    assert_eq!(fs["start_step"], 14, "{run}");
    assert_eq!(fs["structures"], 1);
    assert!((fs["start_time"].as_f64().unwrap() - 0.3).abs() < 1e-9);
    assert!((fs["sigma_tr"].as_f64().unwrap() - 0.1f64.powf(0.7) * 35f64.powf(0.3)).abs() < 1e-9);
    let e = read(&small);
    let reference = dig_model::backbone::read_pdb(&data("closed.pdb")).unwrap();
    for i in 0..e.num_samples() {
        let rmsd = dig_model::evaluate::ca_rmsd(&e.backbone(i), &reference.frames[0]);
        assert!(rmsd < 1.0, "sample {i} moved {rmsd} Å from the input");
    }
    // Batch 4: the same samples.
    let batched = dir.path().join("batched");
    assert!(
        sample(
            &batched,
            &[
                "--from-structure",
                closed,
                "--from-time",
                "0.3",
                "--batch-size",
                "4"
            ]
        )
        .0
    );
    let f = read(&batched);
    let worst =
        e.tr.iter()
            .zip(&f.tr)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
    assert!(worst < 1e-3, "batch changes a sample by {worst} Å");
}

#[test]
fn bad_partial_diffusion_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let closed = data("closed.pdb");
    let closed = closed.to_str().unwrap();
    let out = dir.path().join("out");
    for (t, msg) in [
        ("0", "--from-time must be in (0, 1], got 0"),
        ("1.5", "--from-time must be in (0, 1], got 1.5"),
    ] {
        let (ok, err) = sample(&out, &["--from-structure", closed, "--from-time", t]);
        assert!(!ok);
        assert!(err.contains(msg), "{err}");
    }
    let full = dig_tests::repo_root().join("examples/adk/closed.pdb");
    let (ok, err) = sample(
        &out,
        &[
            "--from-structure",
            full.to_str().unwrap(),
            "--from-time",
            "0.5",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("214 residues per structure, but the protein (its features) has 24"),
        "{err}"
    );
    let notes = dir.path().join("notes.pdb");
    std::fs::write(&notes, "not a structure\n").unwrap();
    let (ok, err) = sample(
        &out,
        &[
            "--from-structure",
            notes.to_str().unwrap(),
            "--from-time",
            "0.5",
        ],
    );
    assert!(!ok);
    assert!(err.contains("notes.pdb: no ATOM records"), "{err}");
    let (ok, err) = sample(&out, &["--from-structure", closed]);
    assert!(!ok);
    assert!(err.contains("--from-time"), "{err}");
    assert!(
        !out.join("run.json").exists(),
        "nothing written for a refused run"
    );
}

/// A two-model PDB of the fragment's closed and open structures.
fn two_models(dir: &Path) -> std::path::PathBuf {
    let mut text = String::new();
    for (m, name) in ["closed.pdb", "open.pdb"].iter().enumerate() {
        text.push_str(&format!("MODEL     {:>4}\n", m + 1));
        for line in std::fs::read_to_string(data(name)).unwrap().lines() {
            if line.starts_with("ATOM") {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str("ENDMDL\n");
    }
    text.push_str("END\n");
    let path = dir.join("ends.pdb");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_job_from_structures_through_the_services_equals_digctl_sample() {
    use dig_tests::cluster::Cluster;
    use dig_tests::fragment::{self, BATCH, MODEL};
    std::env::set_var("OMP_NUM_THREADS", "1");
    let dir = tempfile::tempdir().unwrap();
    let ends = two_models(dir.path());
    let ends_arg = ends.to_str().unwrap();
    let mut c = Cluster::distributed("partial");
    c.upload_model_dir(&data("model"), MODEL);
    let _api = c.start_api();
    let _coordinator = c.start_coordinator();
    let _worker = c.start_worker();
    let sha = c.upload_features_from(&c.key_a, &data("features.npz"));
    // 10 samples in shards of 5 from two structures at t = 0.3 of 20 steps.
    let partial = ["--from-structure", ends_arg, "--from-time", "0.3"];
    let job = fragment::submit(&c, &sha, (10, 3, 20), 5, &partial);
    c.client_ok(
        &c.key_a,
        &["wait", &job, "--poll-ms", "200", "--timeout", "600"],
    );
    let view = c.status(&c.key_a, &job);
    assert_eq!(view["state"], "succeeded", "{view}");
    let from = &view["sampling"]["from_structure"];
    let structures_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&ends).unwrap()))
    };
    assert_eq!(from["sha256"], structures_sha.as_str(), "{view}");
    assert_eq!(from["structures"], 2, "{view}");
    assert_eq!(from["from_time"], 0.3, "{view}");
    // Steps 14..19 of 20 run: 6 network calls (Euler).
    assert_eq!(view["sampling"]["network_calls_per_sample"], 6, "{view}");
    let shards = c.fetch_with_sequence(&c.key_a, &job, SEQUENCE);
    let mut fetched = shards[0].clone();
    fetched.append(shards[1].clone());
    let out = dir.path().join("local");
    let (ok, err) = fragment::sample(&out, (10, 3, 20), BATCH, &partial);
    assert!(ok, "{err}");
    let local = read(&out);
    assert_eq!(fetched.sample_index, local.sample_index);
    assert_eq!(fetched.tr, local.tr, "samples differ");
    assert_eq!(fetched.rot_mat, local.rot_mat);
    // Even samples start from the closed model, odd ones from the open one.
    let (closed, open) = (
        dig_model::backbone::read_pdb(&data("closed.pdb")).unwrap(),
        dig_model::backbone::read_pdb(&data("open.pdb")).unwrap(),
    );
    for i in 0..fetched.num_samples() {
        let b = fetched.backbone(i);
        let (to_closed, to_open) = (
            dig_model::evaluate::ca_rmsd(&b, &closed.frames[0]),
            dig_model::evaluate::ca_rmsd(&b, &open.frames[0]),
        );
        let (near, far) = if i % 2 == 0 {
            (to_closed, to_open)
        } else {
            (to_open, to_closed)
        };
        assert!(
            near < far,
            "sample {i}: {near} Å from its start, {far} from the other"
        );
    }

    // Bad requests: a 400 (or 404) naming the problem, no job left behind.
    let before = c.api_get(&c.key_a, "/v1/jobs?limit=100").1;
    let (status, text) = c.api_post_bytes(&c.key_a, "/v1/structures", b"not a structure\n");
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("not a structure file (PDB expected)"),
        "{text}"
    );
    assert!(text.contains("no ATOM records"), "{text}");
    let full = std::fs::read(dig_tests::repo_root().join("examples/adk/closed.pdb")).unwrap();
    let (status, text) = c.api_post_bytes(&c.key_a, "/v1/structures", &full);
    assert_eq!(status, 201, "{text}");
    let full_sha: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(full_sha["residues"], 214, "{text}");
    assert_eq!(full_sha["structures"], 1, "{text}");
    let (status, again) = c.api_post_bytes(&c.key_a, "/v1/structures", &full);
    assert_eq!((status, &again), (200, &text), "a repeated upload");
    let base = serde_json::json!({
        "sequence": SEQUENCE, "features_sha256": sha, "num_samples": 2, "model": MODEL, "steps": 4,
    });
    let cases = [
        (
            serde_json::json!({"from_structure": full_sha["sha256"], "from_time": 0.5}),
            400,
            "from_structure: the structures have 214 residues, the protein (its features) 24",
        ),
        (
            serde_json::json!({"from_structure": structures_sha, "from_time": 0}),
            400,
            "from_time: must be in (0, 1], got 0",
        ),
        (
            serde_json::json!({"from_structure": structures_sha, "from_time": 1.5}),
            400,
            "from_time: must be in (0, 1], got 1.5",
        ),
        (
            serde_json::json!({"from_structure": structures_sha}),
            400,
            "from_time: needed with from_structure",
        ),
        (
            serde_json::json!({"from_time": 0.5}),
            400,
            "from_structure: needed with from_time",
        ),
        (
            serde_json::json!({"from_structure": "ab", "from_time": 0.5}),
            400,
            "from_structure: 'ab' is not a SHA-256 digest",
        ),
        (
            serde_json::json!({"from_structure": "0".repeat(64), "from_time": 0.5}),
            404,
            "from_structure: structures 0000",
        ),
        (
            serde_json::json!({"from_structure": structures_sha, "from_time": 0.5,
                "steering": {"potentials": [{"type": "clash"}]}}),
            400,
            "from_structure: cannot be combined with steering",
        ),
    ];
    for (fields, code, want) in cases {
        let mut body = base.clone();
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, text) = c.api_post(&c.key_a, "/v1/jobs", &body);
        assert_eq!(status, code, "{fields}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{text}"));
        assert!(msg.starts_with(want), "{fields}: {msg} (want {want})");
    }
    // Another tenant cannot start from this tenant's structures.
    let sha_b = c.upload_features_from(&c.key_b, &data("features.npz"));
    let mut body = base.clone();
    body["features_sha256"] = sha_b.into();
    body["from_structure"] = structures_sha.clone().into();
    body["from_time"] = 0.5.into();
    let (status, text) = c.api_post(&c.key_b, "/v1/jobs", &body);
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("structures_not_found"), "{text}");
    // The client: only PDB files, named.
    let xtc = dir.path().join("ends.xtc");
    std::fs::write(&xtc, b"x").unwrap();
    let err = c.client_err(
        &c.key_a,
        &[
            "submit",
            "--features-sha256",
            &sha,
            "--sequence",
            SEQUENCE,
            "--model",
            MODEL,
            "--num-samples",
            "2",
            "--from-structure",
            xtc.to_str().unwrap(),
            "--from-time",
            "0.5",
        ],
    );
    assert!(err.contains("jobs take a PDB file"), "{err}");
    assert_eq!(
        c.api_get(&c.key_a, "/v1/jobs?limit=100").1,
        before,
        "a refused job was created"
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(c.cleanup());
}
