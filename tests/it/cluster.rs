//! The worker and the CLI against a Redis Cluster of three masters with a replica each,
//! started on local ports: the whole contract works through it (jobs on frame streams in
//! any slot, results, status, cancel, the prompt), the result writes of 30 running jobs land
//! on all three masters, and running jobs survive a failover of the master holding `{fr}`.

use crate::common::claims::{SWEEPER_HOLD_MS, claim_all, read_and_claim_in};
use crate::common::process::raw_frame_xadd;
use crate::common::worker::config;
use crate::common::{free_port, temp_dir, unique_prefix, wait_until};
use free_roam::model::testing::stub::StubModel;
use free_roam::store::keys::Keys;
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// One cluster at a time: six servers, a worker and frame feeders each are a lot for a
/// small machine, and a failover under that load can take longer than the test waits.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Six `redis-server --cluster-enabled yes` processes joined by `redis-cli --cluster create`
/// into three masters with one replica each; killed when dropped.
struct TestCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55535 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

impl TestCluster {
    fn start() -> Self {
        let dir = temp_dir("cluster");
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 6 {
            let p = cluster_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut children = Vec::new();
        for p in &ports {
            let node_dir = dir.join(p.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--dir", node_dir.to_str().unwrap()])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            children.push(child);
        }
        let cluster = TestCluster {
            ports,
            children,
            dir,
        };
        for p in &cluster.ports {
            wait_until(Duration::from_secs(10), || {
                cluster.node_cmd::<String>(*p, &["PING"]).is_ok()
            });
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for p in &cluster.ports {
            wait_until(WAIT, || {
                cluster
                    .node_cmd::<String>(*p, &["CLUSTER", "INFO"])
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            });
        }
        // Replicas report their master a moment after the slots are served.
        wait_until(WAIT, || {
            let topo = cluster.topology();
            topo.len() == 6 && topo.iter().filter(|t| !t.1).count() == 3
        });
        cluster
    }

    /// Seed nodes for `REDIS_CLUSTER_NODES`: two of the six are enough to find the rest.
    fn seeds(&self) -> String {
        format!(
            "redis://127.0.0.1:{},127.0.0.1:{}",
            self.ports[0], self.ports[3]
        )
    }

    fn client(&self) -> redis::cluster::ClusterClient {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        redis::cluster::ClusterClient::new(nodes).unwrap()
    }

    /// A command through the cluster client (routed by its key).
    fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut con = self.client().get_connection().unwrap();
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut con).unwrap()
    }

    /// A command to one node.
    fn node_cmd<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut con = client.get_connection()?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut con)
    }

    /// `CLUSTER NODES` as (port, is master, master's node id or own id, own id), from a node
    /// that is up.
    fn topology(&self) -> Vec<(u16, bool, String, String)> {
        let text: String = self
            .ports
            .iter()
            .find_map(|p| self.node_cmd(*p, &["CLUSTER", "NODES"]).ok())
            .expect("a node answers");
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let master = f.get(2)?.contains("master");
                let id = f[0].to_string();
                let of = if master { id.clone() } else { f[3].to_string() };
                Some((port, master, of, id))
            })
            .collect()
    }

    fn masters(&self) -> Vec<u16> {
        let mut m: Vec<u16> = self
            .topology()
            .into_iter()
            .filter(|(_, master, _, _)| *master)
            .map(|(p, ..)| p)
            .collect();
        m.sort();
        m
    }

    /// The master that serves `key`'s slot.
    fn master_of(&self, key: &str) -> u16 {
        let slot: i64 = self
            .node_cmd(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .unwrap();
        self.port_of_slot(slot)
    }

    /// The master that serves `key`'s slot, and one of its replicas.
    fn master_and_replica_of(&self, key: &str) -> (u16, u16) {
        let master = self.master_of(key);
        let topo = self.topology();
        let id = topo.iter().find(|t| t.0 == master).unwrap().3.clone();
        let replica = topo
            .iter()
            .find(|t| !t.1 && t.2 == id)
            .expect("the master has a replica")
            .0;
        (master, replica)
    }

    fn port_of_slot(&self, slot: i64) -> u16 {
        let slots: redis::Value = self.node_cmd(self.ports[0], &["CLUSTER", "SLOTS"]).unwrap();
        let redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS: {slots:?}")
        };
        for r in ranges {
            let redis::Value::Array(parts) = r else {
                continue;
            };
            let n =
                |v: &redis::Value| <i64 as redis::FromRedisValue>::from_redis_value_ref(v).unwrap();
            if n(&parts[0]) <= slot && slot <= n(&parts[1]) {
                let redis::Value::Array(node) = &parts[2] else {
                    panic!()
                };
                return n(&node[1]) as u16;
            }
        }
        panic!("slot {slot} unassigned")
    }

    /// `INFO commandstats` calls of one command on one node.
    fn calls(&self, port: u16, command: &str) -> u64 {
        let info: String = self
            .node_cmd(port, &["INFO", "commandstats"])
            .unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A worker process, killed when dropped: also when an assertion fails, so a failed test
/// leaves no worker retrying a cluster that is gone.
struct WorkerProcess(Child);

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the worker of `prefix` logs, in the cluster's folder.
fn worker_log(cluster: &TestCluster, prefix: &str) -> PathBuf {
    cluster.dir.join(format!("worker-{prefix}.log"))
}

/// What a test that timed out shows: each job's hash and results count, and the end of
/// the worker's log.
fn state_of(cluster: &TestCluster, prefix: &str, jobs: &[String]) -> String {
    let keys = Keys::new(prefix);
    let shards: Option<u32> = cluster.cmd(&[
        "HGET",
        &keys.settings(),
        free_roam::store::keys::QUEUE_SHARDS_FIELD,
    ]);
    let shard = |j: &str| free_roam::store::keys::shard_of_job(j, shards.unwrap_or(1));
    let hashes: Vec<(String, usize, HashMap<String, String>)> = jobs
        .iter()
        .map(|j| {
            (
                j.clone(),
                result_count(cluster, &keys, j),
                cluster.cmd(&["HGETALL", &keys.shard(shard(j)).job(j)]),
            )
        })
        .collect();
    let log = std::fs::read_to_string(worker_log(cluster, prefix)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "{hashes:#?}\nthe worker's log, last lines:\n{}",
        tail.join("\n")
    )
}

fn worker(cluster: &TestCluster, prefix: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_free-roam"));
    cmd.arg("worker")
        .env_clear()
        .env("REDIS_CLUSTER_NODES", cluster.seeds())
        .env("KEY_PREFIX", prefix)
        .env("MODEL_TYPE", "null")
        .env("HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("RECLAIM_INTERVAL_MS", "200")
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(worker_log(cluster, prefix)).unwrap());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    WorkerProcess(cmd.spawn().expect("the free-roam binary starts"))
}

/// The CLI against the cluster: (exit code, stdout).
fn cli(cluster: &TestCluster, prefix: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(args)
        .env_clear()
        .env("REDIS_CLUSTER_NODES", cluster.seeds())
        .env("KEY_PREFIX", prefix)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Feeds raw 8x8 frames every 100 ms to each key until dropped.
struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(cluster: &TestCluster, keys: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let client = cluster.client();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut ts: i64 = 1_000_000;
            while !flag.load(Ordering::Relaxed) {
                // A failover drops the connection now and then: reconnect and go on.
                let Ok(mut con) = client.get_connection() else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                while !flag.load(Ordering::Relaxed) {
                    let mut failed = false;
                    for key in &keys {
                        let r: redis::RedisResult<String> =
                            raw_frame_xadd(key, Some(200), (ts % 255) as u8, ts).query(&mut con);
                        failed |= r.is_err();
                    }
                    ts += 100;
                    std::thread::sleep(Duration::from_millis(100));
                    if failed {
                        break;
                    }
                }
            }
        });
        Feeder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Frame stream keys, one served by each master.
fn one_key_per_master(cluster: &TestCluster) -> Vec<String> {
    let mut by_master: HashMap<u16, String> = HashMap::new();
    for i in 0.. {
        let key = format!("frames:cam{i}");
        let master = cluster.master_of(&key);
        by_master.entry(master).or_insert(key);
        if by_master.len() == 3 {
            break;
        }
    }
    by_master.into_values().collect()
}

fn results(cluster: &TestCluster, keys: &Keys, job: &str) -> Vec<HashMap<String, String>> {
    let reply: redis::streams::StreamRangeReply =
        cluster.cmd(&["XRANGE", &keys.results(job), "-", "+"]);
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap_or_default()))
                .collect()
        })
        .collect()
}

