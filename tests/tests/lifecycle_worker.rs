//! Workers in a job's and their own lifecycle, end to end: `digctl api`,
//! `digctl coordinator` and `digctl worker` processes on the real RabbitMQ,
//! Redis and SeaweedFS.
//!
//! - A job cancelled mid-run (`digctl cancel`) stops its workers: shards
//!   queued are skipped, shards in progress stop at a batch boundary, no
//!   shard object appears afterwards, and what was written before is intact
//!   (each shard its planned indices, bit-identical to `digctl sample`).
//! - A worker sent SIGTERM mid-shard (a rolling restart) lets the shard run
//!   for its grace, then stops it, requeues it and exits 0; another worker
//!   finishes the job with every sample exactly once, as a local run.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dig_common::job::JobId;
use dig_common::progress::ProgressStore;
use dig_common::queue::ShardQueue;
use dig_tests::cluster::{
    assert_same_samples, assert_samples_within, local_sample, Cluster, Service, SEQUENCE,
};

/// These tests run several processes that each want both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BATCH: usize = 5; // DIG_WORKER_BATCH_SIZE of every Cluster

/// One test at a time, and one libtorch thread per process: the services
/// and `digctl sample` of a test share two cores, where OpenMP threads
/// waiting for each other spin and make sampling ten times slower. (The
/// thread count changes no result: the local run uses the same.)
fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Inherited by every process the test starts.
    std::env::set_var("OMP_NUM_THREADS", "1");
    guard
}

