//! The physical-validity filter with top-up, end to end: `digctl api`,
//! `digctl coordinator` and `digctl worker` processes on the real RabbitMQ,
//! Redis and SeaweedFS, with a small trained model whose samples are valid
//! in part (tests/data/adk-fragment: about 60 % at 20 steps).
//!
//! - A filtered job returns exactly `num_samples` valid samples, every index
//!   once, bit-identical to `digctl sample --filter physical`, also when its
//!   worker is SIGKILLed mid-job; the job view and the manifest count them.
//! - A filtered job whose draw limit cannot reach the request ends failed
//!   with the valid fraction it reached, and its valid samples are listed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dig_model::structure::Ensemble;
use dig_tests::cluster::Cluster;
use dig_tests::fragment::{self, data, BATCH, MODEL, SEQUENCE};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("OMP_NUM_THREADS", "1");
    guard
}

/// `digctl sample --filter physical` of the fragment model; its output
/// directory and exit status.
fn local_filtered(
    dir: &Path,
    num: u64,
    seed: u64,
    steps: u64,
    factor: u64,
) -> (PathBuf, bool, String) {
    let out = dir.join(format!("local-{num}-{seed}-{steps}-{factor}"));
    let factor = factor.to_string();
    let (ok, stderr) = fragment::sample(
        &out,
        (num, seed, steps),
        BATCH,
        &["--filter", "physical", "--max-draw-factor", &factor],
    );
    (out, ok, stderr)
}