fn result_count(cluster: &TestCluster, keys: &Keys, job: &str) -> usize {
    results(cluster, keys, job)
        .iter()
        .filter(|f| f["kind"] == "result")
        .count()
}

fn ended(cluster: &TestCluster, keys: &Keys, job: &str) -> Option<String> {
    results(cluster, keys, job)
        .into_iter()
        .find(|f| f["kind"] == "end")
        .map(|f| f["status"].clone())
}

fn submit(cluster: &TestCluster, p: &str, job: &str, stream: &str, extra: &[&str]) {
    let mut args = vec![
        "submit",
        "--stream-ref",
        stream,
        "--fps",
        "4",
        "--job-id",
        job,
    ];
    args.extend_from_slice(extra);
    let (code, out) = cli(cluster, p, &args);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_cluster_runs_the_whole_contract_and_spreads_result_writes_over_its_masters() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = TestCluster::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let streams = one_key_per_master(&cluster);
    let _feeder = Feeder::start(&cluster, streams.clone());
    let w = worker(&cluster, &p, &[("MAX_CONCURRENT_STREAMS", "32")]);

    let (code, out) = cli(&cluster, &p, &["prompt", "set", "find cats"]);
    assert_eq!((code, out.trim()), (0, "1"));
    for p in &masters {
        let _: String = cluster.node_cmd(*p, &["CONFIG", "RESETSTAT"]).unwrap();
    }
    let jobs: Vec<String> = (0..30).map(|i| format!("cam-job-{i}")).collect();
    for (i, job) in jobs.iter().enumerate() {
        submit(&cluster, &p, job, &streams[i % 3], &[]);
    }
    // Every job reads its frame stream, wherever its slot is, and writes results.
    wait_until(WAIT, || {
        jobs.iter().all(|j| result_count(&cluster, &keys, j) >= 3)
    });
    // The result writes (one MULTI/EXEC per batch, in the job's own slot) land on every
    // master, not only on the one holding `{fr}`.
    let fr_master = cluster.master_of(keys.tag());
    let writes: Vec<(u16, u64)> = masters
        .iter()
        .map(|m| (*m, cluster.calls(*m, "exec")))
        .collect();
    let slots_per_master: Vec<usize> = masters
        .iter()
        .map(|m| {
            jobs.iter()
                .filter(|j| cluster.master_of(&keys.job_tag(j)) == *m)
                .count()
        })
        .collect();
    for ((m, n), jobs_here) in writes.iter().zip(&slots_per_master) {
        assert!(
            *jobs_here == 0 || *n >= 3 * *jobs_here as u64,
            "master {m} ({jobs_here} jobs) saw {n} result writes: {writes:?} ({{fr}} on {fr_master})"
        );
    }
    assert!(
        slots_per_master.iter().all(|n| *n > 0),
        "30 job tags fall on all three masters: {slots_per_master:?}"
    );

    // The rest of the contract through the CLI: status names the results key, the prompt
    // reached the jobs, cancel ends a running job, and the end entry is where status says.
    let (code, out) = cli(&cluster, &p, &["status", "cam-job-0", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "running");
    assert_eq!(v["results_key"], keys.results("cam-job-0"));
    assert!(v["results"].as_u64().unwrap() >= 3);
    // Workers poll the prompt, so the newest results carry the version set before the jobs.
    wait_until(WAIT, || {
        results(&cluster, &keys, "cam-job-0")
            .last()
            .is_some_and(|r| r.get("prompt_version").map(String::as_str) == Some("1"))
    });
    let (code, out) = cli(&cluster, &p, &["cancel", "cam-job-0"]);
    assert_eq!((code, out.trim()), (0, "cam-job-0: cancelling"));
    wait_until(WAIT, || ended(&cluster, &keys, "cam-job-0").is_some());
    assert_eq!(
        ended(&cluster, &keys, "cam-job-0").as_deref(),
        Some("cancelled")
    );
    // A short job completes; its entry leaves the queue.
    submit(
        &cluster,
        &p,
        "short",
        &streams[0],
        &["--max-duration-s", "1"],
    );
    wait_until(WAIT, || {
        ended(&cluster, &keys, "short").as_deref() == Some("completed")
    });
    let (code, out) = cli(
        &cluster,
        &p,
        &["jobs", "--status", "running", "--limit", "100", "--json"],
    );
    assert_eq!(code, 0, "{out}");
    let running: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(running.as_array().unwrap().len(), 29);
    drop(w);

    // A master that lost the library (a restart without persistence) gets it again from
    // the next call that needs it, though the other masters still have it.
    let _: String = cluster
        .node_cmd(fr_master, &["FUNCTION", "DELETE", "freeroam"])
        .unwrap();
    let (code, out) = cli(&cluster, &p, &["prompt", "set", "find dogs"]);
    assert_eq!((code, out.trim()), (0, "2"));
}

/// Its failures at the first CLI submit were the library probe's random node (fixed). Two
/// in 84 runs then timed out waiting for the promotion: Redis drops a manual failover that
/// cannot finish within 5 s, so it is now asked for again (81 runs in a row passed after
/// that). Once, in an earlier suite, it timed out in its first wait (6 jobs with 2 results
/// each within a minute), before the failover; that has not come back in 105 runs since,
/// and a timeout there prints each job's hash and the end of the worker's log.
#[test]
fn running_jobs_survive_a_failover_of_the_master_holding_the_queue() {
    failover_keeps_jobs_running(1);
}

/// The same with the queue in three shards, each on its own master, the CLI queueing each
/// job in its shard: the failover is of the master holding shard 1.
#[test]
fn running_jobs_in_a_sharded_queue_survive_a_failover_of_a_shards_master() {
    failover_keeps_jobs_running(3);
}

/// A prefix whose first `shards` queue shard tags are served by as many masters (at most
/// the three the test cluster has).
fn prefix_with_shards_apart(cluster: &TestCluster, shards: u32) -> String {
    let base = unique_prefix();
    (0..)
        .map(|i| format!("{base}s{i}"))
        .find(|p| {
            let k = Keys::new(p);
            let masters: std::collections::HashSet<u16> = (0..shards)
                .map(|s| cluster.master_of(&k.shard(s).jobs()))
                .collect();
            masters.len() == shards.min(3) as usize
        })
        .unwrap()
}

/// Six jobs run on a worker over a queue of `shards` shards; the replica of the master
/// holding shard `shards - 1`'s tag (`{fr}` for one shard) takes over, and the jobs go on
/// with no second attempt, new jobs run and a cancel reaches a running one.
fn failover_keeps_jobs_running(shards: u32) {
    use free_roam::store::keys::{QUEUE_SHARDS_FIELD, shard_of_job};
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = TestCluster::start();
    let p = prefix_with_shards_apart(&cluster, shards);
    let keys = Keys::new(&p);
    let _: i64 = cluster.cmd(&[
        "HSET",
        &keys.settings(),
        QUEUE_SHARDS_FIELD,
        &shards.to_string(),
    ]);
    // Where a job's hash is: the shard the CLI queued it in.
    let job_key = |job: &str| keys.shard(shard_of_job(job, shards)).job(job);
    let streams = one_key_per_master(&cluster);
    let _feeder = Feeder::start(&cluster, streams.clone());
    let w = worker(&cluster, &p, &[("JOB_LEASE_MS", "10000")]);
    // Six jobs, as many in each shard.
    let mut per_shard = vec![0u32; shards as usize];
    let jobs: Vec<String> = (0..)
        .map(|n| format!("long-{n}"))
        .filter(|j| {
            let count = &mut per_shard[shard_of_job(j, shards) as usize];
            *count += 1;
            *count <= 6 / shards
        })
        .take(6)
        .collect();
    for (i, job) in jobs.iter().enumerate() {
        submit(&cluster, &p, job, &streams[i % 3], &[]);
    }
    let start = std::time::Instant::now();
    while !jobs.iter().all(|j| result_count(&cluster, &keys, j) >= 2) {
        assert!(
            start.elapsed() < WAIT,
            "6 jobs without 2 results each in {WAIT:?}, before the failover: {}",
            state_of(&cluster, &p, &jobs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The replica of the master that holds the last shard (`{fr}` when it is the only one)
    // takes over.
    let failed = keys.shard(shards - 1);
    let (old_master, replica) = cluster.master_and_replica_of(failed.tag());
    // A manual failover that cannot finish within Redis's own 5 s limit (the replica not
    // yet caught up) is dropped without a word, so it is asked for again until it happens.
    let promoted = || {
        cluster
            .node_cmd::<String>(replica, &["INFO", "replication"])
            .is_ok_and(|i| i.contains("role:master"))
            && cluster.master_of(failed.tag()) == replica
    };
    let start = std::time::Instant::now();
    'failover: loop {
        let _: String = cluster.node_cmd(replica, &["CLUSTER", "FAILOVER"]).unwrap();
        let asked = std::time::Instant::now();
        while asked.elapsed() < Duration::from_secs(10) {
            if promoted() {
                break 'failover;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(start.elapsed() < WAIT, "no failover within {WAIT:?}");
    }
    assert_ne!(old_master, replica);

    // The same jobs go on writing results on the same worker, with no second attempt.
    let before: Vec<usize> = jobs
        .iter()
        .map(|j| result_count(&cluster, &keys, j))
        .collect();
    let start = std::time::Instant::now();
    while !jobs
        .iter()
        .zip(&before)
        .all(|(j, n)| result_count(&cluster, &keys, j) >= n + 4)
    {
        if start.elapsed() > WAIT {
            let state: Vec<(String, usize, HashMap<String, String>)> = jobs
                .iter()
                .map(|j| {
                    (
                        j.clone(),
                        result_count(&cluster, &keys, j),
                        cluster.cmd(&["HGETALL", &job_key(j)]),
                    )
                })
                .collect();
            panic!("results stopped after the failover: before {before:?}, now {state:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for job in &jobs {
        let h: HashMap<String, String> = cluster.cmd(&["HGETALL", &job_key(job)]);
        assert_eq!(h["status"], "running", "{job}: {h:?}");
        assert_eq!(h["attempts"], "1", "{job}: {h:?}");
    }
    // The queue on the new master takes new jobs and ends them.
    submit(
        &cluster,
        &p,
        "after-failover",
        &streams[1],
        &["--max-duration-s", "1"],
    );
    wait_until(WAIT, || {
        ended(&cluster, &keys, "after-failover").as_deref() == Some("completed")
    });
    let (code, out) = cli(&cluster, &p, &["cancel", &jobs[0]]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("{}: cancelling", jobs[0]).as_str())
    );
    wait_until(WAIT, || {
        ended(&cluster, &keys, &jobs[0]).as_deref() == Some("cancelled")
    });
    drop(w);
}

/// Sees "bright" in a frame whose first pixel is brighter than mid grey: the feeder's frames
/// change brightness every 100 ms, so a job sees the label come and go. (The worker
/// binary's `null` model detects nothing, so this test runs a worker in-process.)
fn bright_model() -> StubModel {
    StubModel::named("bright")
        .with_input_size(64)
        .answering(|seen| {
            let bright = seen.frame.rgb.first().is_some_and(|v| *v > 127);
            let detected: Vec<&str> = if bright { vec!["bright"] } else { vec![] };
            serde_json::json!({ "detected": detected })
        })
}

#[test]
fn alerts_on_a_cluster_go_to_the_queue_slot_and_their_state_to_the_job_slot() {
    use free_roam::engine::Engine;
    use free_roam::metrics::Metrics;
    use free_roam::pipeline::StreamJobBody;
    use free_roam::queue::{Worker, WorkerIdentity, WorkerState};
    use free_roam::store::Store;

    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = TestCluster::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let streams = one_key_per_master(&cluster);
    let _feeder = Feeder::start(&cluster, streams.clone());
    // A job whose own slot is not the queue's, so the alerts and the alert state are on
    // different masters.
    let job = (0..)
        .map(|i| format!("alerting-{i}"))
        .find(|j| cluster.master_of(&keys.job_tag(j)) != cluster.master_of(keys.tag()))
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seeds = cluster.seeds();
    let config = Arc::new(config(
        "redis://127.0.0.1:1",
        &p,
        &[("REDIS_CLUSTER_NODES", seeds.as_str())],
    ));
    let (shutdown, handle, metrics, engine) = rt.block_on(async {
        let store = Store::connect(&config.redis, 16).unwrap();
        let metrics = Arc::new(Metrics::default());
        let engine = Engine::start(
            Box::new(bright_model()),
            config.engine.clone(),
            metrics.clone(),
        );
        let body = StreamJobBody::new(
            &config.pipeline,
            &config.source,
            engine.clone(),
            store.clone(),
            metrics.clone(),
        );
        let worker = Arc::new(Worker::new(
            store,
            Arc::new(config.queue.clone()),
            Arc::new(body),
            metrics.clone(),
            Arc::new(WorkerState::default()),
            WorkerIdentity {
                id: "alerts-w".into(),
                model: "bright".into(),
                device: "cpu".into(),
            },
        ));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        (shutdown, handle, metrics, engine)
    });

    let _: String = cluster.cmd(&[
        "XADD",
        &keys.jobs(),
        "*",
        "stream_ref",
        &streams[0],
        "fps",
        "10",
        "job_id",
        &job,
        "scene_gate",
        "off",
        "alert_min_frames",
        "1",
        "alert_clear_ms",
        "60000",
    ]);
    let alerts = || -> Vec<HashMap<String, String>> {
        let reply: redis::streams::StreamRangeReply =
            cluster.cmd(&["XRANGE", &keys.alerts(), "-", "+"]);
        reply
            .ids
            .into_iter()
            .map(|e| {
                e.map
                    .into_iter()
                    .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap_or_default()))
                    .collect::<HashMap<String, String>>()
            })
            .filter(|f| f.get("job_id") == Some(&job))
            .collect()
    };
    wait_until(WAIT, || !alerts().is_empty());
    // The alert state is saved in the job's slot with the results, never in the job hash.
    wait_until(WAIT, || {
        cluster
            .cmd::<HashMap<String, String>>(&["HGETALL", &keys.progress(&job)])
            .get("alert_state")
            .is_some_and(|s| s.contains("bright"))
    });
    let hash: HashMap<String, String> = cluster.cmd(&["HGETALL", &keys.job(&job)]);
    assert!(!hash.contains_key("alert_state"), "{hash:?}");

    // Cancelling closes the open alert before the end entry.
    let (code, out) = cli(&cluster, &p, &["cancel", &job]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("{job}: cancelling").as_str())
    );
    wait_until(WAIT, || {
        ended(&cluster, &keys, &job).as_deref() == Some("cancelled")
    });
    let events = alerts();
    let kinds: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|f| {
            let g = |k: &str| f.get(k).map_or("", String::as_str);
            (g("kind"), g("label"), g("reason"))
        })
        .collect();
    assert_eq!(
        kinds,
        [("start", "bright", ""), ("end", "bright", "job_cancelled")],
        "{events:?}"
    );
    let alert_id = format!("{job}:bright:{}", events[0]["first_frame"]);
    assert!(
        events.iter().all(|e| e["alert_id"] == alert_id),
        "{events:?}"
    );
    assert_eq!(metrics.alerts_written.get(), 2);

    rt.block_on(async {
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), handle).await;
        tokio::task::spawn_blocking(move || engine.shutdown(Duration::from_secs(2)))
            .await
            .unwrap();
    });
}

