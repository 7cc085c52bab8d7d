//! Many workers, one queue: five real `free-roam worker` processes share one Redis and 40
//! jobs. Every job runs exactly once, to completion, on one worker at a time; no worker runs
//! more than MAX_CONCURRENT_STREAMS; the load spreads; a worker started mid-run takes work
//! at once; and the fleet takes jobs oldest first.
//!
//! The story is read back from `{fr}:events`, which the claim and finish functions append
//! to inside Redis, so its order is the order Redis ran them in.

use crate::common::process::{feed_frames, http_get, signal, wait_ready, worker};
use crate::common::{TestRedis, free_port, unique_prefix, wait_until};
use free_roam::store::keys::Keys;
use std::collections::HashMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const JOBS: usize = 40;
const CAPACITY: usize = 3;
/// Each job runs this long: long enough that every worker is full while jobs wait.
const JOB_SECONDS: &str = "1.5";

struct FleetWorker {
    id: String,
    port: u16,
    child: Child,
}

fn start(redis: &TestRedis, prefix: &str, id: &str) -> FleetWorker {
    let port = free_port();
    let capacity = CAPACITY.to_string();
    let child = worker(
        redis,
        prefix,
        port,
        &[
            ("WORKER_ID", id),
            ("MAX_CONCURRENT_STREAMS", capacity.as_str()),
            // No lease runs out in this test: a job that ran twice would be a bug.
            ("JOB_LEASE_MS", "60000"),
        ],
    );
    FleetWorker {
        id: id.to_string(),
        port,
        child,
    }
}

/// One job lifecycle transition from the events stream.
#[derive(Debug)]
struct Transition {
    job: String,
    to: String,
    worker: String,
    time_ms: i64,
}

fn transitions(redis: &TestRedis, keys: &Keys) -> Vec<Transition> {
    redis
        .xrange(&keys.events())
        .into_iter()
        .filter(|(_, f)| f.get("kind").map(String::as_str) == Some("job"))
        .map(|(_, f)| Transition {
            job: f["job_id"].clone(),
            to: f["to"].clone(),
            worker: f["worker"].clone(),
            time_ms: f["time_ms"].parse().unwrap(),
        })
        .collect()
}

fn started(redis: &TestRedis, keys: &Keys) -> Vec<Transition> {
    transitions(redis, keys)
        .into_iter()
        .filter(|t| t.to == "running")
        .collect()
}

fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn five_workers_share_forty_jobs_each_run_once_oldest_first() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let keys = Keys::new(&prefix);
    // Frames for every job to read; the jobs end on max_duration_s.
    feed_frames(&redis, "cam:fleet", 5_000_000, 30);

    let mut fleet: Vec<FleetWorker> = (1..=4)
        .map(|i| start(&redis, &prefix, &format!("w{i}")))
        .collect();
    for w in &fleet {
        wait_ready(w.port);
    }

    // Watch every worker's own count of running jobs while the fleet works.
    let watching = Arc::new(AtomicBool::new(true));
    let most_running = Arc::new(Mutex::new(HashMap::<u16, usize>::new()));
    let watched = Arc::new(Mutex::new(
        fleet.iter().map(|w| w.port).collect::<Vec<u16>>(),
    ));
    let watcher = {
        let (watching, most_running, watched) =
            (watching.clone(), most_running.clone(), watched.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                let ports = watched.lock().unwrap().clone();
                for port in ports {
                    if let Some((200, body)) = http_get(port, "/health") {
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                        let running = v["jobs"]["running"].as_u64().unwrap() as usize;
                        let mut most = most_running.lock().unwrap();
                        let m = most.entry(port).or_default();
                        *m = (*m).max(running);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // 40 jobs pushed in one go, in order: job-00 is the oldest.
    let job_ids: Vec<String> = (0..JOBS).map(|i| format!("job-{i:02}")).collect();
    {
        let mut con = redis.client().get_connection().unwrap();
        let mut pipe = redis::pipe();
        for id in &job_ids {
            pipe.cmd("XADD")
                .arg(keys.jobs())
                .arg("*")
                .arg("stream_ref")
                .arg("cam:fleet")
                .arg("fps")
                .arg(2)
                .arg("max_duration_s")
                .arg(JOB_SECONDS)
                .arg("job_id")
                .arg(id)
                .ignore();
        }
        pipe.query::<()>(&mut con).unwrap();
    }

    // Once the four workers are full, a fifth one joins and takes work at once.
    wait_until(Duration::from_secs(30), || {
        started(&redis, &keys).len() >= 4 * CAPACITY
    });
    let spawned_at = free_roam::store::now_ms();
    let fifth = start(&redis, &prefix, "w5");
    wait_ready(fifth.port);
    let ready_at = free_roam::store::now_ms();
    watched.lock().unwrap().push(fifth.port);
    let waiting_when_ready: u64 = {
        let len: u64 = redis.cmd(&["XLEN", &keys.jobs()]);
        let pending: redis::Value = redis.cmd(&["XPENDING", &keys.jobs(), "workers"]);
        let pending: u64 = match pending {
            redis::Value::Array(parts) => redis::from_redis_value(parts[0].clone()).unwrap(),
            other => panic!("XPENDING summary: {other:?}"),
        };
        len - pending
    };
    assert!(
        waiting_when_ready > 0,
        "jobs were waiting when the fifth worker became ready"
    );
    wait_until(Duration::from_secs(10), || {
        started(&redis, &keys).iter().any(|t| t.worker == "w5")
    });
    let first_take = started(&redis, &keys)
        .into_iter()
        .find(|t| t.worker == "w5")
        .unwrap()
        .time_ms;
    eprintln!(
        "the fifth worker took its first job {} ms after it started (seen ready at {} ms)",
        first_take - spawned_at,
        ready_at - spawned_at
    );
    // Ready is polled every 50 ms, so the first claim may come before it is seen.
    assert!(
        first_take - ready_at < 2000,
        "a new worker takes waiting work at once: {} ms after it was ready",
        first_take - ready_at
    );
    fleet.push(fifth);

    // Mid-run, the queue gauges on /metrics add up to the stream's length.
    let (_, text) = http_get(fleet[0].port, "/metrics").unwrap();
    let waiting = metric(&text, "freeroam_queue_jobs{state=\"waiting\"}").unwrap();
    let running = metric(&text, "freeroam_queue_jobs{state=\"running\"}").unwrap();
    assert!(running <= (5 * CAPACITY) as u64, "{text}");
    assert!(waiting + running <= JOBS as u64);

    // Every job ends, completed, and the queue is empty.
    let t = Instant::now();
    wait_until(Duration::from_secs(60), || {
        transitions(&redis, &keys)
            .iter()
            .filter(|t| t.to == "completed")
            .count()
            == JOBS
    });
    eprintln!(
        "the last job ended {:.1} s after the fifth worker started",
        t.elapsed().as_secs_f64()
    );
    wait_until(Duration::from_secs(10), || {
        redis.cmd::<u64>(&["XLEN", &keys.jobs()]) == 0
    });
    watching.store(false, Ordering::Relaxed);
    watcher.join().unwrap();

    let story = transitions(&redis, &keys);
    // Exactly once, to completion, on one worker: one start and one end per job, by the
    // same worker, and one attempt.
    for id in &job_ids {
        let mine: Vec<&Transition> = story.iter().filter(|t| &t.job == id).collect();
        let tos: Vec<&str> = mine.iter().map(|t| t.to.as_str()).collect();
        assert_eq!(tos, ["running", "completed"], "{id}: {mine:?}");
        assert_eq!(mine[0].worker, mine[1].worker, "{id} ran on one worker");
        let hash = redis.hgetall(&keys.job(id));
        assert_eq!(hash["status"], "completed", "{id}");
        assert_eq!(hash["attempts"], "1", "{id} was delivered once");
        let results = redis.xrange(&keys.results(id));
        let end = results.last().expect("an end entry");
        assert_eq!(end.1["kind"], "end", "{id}");
        assert_eq!(end.1["status"], "completed", "{id}");
    }

    // No worker over capacity, in Redis's own order of events and in each worker's count.
    let mut running: HashMap<&str, usize> = HashMap::new();
    let mut jobs_per_worker: HashMap<&str, usize> = HashMap::new();
    for t in &story {
        let n = running.entry(t.worker.as_str()).or_default();
        match t.to.as_str() {
            "running" => {
                *n += 1;
                assert!(*n <= CAPACITY, "{} ran {} jobs at once", t.worker, n);
                *jobs_per_worker.entry(t.worker.as_str()).or_default() += 1;
            }
            "completed" => *n -= 1,
            other => panic!("unexpected transition to {other}: {t:?}"),
        }
    }
    let most_running = most_running.lock().unwrap();
    for (port, most) in most_running.iter() {
        assert!(
            *most <= CAPACITY,
            "worker on port {port} reported {most} running"
        );
    }

    // The load spreads: every worker, the late one too, ran a fair share.
    eprintln!("jobs per worker: {jobs_per_worker:?}");
    for w in &fleet {
        let n = jobs_per_worker.get(w.id.as_str()).copied().unwrap_or(0);
        assert!(n >= CAPACITY, "{} ran only {n} of {JOBS} jobs", w.id);
    }
    assert!(
        most_running.values().filter(|m| **m == CAPACITY).count() >= 4,
        "the workers filled up: {most_running:?}"
    );

    // Oldest first across the fleet: a job never starts after a younger one, beyond the
    // moment it takes two workers' claims to reach Redis (a job runs 1.5 s, so taking jobs
    // in any other order would show up as whole seconds).
    let start_of: HashMap<&str, i64> = story
        .iter()
        .filter(|t| t.to == "running")
        .map(|t| (t.job.as_str(), t.time_ms))
        .collect();
    let order: Vec<i64> = job_ids.iter().map(|id| start_of[id.as_str()]).collect();
    let mut inversions = Vec::new();
    for i in 0..JOBS {
        for j in i + 1..JOBS {
            if order[i] > order[j] + 300 {
                inversions.push((i, j, order[i] - order[j]));
            }
        }
    }
    assert!(
        inversions.is_empty(),
        "older jobs started after younger ones (older, younger, ms): {inversions:?}"
    );
    eprintln!(
        "start order: {:?}",
        job_ids
            .iter()
            .map(|id| start_of[id.as_str()] - order[0])
            .collect::<Vec<_>>()
    );

    for mut w in fleet {
        signal(&w.child, 15);
        assert!(w.child.wait().unwrap().success(), "{} exits 0", w.id);
    }
}
