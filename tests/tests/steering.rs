//! Steered sampling through the service: `digctl api`, `digctl coordinator`
//! and `digctl worker` processes on the real RabbitMQ, Redis and SeaweedFS.
//!
//! - A steered job (3 particles per sample, shards of 4) returns the bytes
//!   of `digctl sample --steer` with the same settings, energies and
//!   `log Z` included, also when its worker is SIGKILLed mid-job; the view
//!   states the steering and counts K times the network calls.
//! - The same samples alone, in other batch sizes, within float noise.
//! - Every invalid steering request is a 400 naming the field, and leaves
//!   no job behind.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dig_model::structure::Ensemble;
use dig_tests::cluster::Cluster;
use dig_tests::fragment::{self, data, BATCH, MODEL, SEQUENCE};

static SERIAL: Mutex<()> = Mutex::new(());

/// Three particles, weights from t = 0.8, a physical term and a radius of
/// gyration pulled towards 9 Å.
fn steering_file(dir: &Path) -> PathBuf {
    let path = dir.join("steer.json");
    std::fs::write(
        &path,
        r#"{"particles": 3, "ess_threshold": 0.9, "window": [0.8, 0.0], "noise": 0.5,
            "potentials": [
              {"type": "chain_break", "flat_bottom": 0.4, "slope": 3},
              {"type": "rg", "target": 9.0, "slope": 1.0}
            ]}"#,
    )
    .unwrap();
    path
}

fn local_steered(
    dir: &Path,
    steer: &Path,
    num: u64,
    seed: u64,
    steps: u64,
    batch: &str,
) -> PathBuf {
    let out = dir.join(format!("local-{num}-{seed}-{steps}-{batch}"));
    let (ok, stderr) = fragment::sample(
        &out,
        (num, seed, steps),
        batch,
        &["--steer", steer.to_str().unwrap()],
    );
    assert!(ok, "{stderr}");
    out
}

#[test]
fn a_steered_job_equals_digctl_sample_through_a_worker_kill_and_bad_steering_is_refused() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("OMP_NUM_THREADS", "1");
    let t0 = Instant::now();
    let mut c = Cluster::distributed("steer");
    c.upload_model_dir(&data("model"), MODEL);
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let mut victim = c.start_worker();
    let sha = c.upload_features_from(&c.key_a, &data("features.npz"));
    let steer = steering_file(c.dir.path());
    let (num, seed, steps) = (12u64, 4u64, 12u64);
    let job = fragment::submit(
        &c,
        &sha,
        (num, seed, steps),
        4,
        &["--steer", steer.to_str().unwrap()],
    );
    c.wait_first_shard(&c.key_a, &job, &victim);
    victim.kill();
    eprintln!("[{:.1} s] worker killed", t0.elapsed().as_secs_f64());
    let mut worker = c.start_worker();
    let view = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(300),
        &mut [&mut api, &mut coordinator, &mut worker],
    );
    assert_eq!(view["state"], "succeeded", "{view}\n{}", coordinator.log());
    assert_eq!(view["samples_done"], num);
    let sampling = &view["sampling"];
    assert_eq!(sampling["network_calls_per_sample"], 3 * steps, "{view}");
    assert_eq!(sampling["steering"]["particles"], 3);
    assert_eq!(
        sampling["steering"]["window"],
        serde_json::json!([0.8, 0.0])
    );
    assert_eq!(sampling["steering"]["potentials"][1]["type"], "rg");

    // The manifest states the steering too.
    let (status, text) = c.api_get(&c.key_a, &format!("/v1/jobs/{job}/results"));
    assert_eq!(status, 200, "{text}");
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(manifest["steering"], sampling["steering"], "{manifest}");
    assert_eq!(manifest["network_calls_per_sample"], 3 * steps);
    let shards = c.fetch(&c.key_a, &job);
    let mut service = shards[0].clone();
    for s in &shards[1..] {
        service.append(s.clone());
    }
    let local_dir = local_steered(c.dir.path(), &steer, num, seed, steps, BATCH);
    let local = Ensemble::read_npz(&local_dir.join("samples.npz"), SEQUENCE).unwrap();
    assert_eq!(service.sample_index, (0..num as i64).collect::<Vec<_>>());
    assert!(
        service.tr == local.tr && service.rot_mat == local.rot_mat,
        "samples differ"
    );
    let (a, b) = (
        service.steer.as_ref().unwrap(),
        local.steer.as_ref().unwrap(),
    );
    assert_eq!(a, b, "energies or log Z differ");
    assert!(a.energy.iter().all(|u| u.is_finite() && *u >= 0.0));
    assert!(a.log_z.iter().all(|z| z.is_finite() && *z <= 1e-12));
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["network_calls_per_sample"], 3 * steps);
    assert_eq!(run["steering"]["particles"], 3);

    // The same groups in other batches: within float noise (a batch of one
    // group, or of all), the same energies to rounding.
    for batch in ["1", "12"] {
        let other = Ensemble::read_npz(
            &local_steered(c.dir.path(), &steer, num, seed, steps, batch).join("samples.npz"),
            SEQUENCE,
        )
        .unwrap();
        let worst = other
            .tr
            .iter()
            .zip(&local.tr)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "batch {batch}: {worst} Å");
    }

    // Bad steering: a 400 naming the field, and no job left behind.
    let before = c.api_get(&c.key_a, "/v1/jobs?limit=100").1;
    let base = serde_json::json!({
        "sequence": SEQUENCE, "features_sha256": sha, "num_samples": 2, "model": MODEL, "steps": 4,
    });
    let cases = [
        (
            serde_json::json!({"potentials": [{"type": "bogus"}]}),
            "steering.potentials[0].type: unknown variant `bogus`",
        ),
        (
            serde_json::json!({"particles": 0, "potentials": [{"type": "clash"}]}),
            "steering.particles: must be between 1 and 64",
        ),
        (
            serde_json::json!({"particles": 65, "potentials": [{"type": "clash"}]}),
            "steering.particles:",
        ),
        (
            serde_json::json!({"noise": -1, "potentials": [{"type": "clash"}]}),
            "steering.noise:",
        ),
        (
            serde_json::json!({"potentials": [{"type": "rg", "target": "x"}]}),
            "steering.potentials[0].target:",
        ),
        (
            serde_json::json!({"potentials": [{"type": "rmsd", "reference_ca": [[0.0, 0.0, 0.0]]}]}),
            "steering.potentials[0].reference_ca: the reference has 1 residues, the protein 24",
        ),
        (
            serde_json::json!({"potentials": [{"type": "clash"}], "extra": 1}),
            "steering.extra: unknown field `extra`",
        ),
        (serde_json::json!([1, 2]), "steering: must be a JSON object"),
    ];
    for (steering, want) in cases {
        let mut body = base.clone();
        body["steering"] = steering.clone();
        let (status, text) = c.api_post(&c.key_a, "/v1/jobs", &body);
        assert_eq!(status, 400, "{steering}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{text}"));
        assert!(msg.starts_with(want), "{steering}: {msg} (want {want})");
    }
    // Steering needs the Euler update.
    let mut body = base.clone();
    body["solver"] = "ab2".into();
    body["steering"] = serde_json::json!({"potentials": [{"type": "clash"}]});
    let (status, text) = c.api_post(&c.key_a, "/v1/jobs", &body);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("steering.solver:"), "{text}");
    assert_eq!(
        c.api_get(&c.key_a, "/v1/jobs?limit=100").1,
        before,
        "a refused job was created"
    );
    eprintln!("[{:.1} s] done", t0.elapsed().as_secs_f64());
}