/// The samples a fetched job's manifest keeps, shard by shard, in index order.
fn kept_samples(c: &Cluster, job: &str) -> (serde_json::Value, Ensemble) {
    let out = c.dir.path().join(format!("fetch-{job}"));
    c.client_ok(&c.key_a, &["fetch", job, "--out", out.to_str().unwrap()]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let mut all = Ensemble {
        sequence: SEQUENCE.into(),
        sample_index: vec![],
        tr: vec![],
        rot_mat: vec![],
        steer: None,
        log_density: None,
    };
    let l = SEQUENCE.len();
    for s in manifest["shards"].as_array().unwrap() {
        let i = s["index"].as_u64().unwrap();
        let e =
            Ensemble::read_npz(&out.join("shards").join(format!("{i:06}.npz")), SEQUENCE).unwrap();
        // The shard's `valid` array agrees with the manifest's count.
        let valid = e.validity().iter().filter(|v| v.valid).count() as u64;
        assert_eq!(s["valid"].as_u64(), Some(valid), "shard {i}: {s}");
        for k in s["kept"].as_array().unwrap() {
            let k = k.as_i64().unwrap();
            let p = e.sample_index.iter().position(|&j| j == k).unwrap();
            all.sample_index.push(k);
            all.tr.extend_from_slice(&e.tr[p * l * 3..(p + 1) * l * 3]);
            all.rot_mat
                .extend_from_slice(&e.rot_mat[p * l * 9..(p + 1) * l * 9]);
        }
    }
    // `digctl fetch` gathers the same samples into samples.npz.
    let gathered = Ensemble::read_npz(&out.join("samples.npz"), SEQUENCE).unwrap();
    assert_eq!(gathered, all);
    (manifest, all)
}

fn submit(
    c: &Cluster,
    sha: &str,
    num: u64,
    seed: u64,
    steps: u64,
    shard: u64,
    factor: u64,
) -> String {
    let factor = factor.to_string();
    fragment::submit(
        c,
        sha,
        (num, seed, steps),
        shard,
        &["--filter", "physical", "--max-draw-factor", &factor],
    )
}

#[test]
fn filtered_jobs_return_exactly_the_valid_samples_of_digctl_sample_or_fail_with_the_fraction() {
    let _guard = serial();
    let t0 = Instant::now();
    let mut c = Cluster::distributed("filter");
    c.upload_model_dir(&data("model"), MODEL);
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let mut victim = c.start_worker();
    let sha = c.upload_features_from(&c.key_a, &data("features.npz"));

    // 60 valid samples at about 60 % valid: 6 initial shards of 10, then
    // more. The worker is killed once the first shard is done.
    let (num, seed, steps) = (60u64, 3u64, 20u64);
    let job = submit(&c, &sha, num, seed, steps, 10, 3);
    let v = c.wait_first_shard(&c.key_a, &job, &victim);
    eprintln!(
        "[{:.1} s] killing the worker at {}",
        t0.elapsed().as_secs_f64(),
        v
    );
    victim.kill();
    let mut worker = c.start_worker();
    let view = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(300),
        &mut [&mut api, &mut coordinator, &mut worker],
    );
    assert_eq!(view["state"], "succeeded", "{view}\n{}", coordinator.log());
    assert_eq!(view["num_samples"], num);
    assert_eq!(view["sampling"]["solver"], "euler");
    assert_eq!(view["sampling"]["steps"], steps);
    assert_eq!(view["sampling"]["network_calls_per_sample"], steps);
    assert_eq!(view["sampling"]["filter"], "physical");
    assert_eq!(view["sampling"]["max_draw_factor"], 3);
    let drawn = view["samples_done"].as_u64().unwrap();
    let valid = view["samples_valid"].as_u64().unwrap();
    assert!(drawn > num && valid >= num && valid < drawn, "{view}");

    let (manifest, service) = kept_samples(&c, &job);
    assert_eq!(manifest["samples_valid"], num);
    assert_eq!(manifest["filter"]["criteria"], "physical");
    let (local_dir, ok, stderr) = local_filtered(c.dir.path(), num, seed, steps, 3);
    assert!(ok, "{stderr}");
    let local = Ensemble::read_npz(&local_dir.join("samples.npz"), SEQUENCE).unwrap();
    assert_eq!(local.num_samples() as u64, num);
    assert!(local.validity().iter().all(|v| v.valid));
    // Every index once, in order, bit for bit the local run's.
    assert_eq!(service.sample_index, local.sample_index);
    assert!(service.tr == local.tr && service.rot_mat == local.rot_mat);
    // The whole-job XTC and its topology hold the kept samples only: the
    // bytes `digctl sample --filter physical` writes.
    let out = c.dir.path().join(format!("xtc-{job}"));
    c.client_ok(
        &c.key_a,
        &[
            "fetch",
            &job,
            "--out",
            out.to_str().unwrap(),
            "--format",
            "xtc",
        ],
    );
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(read(out.join(format!("{job}.xtc"))) == read(local_dir.join("samples.xtc")));
    assert_eq!(
        read(out.join(format!("{job}-topology.pdb"))),
        read(local_dir.join("topology.pdb"))
    );
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["samples_valid"], num);
    assert_eq!(run["filter"]["complete"], true);
    eprintln!(
        "[{:.1} s] {num} valid of {drawn} drawn; indices up to {}",
        t0.elapsed().as_secs_f64(),
        local.sample_index.last().unwrap()
    );

    // At 10 steps about a quarter is valid: 20 draws cannot give 20.
    let short = submit(&c, &sha, 20, seed, 10, 10, 1);
    let view = c.wait_final(
        &c.key_a,
        &short,
        Duration::from_secs(120),
        &mut [&mut api, &mut coordinator, &mut worker],
    );
    assert_eq!(view["state"], "failed", "{view}");
    let error = view["error"].as_str().unwrap();
    let valid = view["samples_valid"].as_u64().unwrap();
    assert!(valid < 20, "{view}");
    let expected = format!(
        "physical filter: {valid} of 20 drawn samples are valid ({:.1}%), 20 requested; \
         max_draw_factor 1 allows at most 20 draws",
        100.0 * valid as f64 / 20.0
    );
    assert!(
        error.starts_with(&expected),
        "{error}\nexpected: {expected}"
    );
    let (_, local_dir_short) = {
        let (dir, ok, stderr) = local_filtered(c.dir.path(), 20, seed, 10, 1);
        assert!(!ok, "20 valid of 20 draws at 10 steps");
        assert!(
            stderr.contains(&format!(
                "physical filter: {valid} of 20 drawn samples are valid"
            )),
            "{stderr}"
        );
        (stderr, dir)
    };
    // The valid samples it has are listed and fetchable, as the local run's.
    let (manifest, service) = kept_samples(&c, &short);
    assert_eq!(manifest["samples_valid"], valid);
    let local = Ensemble::read_npz(&local_dir_short.join("samples.npz"), SEQUENCE).unwrap();
    assert_eq!(service.sample_index, local.sample_index);
    assert!(service.tr == local.tr && service.rot_mat == local.rot_mat);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(c.cleanup());
}

