//! Test support shared by the integration tests: a private `redis-server` on a free port,
//! and small helpers to wait for conditions.

pub mod claims;
pub mod frames;
pub mod process;
pub mod worker;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of the test's own, killed when dropped. Keeps an append-only file in its
/// temp dir so a restart keeps the data.
pub struct TestRedis {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh temporary directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "free-roam-{tag}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl TestRedis {
    pub fn start() -> Self {
        let dir = temp_dir("redis");
        let mut r = TestRedis {
            port: free_port(),
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        // Loading the append-only file may take a moment after the port opens.
        wait_until(Duration::from_secs(10), || {
            self.cli(&["PING"]).trim() == "PONG"
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        std::thread::sleep(Duration::from_millis(300));
        self.spawn();
    }

    /// Freezes the server (SIGSTOP) for `pause`, then lets it go on (SIGCONT): connections
    /// stay open and every command sent meanwhile waits, as behind a stalled host.
    pub fn pause(&self, pause: Duration) {
        let pid = self
            .child
            .as_ref()
            .expect("a running server")
            .id()
            .to_string();
        let signal = |sig: &str| {
            let ok = Command::new("kill")
                .args([sig, &pid])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} {pid}");
        };
        signal("-STOP");
        std::thread::sleep(pause);
        signal("-CONT");
    }

    /// Kills the server, leaves it down (refusing connections) for `outage`, then starts it
    /// again on the same port and data.
    pub fn down_for(&mut self, outage: Duration) {
        self.stop();
        std::thread::sleep(outage);
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `redis-cli` against this server and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `cond` every 50 ms until it holds; panics after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A unique key prefix, for tests that share one server.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Async polling: checks `cond` every 50 ms without blocking the runtime between checks.
pub async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("{what}: not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Direct reads through the redis crate, for assertions.
impl TestRedis {
    /// All entries of a stream as (id, fields), read through the redis crate.
    pub fn xrange(&self, key: &str) -> Vec<(String, std::collections::HashMap<String, String>)> {
        let mut con = self.client().get_connection().unwrap();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query(&mut con)
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|e| {
                let fields = e
                    .map
                    .into_iter()
                    .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap_or_default()))
                    .collect();
                (e.id, fields)
            })
            .collect()
    }

    pub fn hgetall(&self, key: &str) -> std::collections::HashMap<String, String> {
        let mut con = self.client().get_connection().unwrap();
        redis::cmd("HGETALL").arg(key).query(&mut con).unwrap()
    }

    pub fn hget(&self, key: &str, field: &str) -> Option<String> {
        let mut con = self.client().get_connection().unwrap();
        redis::cmd("HGET")
            .arg(key)
            .arg(field)
            .query(&mut con)
            .unwrap()
    }

    /// Runs any command through the redis crate.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut con = self.client().get_connection().unwrap();
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut con).unwrap()
    }
}