/// Progress notes on stderr (shown for a failing test), with the time.
fn note(start: Instant, what: &str) {
    eprintln!("[{:6.1} s] {what}", start.elapsed().as_secs_f64());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn logs(svcs: &[&Service]) -> String {
    svcs.iter()
        .map(|s| format!("--- {}:\n{}", s.name, s.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Panics with the logs if one of `svcs` has exited.
fn assert_running(svcs: &mut [&mut Service]) {
    for s in svcs.iter_mut() {
        if let Some(status) = s.exited() {
            panic!("{} exited ({status}); log:\n{}", s.name, s.log());
        }
    }
}

/// Waits until `n` workers beat (so all of them are consuming).
fn wait_for_workers(c: &Cluster, rt: &tokio::runtime::Runtime, n: usize, svcs: &[&Service]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    rt.block_on(async {
        let b = c.backends().await;
        while b.workers().await.len() < n {
            assert!(
                Instant::now() < deadline,
                "workers did not start; logs:\n{}",
                logs(svcs)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn a_cancelled_job_stops_its_workers_and_keeps_what_they_finished() {
    let _serial = serial();
    let rt = runtime();
    let t0 = Instant::now();
    let mut c = Cluster::distributed("cancel");
    c.upload_model();
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let mut w1 = c.start_worker();
    let mut w2 = c.start_worker();
    wait_for_workers(&c, &rt, 2, &[&w1, &w2]);
    note(t0, "services up");

    let sha = c.upload_features(&c.key_a);
    // 20 shards of 4 batches: far more work than is done before the cancel.
    let (num, shard_size, seed, steps) = (400u64, 20u64, 7u64, 60u64);
    let job = c.submit(
        &c.key_a,
        &sha,
        num,
        &[
            "--seed",
            &seed.to_string(),
            "--steps",
            &steps.to_string(),
            "--shard-size",
            &shard_size.to_string(),
        ],
    );
    let id: JobId = job.parse().unwrap();
    let num_shards = (num / shard_size) as usize;

    // Cancel once a few shards are done.
    rt.block_on(async {
        let b = c.backends().await;
        let deadline = Instant::now() + Duration::from_secs(600);
        while b.progress.done_shards(id).await.unwrap().len() < 3 {
            assert_running(&mut [&mut api, &mut coordinator, &mut w1, &mut w2]);
            assert!(Instant::now() < deadline, "no 3 shards done in time");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    note(t0, "3 shards done; cancelling");
    let answer = c.client_ok(&c.key_a, &["cancel", &job]);
    assert!(answer.contains("cancelled"), "{answer}");
    let done_at_cancel = rt.block_on(async {
        let b = c.backends().await;
        b.progress.done_shards(id).await.unwrap()
    });
    assert!(
        done_at_cancel.len() < num_shards,
        "the job finished before the cancel; it needs more work"
    );

    // The workers settle what they hold: both idle and the queue empty
    // (the shards published before the cancel were skipped).
    rt.block_on(async {
        let b = c.backends().await;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let beats = b.workers().await;
            let idle = beats.len() == 2 && beats.iter().all(|w| w.shard.is_none());
            if idle && b.queue.shard_queue_depth().await.unwrap() == 0 {
                break;
            }
            assert_running(&mut [&mut api, &mut coordinator, &mut w1, &mut w2]);
            assert!(
                Instant::now() < deadline,
                "workers still busy after the cancel: {beats:?}; logs:\n{}",
                logs(&[&w1, &w2])
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    note(t0, "workers idle, queue empty");
    let shard_objects = |c: &Cluster| {
        rt.block_on(async {
            let b = c.backends().await;
            b.objects()
                .await
                .into_iter()
                .filter(|k| k.contains(&format!("jobs/{job}/shards/")))
                .collect::<Vec<_>>()
        })
    };
    let settled = shard_objects(&c);
    // Nothing is written once the workers settled: a window for a late
    // shard object to show (nothing signals one that does not come).
    std::thread::sleep(Duration::from_secs(5));
    let later = shard_objects(&c);
    assert_eq!(settled, later, "shard objects appeared after the cancel");
    // At most the shards in progress at the cancel could still complete.
    assert!(
        later.len() <= done_at_cancel.len() + 2,
        "{} shards at the cancel, {} objects now",
        done_at_cancel.len(),
        later.len()
    );
    assert!(later.len() >= done_at_cancel.len());

    let view = c.status(&c.key_a, &job);
    assert_eq!(view["state"], "cancelled", "{view}");
    assert_eq!(
        view["samples_done"],
        later.len() as u64 * shard_size,
        "{view}"
    );
    // Both workers skipped or stopped the cancelled job's shards, and are
    // still up.
    assert_running(&mut [&mut api, &mut coordinator, &mut w1, &mut w2]);
    let worker_logs = logs(&[&w1, &w2]);
    assert!(
        worker_logs.contains("job has ended"),
        "no shard was skipped or stopped; logs:\n{worker_logs}"
    );

    // What was written is whole and right: each shard its planned indices,
    // each sample as the local run has it; done set and objects agree.
    let (shards, done, parked) = rt.block_on(async {
        let b = c.backends().await;
        (
            b.shard_ensembles(&job, SEQUENCE).await,
            b.progress.done_shards(id).await.unwrap(),
            b.queue.parked_depth().await.unwrap(),
        )
    });
    assert_eq!(parked, 0);
    let indices: Vec<u64> = shards.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, done, "objects and the done set disagree");
    for (i, e) in &shards {
        let planned: Vec<i64> = ((i * shard_size) as i64..((i + 1) * shard_size) as i64).collect();
        assert_eq!(e.sample_index, planned, "shard {i}");
    }
    let upto = (indices.last().unwrap() + 1) * shard_size;
    note(
        t0,
        &format!("{} shards written; local reference run", indices.len()),
    );
    let reference = local_sample(c.dir.path(), upto, seed, steps, BATCH);
    note(t0, "reference done");
    let ensembles: Vec<_> = shards.into_iter().map(|(_, e)| e).collect();
    let samples = assert_samples_within(&ensembles, &reference);
    assert_eq!(samples as u64, indices.len() as u64 * shard_size);
    drop((api, coordinator, w1, w2));
    rt.block_on(c.cleanup());
}

#[test]
fn a_worker_terminated_mid_shard_requeues_it_exits_0_and_another_finishes_the_job() {
    let _serial = serial();
    let rt = runtime();
    let t0 = Instant::now();
    let mut c = Cluster::distributed("term");
    let grace = 2;
    c.set_env("DIG_WORKER_SHUTDOWN_GRACE_SECS", &grace.to_string());
    c.upload_model();
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let mut victim = c.start_worker();
    wait_for_workers(&c, &rt, 1, &[&victim]);
    note(t0, "services up");

    let sha = c.upload_features(&c.key_a);
    // Shards of 8 batches of 200 steps: seconds longer than the grace.
    let (num, seed, steps) = (80u64, 3u64, 200u64);
    let job = c.submit(
        &c.key_a,
        &sha,
        num,
        &[
            "--seed",
            &seed.to_string(),
            "--steps",
            &steps.to_string(),
            "--shard-size",
            "40",
        ],
    );
    let id: JobId = job.parse().unwrap();
    // SIGTERM as soon as the heartbeat names a shard in progress.
    let shard = rt.block_on(async {
        let b = c.backends().await;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let beats = b.workers().await;
            if let Some(shard) = beats.first().and_then(|w| w.shard.clone()) {
                return shard;
            }
            assert_running(&mut [&mut api, &mut coordinator, &mut victim]);
            assert!(
                Instant::now() < deadline,
                "the worker never reported a shard; log:\n{}",
                victim.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let index: u64 = shard.rsplit('/').next().unwrap().parse().unwrap();
    note(t0, &format!("shard {index} in progress; SIGTERM"));
    // The grace, then at most one batch (slow on a loaded machine).
    let clean = victim.terminate(Duration::from_secs(grace + 300));
    let log = victim.log();
    assert!(
        clean,
        "the worker did not exit with status 0 in time; log:\n{log}"
    );
    let done_at_exit = rt.block_on(async {
        let b = c.backends().await;
        b.progress.done_shards(id).await.unwrap()
    });
    assert!(
        !done_at_exit.contains(&index),
        "shard {index} finished within the grace; the test needs longer shards; log:\n{log}"
    );
    assert!(
        log.contains("shutdown grace is over")
            && log.contains("requeued for another worker")
            && log.contains("worker exited cleanly"),
        "the worker did not report stopping and requeueing its shard; log:\n{log}"
    );

    note(t0, "the worker exited");
    let mut rescuer = c.start_worker();
    let done = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(900),
        &mut [&mut api, &mut coordinator, &mut rescuer],
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["samples_done"], num);
    assert_eq!(done["shards"]["failed"], 0, "{done}");
    let rescued = rescuer.log().lines().any(|l| {
        l.contains("shard done")
            && l.contains(&format!("job={job} shard={index} "))
            && l.contains("new=true")
    });
    assert!(
        rescued,
        "the requeued shard went nowhere; log:\n{}",
        rescuer.log()
    );
    note(t0, "job succeeded; local reference run");
    let shards = c.fetch(&c.key_a, &job);
    let reference = local_sample(c.dir.path(), num, seed, steps, BATCH);
    note(t0, "reference done");
    assert_same_samples(&shards, &reference);
    // The interrupted attempt was taken back: the rescuer's was the only
    // one counted, so this one is the second.
    let attempts = rt.block_on(async {
        let b = c.backends().await;
        b.progress.start_attempt(id, index).await.unwrap().started
    });
    assert_eq!(attempts, 2, "the interrupted attempt still counts");
    drop((api, coordinator, rescuer));
    rt.block_on(c.cleanup());
}