/// The queue split over three shards (`Keys::shard`), each on its own master: every
/// shard runs the lease contract in its own slot. A live worker's entries are taken in no
/// shard; once it stops ticking, a survivor's reclaim pass in each shard takes that
/// shard's entry, counting a delivery, and no other.
#[test]
fn queue_shards_each_run_the_lease_contract_on_their_own_master() {
    use free_roam::store::Store;
    use free_roam::store::functions::{self, CallIn};
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = TestCluster::start();
    let prefix = prefix_with_shards_apart(&cluster, 3);
    let nodes: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::cluster(&nodes, &prefix, 4).unwrap();
        store.load_functions().await.unwrap();
        let shards: Vec<Store> = (0..3).map(|s| store.shard(s)).collect();
        let call_in = CallIn {
            quiet_ms: 60_000,
            lease_ms: 1000,
        };
        let mut held = Vec::new();
        for (s, shard) in shards.iter().enumerate() {
            shard.ensure_group().await.unwrap();
            let fields = [("stream_ref", format!("paced:1:{s}"))];
            functions::submit(shard, &format!("job-{s}"), &fields)
                .await
                .unwrap();
            let claimed = read_and_claim_in(shard, "a").await;
            assert_eq!(claimed.len(), 1, "shard {s}");
            held.push(claimed[0].clone());
        }
        // a ticks in every shard: b's passes take nothing, however idle a's entries are.
        for _ in 0..3 {
            for shard in &shards {
                functions::tick(shard, "a", call_in, SWEEPER_HOLD_MS, &[])
                    .await
                    .unwrap();
                let reply = functions::reclaim(shard, "b", call_in, 5).await.unwrap();
                let taken = free_roam::queue::entries::parse_entry_list(&reply);
                assert!(taken.is_empty(), "a live worker's entry was taken");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // a stops: a lease later each shard's pass takes that shard's entry.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for (s, shard) in shards.iter().enumerate() {
            let tick = functions::tick(shard, "b", call_in, SWEEPER_HOLD_MS, &[])
                .await
                .unwrap();
            assert!(tick.reclaim_due, "shard {s}: a is overdue");
            let reply = functions::reclaim(shard, "b", call_in, 5).await.unwrap();
            let taken = free_roam::queue::entries::parse_entry_list(&reply);
            let ids: Vec<&str> = taken.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids, vec![held[s].as_str()], "shard {s}");
            let run = claim_all(shard, "b", taken).await;
            assert_eq!(run, vec![held[s].clone()], "shard {s}: b runs it");
            let job = shard.keys().job(&format!("job-{s}"));
            let attempts: String = shard
                .query(redis::cmd("HGET").arg(&job).arg("attempts"))
                .await
                .unwrap();
            assert_eq!(attempts, "2", "shard {s}: a second delivery");
        }
    });
}
