//! The worker's peak memory when a frame-stream job resumes far behind its stream: a job
//! handed back (a rolling deploy) while its producer went on writing large raw frames. The
//! real `free-roam worker` binary, its `VmHWM` read from /proc before and after it catches
//! up. `FRAME_BACKLOG=WIDTHxHEIGHTxFRAMES` sizes the backlog (RELIABILITY.md has the figures
//! at 1080p); `FREE_ROAM_BIN` names another build of the binary to measure.

use crate::common::process::{WAIT, http_get, signal, wait_ready};
use crate::common::{TestRedis, free_port, unique_prefix, wait_until};
use free_roam::store::keys::Keys;
use std::process::{Child, Command, Stdio};

const KEY: &str = "frames:resume";
const DEFAULT_BACKLOG: (u32, u32, u32) = (640, 480, 300);

/// The backlog's frame size and length, from `FRAME_BACKLOG` or the default.
fn backlog() -> (u32, u32, u32) {
    let Ok(text) = std::env::var("FRAME_BACKLOG") else {
        return DEFAULT_BACKLOG;
    };
    let parts: Vec<u32> = text.split('x').map(|p| p.parse().unwrap()).collect();
    assert_eq!(
        parts.len(),
        3,
        "FRAME_BACKLOG=WIDTHxHEIGHTxFRAMES, got {text}"
    );
    (parts[0], parts[1], parts[2])
}

/// A worker with the null model, its output discarded.
fn worker(redis: &TestRedis, prefix: &str, health_port: u16) -> Child {
    let binary = std::env::var("FREE_ROAM_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_free-roam").to_string());
    Command::new(binary)
        .arg("worker")
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("KEY_PREFIX", prefix)
        .env("MODEL_TYPE", "null")
        .env("HEALTH_ADDR", format!("127.0.0.1:{health_port}"))
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the free-roam binary starts")
}

/// The process's peak resident memory so far, in bytes.
fn peak_rss(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("/proc/PID/status has VmHWM");
    kib * 1024
}

fn raw_frame(con: &mut redis::Connection, width: u32, height: u32, ts: i64) -> String {
    redis::cmd("XADD")
        .arg(KEY)
        .arg("*")
        .arg("data")
        .arg(vec![(ts % 251) as u8; (width * height * 3) as usize])
        .arg("width")
        .arg(width)
        .arg("height")
        .arg(height)
        .arg("format")
        .arg("rgb24")
        .arg("ts")
        .arg(ts)
        .query(con)
        .unwrap()
}

/// Waits until the job has written `n` results.
fn wait_results(redis: &TestRedis, keys: &Keys, job: &str, n: u64) {
    wait_until(WAIT * 4, || {
        redis.cmd::<u64>(&["XLEN", &keys.results(job)]) >= n
    });
}

#[test]
fn a_worker_resuming_far_behind_a_frame_stream_reads_a_few_frames_not_the_backlog() {
    let (width, height, frames) = backlog();
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let keys = Keys::new(&prefix);
    let mut con = redis.client().get_connection().unwrap();
    raw_frame(&mut con, width, height, 0);

    // The job runs on one worker, answers the first frame, and is handed back.
    let port = free_port();
    let mut first_worker = worker(&redis, &prefix, port);
    wait_ready(port);
    let _: String = redis::cmd("XADD")
        .arg(keys.jobs())
        .arg("*")
        .arg("stream_ref")
        .arg(KEY)
        .arg("fps")
        .arg(2)
        .arg("job_id")
        .arg("resume")
        .query(&mut con)
        .unwrap();
    wait_results(&redis, &keys, "resume", 1);
    signal(&first_worker, 15);
    assert!(first_worker.wait().unwrap().success());

    // The producer goes on at 30 fps while no worker runs the job.
    for i in 1..=i64::from(frames) {
        raw_frame(&mut con, width, height, i * 33);
    }
    let backlog_bytes = u64::from(width * height * 3) * u64::from(frames);

    let port = free_port();
    let mut second_worker = worker(&redis, &prefix, port);
    wait_ready(port);
    let ready = peak_rss(&second_worker);
    // Its first answer after the resume comes after the read that brought the backlog.
    wait_results(&redis, &keys, "resume", 2);
    let caught_up = peak_rss(&second_worker);
    let growth = caught_up.saturating_sub(ready);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "backlog {frames} frames of {width}x{height} rgb24 ({:.0} MiB): worker peak {:.0} MiB \
         when ready, {:.0} MiB after catching up (+{:.0} MiB)",
        mib(backlog_bytes),
        mib(ready),
        mib(caught_up),
        mib(growth)
    );
    assert!(
        http_get(port, "/health/live").is_some_and(|(c, _)| c == 200),
        "the worker is alive"
    );
    signal(&second_worker, 15);
    assert!(second_worker.wait().unwrap().success());
    assert!(
        growth < backlog_bytes / 4,
        "the worker grew by {:.0} MiB reading a backlog of {:.0} MiB",
        mib(growth),
        mib(backlog_bytes)
    );
}
