//! The scale benchmark: what the control plane costs at the sizes the README
//! promises, on `digctl api`, `coordinator` and workers with RabbitMQ, Redis
//! and SeaweedFS on this machine (fixture model, L = 24, one libtorch
//! thread per worker).
//!
//! 1. Two 10 000-entry batches of one-sample jobs (two tenants, 2 steps):
//!    submission time of each, until every job id is taken off the jobs
//!    queue, until both batches succeeded; then the first tenant's listing
//!    paged through (`GET /v1/jobs?limit=500`), a batch view, and the
//!    coordinator's `dig_jobs` scrape.
//! 2. A 10^6-sample job in shards of 1000 (1 step: the samples are real,
//!    sampled by the workers, but cheap): submission, first shard, all
//!    samples recorded, succeeded (manifest of 1000 shards written), the
//!    manifest's read (`GET /v1/jobs/{id}/results`), and `digctl fetch`
//!    killed part-way and run again (it keeps verified shards).
//!
//! Each phase prints its times and the peak RSS of every service and of
//! the servers, and Redis `used_memory`.
//!
//! ```sh
//! make bench-scale ARGS="--entries 10000 --big-samples 1000000"
//! ```

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use dig_tests::cluster::{http_get, parse_metrics, Cluster, Service, SEQUENCE};
use serde_json::{json, Value};

/// Control-plane times and memory at 2 x 10 000 jobs and a 10^6-sample job.
#[derive(Parser)]
struct Args {
    /// Entries of each of the two batches.
    #[arg(long, default_value_t = 10_000)]
    entries: usize,
    /// Samples of the big job.
    #[arg(long, default_value_t = 1_000_000)]
    big_samples: u64,
    /// Samples per shard of the big job.
    #[arg(long, default_value_t = 1000)]
    big_shard: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Skip the batches.
    #[arg(long)]
    skip_batches: bool,
    /// Skip the big job.
    #[arg(long)]
    skip_big: bool,
}