#[test]
fn submissions_name_a_bad_solver_or_filter_and_a_bad_draw_factor() {
    let _guard = serial();
    let (c, _svc) = Cluster::standalone("filter-bad");
    let sha = c.upload_features(&c.key_a);
    for (body, status, message) in [
        (
            serde_json::json!({"solver": "rk4"}),
            400,
            "unknown variant `rk4`",
        ),
        (
            serde_json::json!({"filter": "pretty"}),
            400,
            "unknown variant `pretty`",
        ),
        (
            serde_json::json!({"filter": "physical", "max_draw_factor": 11}),
            400,
            "max_draw_factor: must be between 1 and 10, got 11",
        ),
        (
            serde_json::json!({"max_draw_factor": 2}),
            400,
            "max_draw_factor: only with filter",
        ),
        (
            serde_json::json!({"steps": 501}),
            400,
            "steps: must be between 1 and 500, got 501",
        ),
        (
            serde_json::json!({"flow_above": 1.5}),
            400,
            "flow_above: must be a diffusion time in [0, 1], got 1.5",
        ),
        (
            serde_json::json!({"flow_above": 0.5, "solver": "flow"}),
            400,
            "flow_above: cannot be combined with solver flow",
        ),
        (
            serde_json::json!({"flow_above": 0.5, "log_density": true}),
            400,
            "flow_above: cannot be combined with log_density",
        ),
        (
            serde_json::json!({"flow_above": 0.5, "steering": {"potentials": [{"type": "clash"}]}}),
            400,
            "flow_above: cannot be combined with steering",
        ),
    ] {
        let mut req = serde_json::json!({
            "sequence": dig_tests::cluster::SEQUENCE,
            "features_sha256": sha,
            "num_samples": 3,
        });
        for (k, v) in body.as_object().unwrap() {
            req[k] = v.clone();
        }
        let (got, text) = c.api_post(&c.key_a, "/v1/jobs", &req);
        assert_eq!(got, status, "{req}: {text}");
        assert!(text.contains(message), "{req}: {text}");
    }
    // A good one states its sampling settings.
    let (got, text) = c.api_post(
        &c.key_a,
        "/v1/jobs",
        &serde_json::json!({
            "sequence": dig_tests::cluster::SEQUENCE,
            "features_sha256": sha,
            "num_samples": 3,
            "seed": 5,
            "shard_size": 2,
            "steps": 25,
            "solver": "heun",
        }),
    );
    assert_eq!(got, 202, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let view = c.status(&c.key_a, &id);
    assert_eq!(view["sampling"]["solver"], "heun");
    // Its samples (two shards of 2 and 1) are digctl sample's with heun.
    let done = c.wait_final(&c.key_a, &id, Duration::from_secs(120), &mut []);
    assert_eq!(done["state"], "succeeded", "{done}");
    let service = c.fetch(&c.key_a, &id);
    let out = c.dir.path().join("local-heun");
    dig_tests::digctl_ok(&[
        "sample",
        "--model",
        dig_tests::fixture("").to_str().unwrap(),
        "--features",
        dig_tests::fixture("features.npz").to_str().unwrap(),
        "--sequence",
        dig_tests::cluster::SEQUENCE,
        "--num-samples",
        "3",
        "--seed",
        "5",
        "--steps",
        "25",
        "--solver",
        "heun",
        "--batch-size",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let local = Ensemble::read_npz(&out.join("samples.npz"), dig_tests::cluster::SEQUENCE).unwrap();
    dig_tests::cluster::assert_same_samples(&service, &local);
    assert_eq!(view["sampling"]["steps"], 25);
    assert_eq!(view["sampling"]["network_calls_per_sample"], 49);
    assert_eq!(view["sampling"]["filter"], serde_json::Value::Null);
}

/// `flow_above` through the services: a job that follows the probability
/// flow above t = 0.5 and ab2 below returns `digctl sample --flow-above 0.5`'s
/// samples bit for bit (two shards of the workers' batch of 5), states the switch
/// in its view and manifest, and samples something else than plain ab2.
#[test]
fn a_job_with_flow_above_through_the_services_equals_digctl_sample() {
    let _guard = serial();
    let mut c = Cluster::distributed("flow-above");
    c.upload_model_dir(&data("model"), MODEL);
    let _api = c.start_api();
    let _coordinator = c.start_coordinator();
    let _worker = c.start_worker();
    let sha = c.upload_features_from(&c.key_a, &data("features.npz"));
    let extra = ["--solver", "ab2", "--flow-above", "0.5"];
    let job = fragment::submit(&c, &sha, (10, 4, 20), 5, &extra);
    c.client_ok(
        &c.key_a,
        &["wait", &job, "--poll-ms", "200", "--timeout", "600"],
    );
    let view = c.status(&c.key_a, &job);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["sampling"]["solver"], "ab2", "{view}");
    assert_eq!(view["sampling"]["flow_above"], 0.5, "{view}");
    assert_eq!(view["sampling"]["network_calls_per_sample"], 20, "{view}");
    let shards = c.fetch(&c.key_a, &job);
    let fetched_dir = c.dir.path().join(format!("fetch-{job}"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fetched_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["flow_above"], 0.5, "{manifest}");
    let mut fetched = shards[0].clone();
    fetched.append(shards[1].clone());
    let local_dir = c.dir.path().join("local-flow-above");
    let (ok, err) = fragment::sample(&local_dir, (10, 4, 20), BATCH, &extra);
    assert!(ok, "{err}");
    let local = Ensemble::read_npz(&local_dir.join("samples.npz"), SEQUENCE).unwrap();
    assert_eq!(fetched.sample_index, local.sample_index);
    assert_eq!(fetched.tr, local.tr, "samples differ");
    assert_eq!(fetched.rot_mat, local.rot_mat);
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["flow_above"], 0.5, "{run}");
    // Plain ab2 from the same noise ends elsewhere.
    let plain_dir = c.dir.path().join("local-ab2");
    let (ok, err) = fragment::sample(&plain_dir, (10, 4, 20), BATCH, &["--solver", "ab2"]);
    assert!(ok, "{err}");
    let plain = Ensemble::read_npz(&plain_dir.join("samples.npz"), SEQUENCE).unwrap();
    let moved = local
        .tr
        .iter()
        .zip(&plain.tr)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        moved > 0.5,
        "flow above 0.5 moved no coordinate more than {moved} Å"
    );
    // The CLI names what it cannot combine.
    for (args, want) in [
        (
            vec!["--flow-above", "0.5", "--noise", "1"],
            "--flow-above cannot be combined with --noise",
        ),
        (
            vec!["--flow-above", "2", "--solver", "ab2"],
            "--flow-above must be a diffusion time in [0, 1], got 2",
        ),
        (
            vec!["--flow-above", "0.5", "--solver", "flow"],
            "--solver flow follows the probability flow at every step already",
        ),
    ] {
        let (ok, err) = fragment::sample(&c.dir.path().join("bad"), (2, 4, 20), BATCH, &args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(c.cleanup());
}
