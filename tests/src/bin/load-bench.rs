//! The load benchmark: the status reads a lab portal makes, from `wrk`
//! (Debian's), against `digctl api` on RabbitMQ, Redis and SeaweedFS, while
//! one job samples; and submissions per second. Prints requests/s and
//! p50/p99 latency per route, and the sampling job's throughput under each
//! load against its unloaded figure measured in the same run.
//!
//! ```sh
//! make bench-load     # = scripts/services.sh; source .services/env;
//!                     #   target/release/load-bench [--seconds 30] [--connections 64]
//! ```
//!
//! Cores: the worker is pinned to CPU 0 with one libtorch thread; the API,
//! the coordinator, `wrk` and the servers (Redis, RabbitMQ, SeaweedFS, which
//! a deployment runs elsewhere) share CPU 1 (`taskset`; the servers get both
//! cores back at the end). That is how a
//! deployment keeps reads from stealing the sampler's cores: CPU sets or
//! Kubernetes requests/limits per container; on a GPU node the sampler
//! needs one core to feed the GPU.

use std::process::Command;
use std::time::{Duration, Instant};

use dig_tests::cluster::{Cluster, SEQUENCE};

struct Args {
    seconds: u64,
    connections: u64,
}

fn parse() -> Args {
    let mut a = Args {
        seconds: 30,
        connections: 64,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        };
        match flag.as_str() {
            "--seconds" => a.seconds = value().parse().expect("--seconds S"),
            "--connections" => a.connections = value().parse().expect("--connections C"),
            "-h" | "--help" => {
                println!(
                    "load-bench [--seconds 30] [--connections 64]\n\
                     Needs wrk and the servers of .services/env (scripts/services.sh)."
                );
                std::process::exit(0);
            }
            other => panic!("unknown option {other}; see --help"),
        }
    }
    a
}

fn pin(pid: u32, cpu: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpu, &pid.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "taskset -p -c {cpu} {pid} failed (util-linux installed?)"
    );
}

/// Redis, RabbitMQ (beam.smp) and SeaweedFS processes of this machine.
fn server_pids() -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", "redis-server|beam.smp|weed mini"])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// What wrk measured.
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: String,
}

fn millis(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => f64::NAN,
    }
}

fn wrk(args: &[&str]) -> Figures {
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk"])
        .args(args)
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
    };
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Figures {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        p50_ms: field("50%").map(|v| millis(&v)).unwrap_or(f64::NAN),
        p99_ms: field("99%").map(|v| millis(&v)).unwrap_or(f64::NAN),
        errors,
    }
}

/// Samples/s of `job` over `window` (from its view's `samples_done`).
fn rate_during(c: &Cluster, job: &str, during: impl FnOnce()) -> f64 {
    let done = || c.status(&c.key_a, job)["samples_done"].as_u64().unwrap();
    let (d0, t0) = (done(), Instant::now());
    during();
    (done() - d0) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let args = parse();
    let mut c = Cluster::distributed("load");
    c.set_env("DIG_WORKER_THREADS", "1");
    c.upload_model();
    let api = c.start_api();
    let coordinator = c.start_coordinator();
    let worker = c.start_worker();
    pin(worker.pid(), "0");
    pin(api.pid(), "1");
    pin(coordinator.pid(), "1");
    let servers = server_pids();
    for &pid in &servers {
        pin(pid, "1");
    }
    let key = c.key_a.clone();
    let sha = c.upload_features(&key);

    // What a portal lists: 60 finished jobs and a batch of 20.
    let small: Vec<String> = (0..60)
        .map(|_| c.submit(&key, &sha, 1, &["--steps", "1", "--priority", "bulk"]))
        .collect();
    let entries: Vec<serde_json::Value> = (0..20)
        .map(|_| serde_json::json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": 1, "steps": 1}))
        .collect();
    let (status, text) = c.api_post(
        &key,
        "/v1/batches",
        &serde_json::json!({"name": "load", "jobs": entries}),
    );
    assert!(status == 202 || status == 200, "{status} {text}");
    let batch = serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for j in &small {
        c.wait_final(&key, j, Duration::from_secs(300), &mut []);
    }
    // The sampling job: long enough to outlast every measurement.
    let job = c.submit(
        &key,
        &sha,
        1_000_000,
        &["--steps", "100", "--shard-size", "10"],
    );
    while c.status(&key, &job)["samples_done"].as_u64().unwrap() == 0 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs = args.seconds.to_string();
    let conns = args.connections.to_string();
    let idle = rate_during(&c, &job, || {
        std::thread::sleep(Duration::from_secs(args.seconds))
    });
    println!(
        "sampling job unloaded: {idle:.1} samples/s (fixture model, L = 24, 100 steps, worker on CPU 0)"
    );
    let auth = format!("Authorization: Bearer {key}");
    let base = c.api_url.clone();
    let mut rows = Vec::new();
    for (name, path) in [
        ("GET /v1/jobs/{id}", format!("/v1/jobs/{job}")),
        ("GET /v1/jobs?limit=50", "/v1/jobs?limit=50".to_string()),
        ("GET /v1/batches/{id}", format!("/v1/batches/{batch}")),
    ] {
        let url = format!("{base}{path}");
        let mut f = None;
        let rate = rate_during(&c, &job, || {
            f = Some(wrk(&[
                "-t1",
                "-c",
                &conns,
                "-d",
                &format!("{secs}s"),
                "--latency",
                "-H",
                &auth,
                &url,
            ]))
        });
        rows.push((name.to_string(), conns.clone(), f.unwrap(), rate));
    }
    // Submissions: POST /v1/jobs of one-sample jobs, 8 connections.
    let script = c.dir.path().join("post.lua");
    let body = serde_json::json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": 1, "steps": 1, "priority": "bulk"});
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = [[{body}]]\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .unwrap();
    let url = format!("{base}/v1/jobs");
    let mut f = None;
    let post_secs = (args.seconds / 3).max(5).to_string();
    let rate = rate_during(&c, &job, || {
        f = Some(wrk(&[
            "-t1",
            "-c",
            "8",
            "-d",
            &format!("{post_secs}s"),
            "--latency",
            "-H",
            &auth,
            "-s",
            script.to_str().unwrap(),
            &url,
        ]))
    });
    rows.push(("POST /v1/jobs".into(), "8".into(), f.unwrap(), rate));

    println!(
        "\n| route | connections | requests/s | p50 ms | p99 ms | sampling samples/s | vs unloaded | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, conns, f, rate) in &rows {
        println!(
            "| `{name}` | {conns} | {:.0} | {:.2} | {:.2} | {rate:.1} | {:.2} | {} |",
            f.rps,
            f.p50_ms,
            f.p99_ms,
            rate / idle,
            if f.errors.is_empty() {
                "none"
            } else {
                &f.errors
            }
        );
    }
    println!(
        "\n{} s per read route, {post_secs} s of submissions; unloaded sampling {idle:.1} samples/s",
        args.seconds
    );
    for &pid in &servers {
        pin(pid, "0-1");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    drop((api, coordinator, worker));
    rt.block_on(c.cleanup());
}
