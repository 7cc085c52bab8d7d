//! The real `free-roam` binary as a child process: starting a worker against a test Redis,
//! reading its health endpoint over plain HTTP, signalling it, feeding a frame stream for
//! its jobs, and running the command line.

use super::{TestRedis, wait_until};
use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(30);

/// Starts `free-roam worker` with the null model; `extra` adds or overrides settings.
pub fn worker(redis: &TestRedis, prefix: &str, health_port: u16, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_free-roam"));
    cmd.arg("worker")
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("KEY_PREFIX", prefix)
        .env("MODEL_TYPE", "null")
        .env("HEALTH_ADDR", format!("127.0.0.1:{health_port}"))
        .env("RECLAIM_INTERVAL_MS", "200")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the free-roam binary starts")
}

/// A GET over a fresh connection: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.get(9..12)?.parse().ok()?;
    Some((
        code,
        buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    ))
}

/// The XADD of one raw 8x8 frame of a single `shade`, captured at `ts`, to a frame stream,
/// with `MAXLEN ~ maxlen` when given: the frame every test producer writes.
pub fn raw_frame_xadd(key: &str, maxlen: Option<usize>, shade: u8, ts: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key);
    if let Some(n) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*")
        .arg("data")
        .arg(vec![shade; 8 * 8 * 3])
        .arg("width")
        .arg(8)
        .arg("height")
        .arg(8)
        .arg("format")
        .arg("rgb24")
        .arg("ts")
        .arg(ts);
    cmd
}

/// Appends `n` raw 8x8 frames, 100 ms of capture time apart, to a frame stream.
pub fn feed_frames(redis: &TestRedis, key: &str, start_ts: i64, n: i64) {
    let mut con = redis.client().get_connection().unwrap();
    for i in 0..n {
        let _: String = raw_frame_xadd(key, None, (i % 255) as u8, start_ts + i * 100)
            .query(&mut con)
            .unwrap();
    }
}

/// Runs this test binary again as a child process for the one ignored test `test` (its
/// path in the binary, e.g. `lifecycle::child_worker_process`), with `env` set: a worker
/// in a process of its own, so a test can kill it for real.
pub fn spawn_test_process(test: &str, env: &[(&str, String)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            test,
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Sends `sig` (15: SIGTERM, 9: SIGKILL) to a child process.
pub fn signal(child: &Child, sig: i32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe {
        kill(child.id() as i32, sig);
    }
}

/// Waits until the worker on `health_port` says it is ready to take jobs.
pub fn wait_ready(health_port: u16) {
    wait_until(WAIT, || {
        http_get(health_port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
}

/// Runs the `free-roam` command line with `args` against `redis` and `prefix`, and nothing
/// else from the environment.
pub fn run_cli(redis: &TestRedis, prefix: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(args)
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("KEY_PREFIX", prefix)
        .output()
        .expect("the free-roam binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