/// Peak RSS per process and peak Redis `used_memory`, sampled every 250 ms.
struct Probe {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<BTreeMap<String, u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn redis_used_memory(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(conn)
        .expect("redis INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn redis_conn() -> redis::Connection {
    redis::Client::open(std::env::var("DIG_TEST_REDIS").expect("DIG_TEST_REDIS"))
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Redis, RabbitMQ (beam.smp) and SeaweedFS processes of this machine.
fn server_pids() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for (name, pattern) in [
        ("redis", "redis-server"),
        ("rabbitmq", "beam.smp"),
        ("seaweedfs", "weed mini"),
    ] {
        let o = Command::new("pgrep")
            .args(["-f", pattern])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&o.stdout).lines() {
            if let Ok(pid) = pid.trim().parse() {
                out.push((name.to_string(), pid));
            }
        }
    }
    out
}

impl Probe {
    fn start(pids: Vec<(String, u32)>) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, p) = (stop.clone(), peaks.clone());
        let thread = std::thread::spawn(move || {
            let mut conn = redis_conn();
            while !s.load(Ordering::Relaxed) {
                let mut sample: BTreeMap<String, u64> = BTreeMap::new();
                for (name, pid) in &pids {
                    if let Some(kib) = rss_kib(*pid) {
                        *sample.entry(format!("RSS {name}")).or_default() += kib * 1024;
                    }
                }
                sample.insert("Redis used_memory".into(), redis_used_memory(&mut conn));
                let mut peaks = p.lock().unwrap();
                for (k, v) in sample {
                    let e = peaks.entry(k).or_insert(0);
                    *e = (*e).max(v);
                }
                drop(peaks);
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Probe {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peaks.
    fn finish(mut self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peaks.lock().unwrap().clone()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn print_memory(peaks: &BTreeMap<String, u64>) {
    for (k, v) in peaks {
        println!("  peak {k:<26} {}", mib(*v));
    }
}

/// The longest commands in Redis's SLOWLOG (over 10 ms) since its reset.
fn print_slowest(redis: &mut redis::Connection) {
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1000)
        .query(redis)
        .unwrap();
    let mut slow: Vec<(u64, String)> = entries
        .iter()
        .filter_map(|e| {
            let redis::Value::Array(fields) = e else {
                return None;
            };
            let micros = match fields.get(2)? {
                redis::Value::Int(us) => *us as u64,
                _ => return None,
            };
            let command = match fields.get(3)? {
                redis::Value::Array(args) => args
                    .iter()
                    .take(4)
                    .map(|a| match a {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b)
                            .chars()
                            .take(24)
                            .collect::<String>(),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            };
            Some((micros, command))
        })
        .collect();
    slow.sort_by_key(|s| std::cmp::Reverse(s.0));
    println!("  Redis commands over 10 ms: {}", slow.len());
    for (us, command) in slow.iter().take(3) {
        println!("    {:.1} ms  {command}", *us as f64 / 1000.0);
    }
}

fn post(c: &Cluster, key: &str, path: &str, body: &Value) -> (Duration, Value) {
    let t = Instant::now();
    let (status, text) = c.api_post(key, path, body);
    let took = t.elapsed();
    assert!(
        status == 202,
        "POST {path}: {status} {}",
        &text[..text.len().min(2000)]
    );
    (took, serde_json::from_str(&text).unwrap())
}

/// `GET path` timed: the median of `n` and the last body.
fn timed_get(c: &Cluster, key: &str, path: &str, n: usize) -> (Duration, String) {
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..n {
        let t = Instant::now();
        let (status, b) = c.api_get(key, path);
        times.push(t.elapsed());
        assert_eq!(status, 200, "GET {path}: {}", &b[..b.len().min(2000)]);
        body = b;
    }
    times.sort();
    (times[n / 2], body)
}

fn final_state(v: &Value) -> bool {
    matches!(
        v["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

fn batches(
    c: &Cluster,
    rt: &tokio::runtime::Runtime,
    coordinator: &mut Service,
    pids: &[(String, u32)],
    entries: usize,
) {
    println!("\n== two batches of {entries} one-sample jobs (2 steps) ==");
    let sha_a = c.upload_features(&c.key_a);
    let sha_b = c.upload_features(&c.key_b);
    let batch_body = |sha: &str, name: &str| {
        let jobs: Vec<Value> = (0..entries)
            .map(|i| {
                json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": 1,
                       "seed": i, "steps": 2, "shard_size": 1})
            })
            .collect();
        json!({"name": name, "jobs": jobs})
    };
    let (body_a, body_b) = (batch_body(&sha_a, "scale-a"), batch_body(&sha_b, "scale-b"));
    let mut redis = redis_conn();
    let redis_before = redis_used_memory(&mut redis);
    // Redis runs one command at a time: the longest (SLOWLOG keeps those
    // over 10 ms) is how long every other client waited at worst.
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut redis)
        .unwrap();
    let probe = Probe::start(pids.to_vec());
    let start = Instant::now();
    let (took_a, sub_a) = post(c, &c.key_a, "/v1/batches", &body_a);
    let (took_b, sub_b) = post(c, &c.key_b, "/v1/batches", &body_b);
    let redis_submitted = redis_used_memory(&mut redis);
    println!(
        "  submit batch a (lab-a)       {} ({:.0} entries/s)",
        secs(took_a),
        entries as f64 / took_a.as_secs_f64()
    );
    println!(
        "  submit batch b (lab-b)       {} ({:.0} entries/s)",
        secs(took_b),
        entries as f64 / took_b.as_secs_f64()
    );
    let ids = [
        sub_a["id"].as_str().unwrap().to_string(),
        sub_b["id"].as_str().unwrap().to_string(),
    ];
    let keys = [c.key_a.clone(), c.key_b.clone()];

    // Until every id is taken off the jobs queue (activated, or being
    // activated) and both batches succeeded, with a portal's batch reads.
    let backends = rt.block_on(c.backends());
    let mut activated = None;
    let mut view_times = Vec::new();
    let mut done = [None, None];
    let deadline = Instant::now() + Duration::from_secs(3600);
    while done.iter().any(Option::is_none) {
        if activated.is_none() && rt.block_on(backends.queue.jobs_queue_depth()).unwrap() == 0 {
            activated = Some(start.elapsed());
        }
        for i in 0..2 {
            if done[i].is_some() {
                continue;
            }
            let t = Instant::now();
            let (status, text) = c.api_get(&keys[i], &format!("/v1/batches/{}", ids[i]));
            view_times.push(t.elapsed());
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            if final_state(&v) {
                assert_eq!(v["state"], "succeeded", "{}", v["jobs_by_state"]);
                assert_eq!(v["jobs_by_state"]["succeeded"], entries as u64);
                done[i] = Some(start.elapsed());
            }
        }
        assert!(Instant::now() < deadline, "the batches did not finish");
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "  jobs queue drained after     {}",
        secs(activated.unwrap_or_default())
    );
    let all = done.iter().flatten().max().copied().unwrap();
    println!(
        "  batch a succeeded after      {}\n  batch b succeeded after      {}",
        secs(done[0].unwrap()),
        secs(done[1].unwrap())
    );
    println!(
        "  {} jobs in {} : {:.1} jobs/s end to end",
        2 * entries,
        secs(all),
        (2 * entries) as f64 / all.as_secs_f64()
    );
    view_times.sort();
    println!(
        "  GET /v1/batches/{{id}} while running: median {} max {} ({} reads)",
        secs(view_times[view_times.len() / 2]),
        secs(*view_times.last().unwrap()),
        view_times.len()
    );
    let peaks = probe.finish();

    // The listing, paged through.
    let t = Instant::now();
    let mut cursor: Option<String> = None;
    let (mut listed, mut pages) = (0usize, 0usize);
    loop {
        let path = match &cursor {
            Some(cur) => format!("/v1/jobs?limit=500&cursor={cur}"),
            None => "/v1/jobs?limit=500".to_string(),
        };
        let (status, text) = c.api_get(&c.key_a, &path);
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        listed += v["jobs"].as_array().unwrap().len();
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let listing = t.elapsed();
    assert_eq!(listed, entries, "lab-a's listing");
    println!(
        "  GET /v1/jobs?limit=500 x {pages} pages ({listed} jobs): {} ({} per page)",
        secs(listing),
        secs(listing / pages as u32)
    );
    let (view, _) = timed_get(c, &c.key_a, &format!("/v1/batches/{}", ids[0]), 5);
    println!("  GET /v1/batches/{{id}} finished: median {}", secs(view));
    // The coordinator's gauges refresh every few seconds: read until they
    // count every job.
    let addr = coordinator.metrics_addr();
    let (mut scrape, mut succeeded) = (Duration::ZERO, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while succeeded != Some((2 * entries) as f64) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let (_, text) = http_get(&addr, "/metrics").expect("coordinator metrics");
        scrape = t.elapsed();
        succeeded = parse_metrics(&text)
            .into_iter()
            .find(|(n, l, _)| {
                n == "dig_jobs" && l.iter().any(|(k, v)| k == "state" && v == "succeeded")
            })
            .map(|(_, _, v)| v);
    }
    println!(
        "  coordinator /metrics scrape  {} (dig_jobs{{state=\"succeeded\"}} = {})",
        secs(scrape),
        succeeded.unwrap_or(f64::NAN)
    );
    println!(
        "  Redis used_memory: before {}, after submission {}, end {}",
        mib(redis_before),
        mib(redis_submitted),
        mib(redis_used_memory(&mut redis))
    );
    print_memory(&peaks);
    print_slowest(&mut redis);
}

fn big_job(c: &Cluster, pids: &[(String, u32)], samples: u64, shard: u64) {
    let shards = samples.div_ceil(shard);
    println!("\n== one job of {samples} samples in {shards} shards of {shard} (1 step) ==");
    let sha = c.upload_features(&c.key_a);
    let probe = Probe::start(pids.to_vec());
    let (took, sub) = post(
        c,
        &c.key_a,
        "/v1/jobs",
        &json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": samples,
                "seed": 1, "steps": 1, "shard_size": shard}),
    );
    let start = Instant::now();
    let job = sub["id"].as_str().unwrap().to_string();
    println!("  submit                       {}", secs(took));
    let (mut first, mut all_recorded) = (None, None);
    let mut last_print = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(7200);
    let view = loop {
        let v = c.status(&c.key_a, &job);
        let done = v["samples_done"].as_u64().unwrap();
        if done > 0 && first.is_none() {
            first = Some(start.elapsed());
        }
        if done == samples && all_recorded.is_none() {
            all_recorded = Some(start.elapsed());
        }
        if final_state(&v) {
            break v;
        }
        if last_print.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "  ... {done} of {samples} samples after {}",
                secs(start.elapsed())
            );
            last_print = Instant::now();
        }
        assert!(Instant::now() < deadline, "the job did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let ended = start.elapsed();
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["shards"]["done"], shards);
    let peaks = probe.finish();
    println!("  first shard recorded after   {}", secs(first.unwrap()));
    let all_recorded = all_recorded.unwrap_or(ended);
    println!(
        "  all samples recorded after   {} ({:.0} samples/s)",
        secs(all_recorded),
        samples as f64 / all_recorded.as_secs_f64()
    );
    println!(
        "  succeeded (manifest of {shards} shards written) {} later",
        secs(ended.saturating_sub(all_recorded))
    );
    let (read, manifest) = timed_get(c, &c.key_a, &format!("/v1/jobs/{job}/results"), 5);
    println!(
        "  GET /v1/jobs/{{id}}/results   median {} ({} bytes)",
        secs(read),
        manifest.len()
    );
    let (status_read, _) = timed_get(c, &c.key_a, &format!("/v1/jobs/{job}"), 5);
    println!(
        "  GET /v1/jobs/{{id}}           median {}",
        secs(status_read)
    );
    print_memory(&peaks);

    // `digctl fetch`, killed once half the shards are in, then again.
    let out = c.dir.path().join("fetched");
    let shards_dir = out.join("shards");
    let fetch = || {
        let mut cmd = Command::new(dig_tests::digctl_path());
        cmd.args(["fetch", &job, "--out", out.to_str().unwrap()])
            .env("DIG_API_URL", &c.api_url)
            .env("DIG_API_KEY", &c.key_a)
            .env("DIG_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    };
    let count = || {
        std::fs::read_dir(&shards_dir)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".npz"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    let t = Instant::now();
    let mut child = fetch().spawn().unwrap();
    while count() < (shards / 2) as usize {
        assert!(
            child.try_wait().unwrap().is_none(),
            "fetch ended before it was interrupted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first_part = t.elapsed();
    let had = count();
    assert!(!out.join("manifest.json").exists());
    let t = Instant::now();
    let status = fetch().status().unwrap();
    let resumed = t.elapsed();
    assert!(status.success(), "the resumed fetch failed");
    assert_eq!(count(), shards as usize);
    assert!(out.join("manifest.json").is_file());
    let bytes: u64 = std::fs::read_dir(&shards_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let t = Instant::now();
    assert!(fetch().status().unwrap().success());
    let again = t.elapsed();
    println!(
        "  digctl fetch: SIGKILL after {} with {had} of {shards} shards; resumed run {} \
         ({} in all, {:.0} MiB/s); a third run (all present, verified) {}",
        secs(first_part),
        secs(resumed),
        mib(bytes),
        bytes as f64 / (1 << 20) as f64 / (first_part + resumed).as_secs_f64(),
        secs(again)
    );
}

fn main() {
    let args = Args::parse();
    std::env::set_var("OMP_NUM_THREADS", "1");
    let mut c = Cluster::distributed("scale");
    c.set_env("DIG_WORKER_BATCH_SIZE", &args.big_shard.to_string());
    c.upload_model();
    let api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let workers: Vec<Service> = (0..args.workers).map(|_| c.start_worker()).collect();
    let mut pids: Vec<(String, u32)> = vec![
        ("api".into(), api.pid()),
        ("coordinator".into(), coordinator.pid()),
    ];
    for w in &workers {
        pids.push(("workers (sum)".into(), w.pid()));
    }
    pids.extend(server_pids());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "scale bench: digctl api, coordinator, {} workers (1 thread each); RabbitMQ, Redis, SeaweedFS on this machine",
        args.workers
    );
    if !args.skip_batches {
        batches(&c, &rt, &mut coordinator, &pids, args.entries);
    }
    if !args.skip_big {
        big_job(&c, &pids, args.big_samples, args.big_shard);
    }
    drop((api, coordinator, workers));
    rt.block_on(c.cleanup());
}
