//! Security end to end, against real `redis-server` and `free-roam` processes: TLS with a
//! private CA and client certificates, a password and ACL users; the least-privilege users
//! of deploy/redis/acl-users.txt running a job while refusing the producer everything else;
//! no Redis password in logs, `/health`, `/metrics` or Redis; and a health endpoint that
//! serves only its paths and outlasts slow, garbage and numerous clients.

use crate::common::process::{http_get, raw_frame_xadd, signal};
use crate::common::{TestRedis, free_port, temp_dir, wait_until};
use free_roam::job::JobStatus;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const ACL_FILE: &str = include_str!("../../deploy/redis/acl-users.txt");
const SECURITY_DOC: &str = include_str!("../../docs/security.md");
const ADMIN_PASSWORD: &str = "admin-Pw-4e1f";
const WORKER_PASSWORD: &str = "worker-Pw-9c2a";
const PRODUCER_PASSWORD: &str = "producer-Pw-77d0";
const PREFIX: &str = "fr";
const FRAMES: &str = "frames:cam1";

/// The `ACL SETUSER` lines of the deploy file, as written.
fn acl_lines() -> Vec<&'static str> {
    let lines: Vec<&str> = ACL_FILE
        .lines()
        .filter(|l| l.starts_with("ACL SETUSER "))
        .collect();
    assert_eq!(lines.len(), 2, "a worker and a producer line");
    lines
}

/// A test CA, a server certificate for localhost and 127.0.0.1, and a client certificate,
/// made with the `openssl` command.
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs(dir: &Path) -> Certs {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_args = [
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=free-roam test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat();
    openssl(dir, &ca_args);
    for (name, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}"),
        )
        .unwrap();
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subject = format!("/CN={name}");
        let req = [
            &["req"][..],
            &ec,
            &["-keyout", &key, "-out", &csr, "-subj", &subject],
        ]
        .concat();
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    Certs {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

/// A `redis-server` whose default user needs `ADMIN_PASSWORD`: plain TCP, or TLS only
/// (`--port 0`) with client certificates required.
struct SecureRedis {
    port: u16,
    tls: Option<Certs>,
    dir: PathBuf,
    child: Child,
}

impl SecureRedis {
    fn start(tls: bool) -> Self {
        let dir = temp_dir("secure-redis");
        let port = free_port();
        let certs = tls.then(|| make_certs(&dir));
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--bind",
            "127.0.0.1 -::1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", dir.to_str().unwrap()])
        .args(["--requirepass", ADMIN_PASSWORD])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        match &certs {
            Some(c) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&c.server_cert)
                    .arg("--tls-key-file")
                    .arg(&c.server_key)
                    .arg("--tls-ca-cert-file")
                    .arg(&c.ca)
                    .args(["--tls-auth-clients", "yes"]);
            }
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
        }
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let server = Self {
            port,
            tls: certs,
            dir,
            child,
        };
        wait_until(Duration::from_secs(10), || {
            server
                .client("default", ADMIN_PASSWORD)
                .get_connection()
                .is_ok()
        });
        server
    }

    fn url(&self, user: &str, password: &str) -> String {
        match self.tls {
            Some(_) => format!("rediss://{user}:{password}@localhost:{}/0", self.port),
            None => format!("redis://{user}:{password}@127.0.0.1:{}/0", self.port),
        }
    }

    fn client(&self, user: &str, password: &str) -> redis::Client {
        let url = self.url(user, password);
        match &self.tls {
            None => redis::Client::open(url).unwrap(),
            Some(c) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: Some(redis::ClientTlsConfig {
                        client_cert: std::fs::read(&c.client_cert).unwrap(),
                        client_key: std::fs::read(&c.client_key).unwrap(),
                    }),
                    root_cert: Some(std::fs::read(&c.ca).unwrap()),
                },
            )
            .unwrap(),
        }
    }

    fn admin(&self) -> redis::Connection {
        self.client("default", ADMIN_PASSWORD)
            .get_connection()
            .unwrap()
    }

    /// Creates the deploy file's users exactly as written, then gives each a password.
    fn create_acl_users(&self) {
        let mut con = self.admin();
        for line in acl_lines() {
            let mut cmd = redis::cmd("ACL");
            for arg in line.split_whitespace().skip(1) {
                cmd.arg(arg);
            }
            let _: () = cmd
                .query(&mut con)
                .unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        for (user, password) in [
            ("fr-worker", WORKER_PASSWORD),
            ("fr-producer", PRODUCER_PASSWORD),
        ] {
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(user)
                .arg(format!(">{password}"))
                .query(&mut con)
                .unwrap();
        }
    }

    /// The worker settings that reach this server as `user`.
    fn worker_env(&self, user: &str, password: &str) -> Vec<(String, String)> {
        let mut env = vec![("REDIS_URL".to_string(), self.url(user, password))];
        if let Some(c) = &self.tls {
            for (name, path) in [
                ("REDIS_TLS_CA_FILE", &c.ca),
                ("REDIS_TLS_CERT_FILE", &c.client_cert),
                ("REDIS_TLS_KEY_FILE", &c.client_key),
            ] {
                env.push((name.to_string(), path.display().to_string()));
            }
        }
        env
    }
}

impl Drop for SecureRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `free-roam` process whose standard output and error are kept in files.
struct Process {
    child: Child,
    health_port: u16,
    dir: PathBuf,
}

impl Process {
    fn start(args: &[&str], env: &[(String, String)]) -> Self {
        let dir = temp_dir("worker-logs");
        let health_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_free-roam"));
        cmd.args(args)
            .env_clear()
            .env("KEY_PREFIX", PREFIX)
            .env("MODEL_TYPE", "null")
            .env("HEALTH_ADDR", format!("127.0.0.1:{health_port}"))
            .env("RECLAIM_INTERVAL_MS", "200")
            .env("LOG_LEVEL", "info")
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the free-roam binary starts");
        Self {
            child,
            health_port,
            dir,
        }
    }

    fn worker(env: &[(String, String)]) -> Self {
        Self::start(&["worker"], env)
    }

    /// Everything the process printed so far, standard output then error.
    fn output(&self) -> String {
        ["stdout", "stderr"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_ready(&self) {
        wait_until(WAIT, || {
            http_get(self.health_port, "/health/ready").is_some_and(|(c, _)| c == 200)
        });
    }

    /// SIGTERM, then the exit status and everything printed up to the exit.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        signal(&self.child, 15);
        let status = self.child.wait().unwrap();
        (status, self.output())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `free-roam` command line run to its end: exit code and everything it printed.
fn cli(args: &[&str], env: &[(String, String)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_free-roam"));
    cmd.args(args).env_clear().env("KEY_PREFIX", PREFIX);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the free-roam binary runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Appends 30 raw 8x8 frames, 100 ms apart, to `FRAMES`.
fn feed(con: &mut redis::Connection, start_ts: i64) {
    for i in 0..30i64 {
        let _: String = raw_frame_xadd(FRAMES, None, (i % 255) as u8, start_ts + i * 100)
            .query(con)
            .unwrap();
    }
}

/// Queues a job on `FRAMES` with a plain XADD on the jobs stream.
fn xadd_job(con: &mut redis::Connection, job_id: &str) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg(format!("{{{PREFIX}}}:jobs"))
        .arg("*")
        .arg("stream_ref")
        .arg(FRAMES)
        .arg("fps")
        .arg(2)
        .arg("max_duration_s")
        .arg(2)
        .arg("job_id")
        .arg(job_id)
        .query(con)
}

/// The status of the job's end entry once it is written, with its error if any.
fn wait_end(con: &mut redis::Connection, job_id: &str) -> String {
    wait_end_on(con, job_id, 1)
}

/// `wait_end` on a queue of `shards` shards. It also waits for the job hash's final
/// status, which the contract lets trail the end entry by a round trip.
fn wait_end_on(con: &mut redis::Connection, job_id: &str, shards: u32) -> String {
    use free_roam::store::keys::{Keys, shard_of_job};
    let keys = Keys::new(PREFIX);
    let key = keys.results(job_id);
    let hash = keys.shard(shard_of_job(job_id, shards)).job(job_id);
    let mut status = None;
    wait_until(WAIT, || {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query(con)
            .unwrap();
        status = entries.ids.iter().find_map(|e| {
            let kind: Option<String> = e.get("kind");
            let status: Option<String> = e.get("status");
            let error: Option<String> = e.get("error");
            (kind.as_deref() == Some("end")).then(|| match error {
                Some(error) => format!("{} ({error})", status.unwrap_or_default()),
                None => status.unwrap_or_default(),
            })
        });
        let final_status: Option<String> = redis::cmd("HGET")
            .arg(&hash)
            .arg("status")
            .query(con)
            .unwrap();
        status.is_some()
            && final_status
                .as_deref()
                .and_then(JobStatus::parse)
                .is_some_and(JobStatus::is_terminal)
    });
    status.unwrap()
}

/// Runs `args` on `con` and expects Redis to refuse it for want of permission.
fn refused(con: &mut redis::Connection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query::<redis::Value>(con) {
        Err(e) if e.code() == Some("NOPERM") => {}
        other => panic!("{args:?} must be refused with NOPERM, got {other:?}"),
    }
}

#[test]
fn tls_with_a_password_or_an_acl_user_runs_a_job_and_a_wrong_password_fails_clearly() {
    let redis = SecureRedis::start(true);
    redis.create_acl_users();
    let mut admin = redis.admin();
    feed(&mut admin, 1_000_000);

    // An ACL user over mutual TLS with the test CA.
    let worker = Process::worker(&redis.worker_env("fr-worker", WORKER_PASSWORD));
    worker.wait_ready();
    xadd_job(&mut admin, "tls-acl").unwrap();
    assert_eq!(wait_end(&mut admin, "tls-acl"), "completed");
    assert!(worker.stop().0.success());

    // The default user's password alone (`rediss://:password@`).
    let worker = Process::worker(&redis.worker_env("", ADMIN_PASSWORD));
    worker.wait_ready();
    xadd_job(&mut admin, "tls-password").unwrap();
    assert_eq!(wait_end(&mut admin, "tls-password"), "completed");
    assert!(worker.stop().0.success());

    // A wrong password: said at error level as an auth failure, the password nowhere.
    let wrong = "wrong-Pw-31ab";
    let worker = Process::worker(&redis.worker_env("fr-worker", wrong));
    wait_until(WAIT, || worker.output().contains("redis auth failed"));
    let (code, body) = http_get(worker.health_port, "/health/ready").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.to_lowercase().contains("auth"), "{body}");
    let output = worker.output();
    assert!(output.contains("ERROR"), "{output}");
    assert!(!output.contains(wrong) && !body.contains(wrong), "{output}");

    // Without the test CA the server's certificate is not trusted.
    let mut env = redis.worker_env("fr-worker", WORKER_PASSWORD);
    env.retain(|(k, _)| k != "REDIS_TLS_CA_FILE");
    let untrusting = Process::worker(&env);
    wait_until(WAIT, || {
        http_get(untrusting.health_port, "/health/ready")
            .is_some_and(|(c, b)| c == 503 && b.contains("certificate"))
    });
}

#[test]
fn the_deploy_acl_users_run_a_job_and_the_producer_can_do_nothing_else() {
    for line in acl_lines() {
        assert!(
            SECURITY_DOC.contains(line),
            "docs/security.md must show this line as it is: {line}"
        );
    }
    let redis = SecureRedis::start(false);
    redis.create_acl_users();
    let mut admin = redis.admin();
    feed(&mut admin, 1_000_000);
    let worker = Process::worker(&redis.worker_env("fr-worker", WORKER_PASSWORD));
    worker.wait_ready();

    // The producer submits through the CLI (fr_submit) and with a plain XADD, reads the
    // results, and sets the prompt, all under its ACL user.
    let producer_env = redis.worker_env("fr-producer", PRODUCER_PASSWORD);
    let (code, out) = cli(
        &[
            "submit",
            "--stream-ref",
            FRAMES,
            "--fps",
            "2",
            "--max-duration-s",
            "2",
            "--job-id",
            "by-cli",
        ],
        &producer_env,
    );
    assert_eq!(code, 0, "{out}");
    let mut producer = redis
        .client("fr-producer", PRODUCER_PASSWORD)
        .get_connection()
        .unwrap();
    xadd_job(&mut producer, "by-xadd").unwrap();
    assert_eq!(wait_end(&mut producer, "by-cli"), "completed");
    assert_eq!(wait_end(&mut producer, "by-xadd"), "completed");
    // A job may not read the deployment's own keys as frames: not another job's results.
    let peek = free_roam::store::keys::Keys::new(PREFIX).results("by-cli");
    let _: String = redis::cmd("XADD")
        .arg(format!("{{{PREFIX}}}:jobs"))
        .arg("*")
        .arg("stream_ref")
        .arg(&peek)
        .arg("job_id")
        .arg("peek")
        .query(&mut producer)
        .unwrap();
    assert!(wait_end(&mut producer, "peek").starts_with("failed ("));
    let (_, out) = cli(&["status", "peek"], &producer_env);
    assert!(out.contains("KEY_PREFIX"), "{out}");
    let (code, out) = cli(&["status", "by-xadd"], &producer_env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("completed"), "{out}");
    let (code, out) = cli(
        &["prompt", "set", "Detect all cats", "--no-preserve"],
        &producer_env,
    );
    assert_eq!(code, 0, "{out}");

    // Nothing else: no job's results or progress, no queue bookkeeping, no worker
    // registry, no settings, no function library, no server administration.
    let keys = free_roam::store::keys::Keys::new(PREFIX);
    let registry: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", keys.workers_prefix()))
        .query(&mut admin)
        .unwrap();
    assert_eq!(
        registry.len(),
        1,
        "the worker's heartbeat, written under its ACL"
    );
    let (results, progress) = (keys.results("by-cli"), keys.progress("by-cli"));
    let jobs = keys.jobs();
    let entry = "0-1";
    let library = free_roam::store::FUNCTIONS_LUA;
    for args in [
        &["XADD", &results, "*", "kind", "end", "status", "failed"][..],
        &["DEL", &results],
        &["XTRIM", &results, "MAXLEN", "0"],
        &["HSET", &progress, "ended", "failed"],
        &["DEL", &progress],
        &["DEL", &keys.job("by-cli")],
        &["FUNCTION", "DELETE", "freeroam"],
        &["FUNCTION", "FLUSH"],
        &["FUNCTION", "LOAD", "REPLACE", library],
        &[
            "FCALL",
            "fr_job_finish",
            "1",
            keys.tag(),
            "w",
            entry,
            "by-cli",
            "failed",
            "x",
        ],
        &[
            "FCALL",
            "fr_job_end",
            "1",
            &keys.job_tag("by-cli"),
            "failed",
            "x",
            "10",
            "60",
        ],
        &["HSET", &registry[0], "draining", "1"],
        &["DEL", &registry[0]],
        &["HSET", &keys.settings(), "result_ttl_s", "1"],
        &["XACK", &jobs, free_roam::store::keys::WORKER_GROUP, entry],
        &[
            "XGROUP",
            "DESTROY",
            &jobs,
            free_roam::store::keys::WORKER_GROUP,
        ],
        &[
            "XREADGROUP",
            "GROUP",
            "workers",
            "thief",
            "STREAMS",
            &jobs,
            ">",
        ],
        &["XADD", FRAMES, "*", "data", "x"],
        &["FLUSHALL"],
        &["CONFIG", "SET", "requirepass", "x"],
        &["KEYS", "*"],
        &["ACL", "SETUSER", "fr-producer", "+@all"],
    ] {
        refused(&mut producer, args);
    }
    // The worker's user is bounded too: no library removal, no server administration, no
    // writes to frame streams.
    let mut as_worker = redis
        .client("fr-worker", WORKER_PASSWORD)
        .get_connection()
        .unwrap();
    for args in [
        &["FUNCTION", "DELETE", "freeroam"][..],
        &["FUNCTION", "FLUSH"],
        &["FLUSHALL"],
        &["CONFIG", "SET", "requirepass", "x"],
        &["ACL", "SETUSER", "fr-worker", "+@all"],
        &["XADD", FRAMES, "*", "data", "x"],
        &["FCALL", "fr_cancel", "1", keys.tag(), "by-cli"],
    ] {
        refused(&mut as_worker, args);
    }
    assert!(worker.stop().0.success());
}

/// The same users on a queue of three shards: the producer queues jobs in shards 1 and 2
/// through the CLI, reads their status, and cancels a running one; the worker runs them.
#[test]
fn the_deploy_acl_users_work_on_a_sharded_queue() {
    use free_roam::store::keys::{QUEUE_SHARDS_FIELD, shard_of_job};
    let redis = SecureRedis::start(false);
    redis.create_acl_users();
    let mut admin = redis.admin();
    let keys = free_roam::store::keys::Keys::new(PREFIX);
    let _: i64 = redis::cmd("HSET")
        .arg(keys.settings())
        .arg(QUEUE_SHARDS_FIELD)
        .arg(3)
        .query(&mut admin)
        .unwrap();
    feed(&mut admin, 1_000_000);
    let producer_env = redis.worker_env("fr-producer", PRODUCER_PASSWORD);
    let in_shard = |shard: u32, name: &str| {
        (0..)
            .map(|i| format!("{name}-{i}"))
            .find(|id| shard_of_job(id, 3) == shard)
            .unwrap()
    };
    let (short, long, queued) = (
        in_shard(1, "short"),
        in_shard(2, "long"),
        in_shard(1, "queued"),
    );
    // Queued and cancelled before any worker runs (an operator loaded the library): the
    // producer cannot write the end entry, and the worker that reads the entry writes it.
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(free_roam::store::FUNCTIONS_LUA)
        .query(&mut admin)
        .unwrap();
    for args in [
        vec![
            "submit",
            "--stream-ref",
            FRAMES,
            "--job-id",
            queued.as_str(),
        ],
        vec!["cancel", queued.as_str()],
    ] {
        let (code, out) = cli(&args, &producer_env);
        assert_eq!(code, 0, "{out}");
    }
    let worker = Process::worker(&redis.worker_env("fr-worker", WORKER_PASSWORD));
    worker.wait_ready();
    for (id, seconds) in [(&short, "2"), (&long, "60")] {
        let args = ["submit", "--stream-ref", FRAMES, "--fps", "2"];
        let mut args = args.to_vec();
        args.extend(["--max-duration-s", seconds, "--job-id", id.as_str()]);
        let (code, out) = cli(&args, &producer_env);
        assert_eq!(code, 0, "{out}");
    }
    let mut producer = redis
        .client("fr-producer", PRODUCER_PASSWORD)
        .get_connection()
        .unwrap();
    assert_eq!(wait_end_on(&mut producer, &short, 3), "completed");
    assert_eq!(wait_end_on(&mut producer, &queued, 3), "cancelled");
    let (code, out) = cli(&["status", short.as_str()], &producer_env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("completed"), "{out}");
    wait_until(WAIT, || {
        let (_, out) = cli(&["status", long.as_str()], &producer_env);
        out.contains("running")
    });
    let (code, out) = cli(&["cancel", long.as_str()], &producer_env);
    assert_eq!(code, 0, "{out}");
    assert_eq!(wait_end_on(&mut producer, &long, 3), "cancelled");
    let hash: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.shard(2).job(&long))
        .query(&mut producer)
        .unwrap();
    assert_eq!(hash["status"], "cancelled", "{hash:?}");
    drop(worker);
}

#[test]
fn a_redis_password_is_masked_in_logs_health_metrics_and_redis() {
    let password = "Sup3r-s3cret-4f2d";
    let redis = TestRedis::start();
    redis.cli(&["CONFIG", "SET", "requirepass", password]);
    let url = format!("redis://:{password}@127.0.0.1:{}/0", redis.port);
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    feed(&mut con, 1_000_000);
    let env = [
        ("REDIS_URL".to_string(), url.clone()),
        ("LOG_LEVEL".to_string(), "debug".to_string()),
    ];
    let worker = Process::worker(&env);
    worker.wait_ready();
    xadd_job(&mut con, "masked").unwrap();
    assert_eq!(wait_end(&mut con, "masked"), "completed");
    let mut seen = String::new();
    for path in ["/health", "/health/ready", "/metrics"] {
        seen.push_str(&http_get(worker.health_port, path).unwrap().1);
    }
    // What the worker wrote to Redis: its heartbeat, the events, the job and its results.
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    for key in keys.iter().filter(|k| k.as_str() != FRAMES) {
        let kind: String = redis::cmd("TYPE").arg(key).query(&mut con).unwrap();
        let dump: redis::Value = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(key).query(&mut con).unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query(&mut con)
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            _ => redis::Value::Nil,
        };
        seen.push_str(&format!("{key}: {dump:?}\n"));
    }
    assert!(
        seen.contains(":worker:"),
        "the heartbeat is among what was read"
    );
    let (status, output) = worker.stop();
    assert!(status.success());
    assert!(!output.contains(password), "the logs show it: {output}");
    assert!(!seen.contains(password), "health or Redis shows it: {seen}");

    // Cluster seed URLs with the password, against a server that is no Cluster: the
    // connection errors are logged and shown by /health, masked.
    let nodes = format!(
        "redis://:{password}@127.0.0.1:{0},redis://:{password}@127.0.0.1:{0}",
        redis.port
    );
    let cluster_env = [
        ("REDIS_CLUSTER_NODES".to_string(), nodes.clone()),
        ("LOG_LEVEL".to_string(), "debug".to_string()),
    ];
    let worker = Process::worker(&cluster_env);
    wait_until(WAIT, || worker.output().contains("redis not ready"));
    let mut seen = String::new();
    for path in ["/health", "/health/ready", "/metrics"] {
        seen.push_str(&http_get(worker.health_port, path).unwrap().1);
    }
    let output = worker.output();
    assert!(!output.contains(password), "the logs show it: {output}");
    assert!(!seen.contains(password), "health shows it: {seen}");

    // A bad URL is refused at start naming the variable, and the CLI's help hides values.
    let bad = [("REDIS_URL".to_string(), format!("http://u:{password}@h:1"))];
    let (code, out) = cli(&["status", "x"], &bad);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("REDIS_URL") && !out.contains(password),
        "{out}"
    );
    let (_, help) = cli(&["worker", "--help"], &env);
    assert!(
        help.contains("REDIS_URL") && !help.contains(password),
        "{help}"
    );
}

/// An RTSP camera that refuses every login: it answers OPTIONS, then 401 with a Basic
/// challenge to everything else, as a camera does to a wrong password. Stops when dropped.
struct RefusingCamera {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RefusingCamera {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || refuse_logins(conn));
                }
            }
        });
        Self { port, stop }
    }
}

impl Drop for RefusingCamera {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Answers each RTSP request on `conn` until the client goes.
fn refuse_logins(conn: TcpStream) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let (mut method, mut cseq) = (String::new(), String::from("0"));
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if method.is_empty() {
                method = line.split(' ').next().unwrap_or_default().to_string();
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("cseq")
            {
                cseq = value.trim().to_string();
            }
        }
        let reply = if method == "OPTIONS" {
            format!(
                "RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE, SETUP, PLAY, \
                 TEARDOWN\r\n\r\n"
            )
        } else {
            format!(
                "RTSP/1.0 401 Unauthorized\r\nCSeq: {cseq}\r\nWWW-Authenticate: Basic \
                 realm=\"camera\"\r\n\r\n"
            )
        };
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// ffmpeg names its input in its errors, password and all (`rtsp://admin:PASSWORD@cam/...:
/// Connection refused`): a camera that is down or refuses the login must not show its
/// password in the log, the job's error, its end entry or the events.
#[test]
fn a_camera_password_is_masked_in_what_ffmpeg_said() {
    let password = "Cam-Pw-5b3e";
    let redis = TestRedis::start();
    let refusing = RefusingCamera::start();
    let env = [
        ("REDIS_URL".to_string(), redis.url()),
        ("LOG_LEVEL".to_string(), "debug".to_string()),
        ("SOURCE_RETRIES".to_string(), "1".to_string()),
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_default(),
        ),
    ];
    let worker = Process::worker(&env);
    worker.wait_ready();
    let mut con = redis.client().get_connection().unwrap();
    let cameras = [
        ("camera-down", free_port(), "Connection refused"),
        ("login-refused", refusing.port, "401 Unauthorized"),
    ];
    let url = |port: u16| format!("rtsp://admin:{password}@127.0.0.1:{port}/cam");
    for (job, port, _) in &cameras {
        let _: String = redis::cmd("XADD")
            .arg(format!("{{{PREFIX}}}:jobs"))
            .arg("*")
            .arg("stream_ref")
            .arg(url(*port))
            .arg("job_id")
            .arg(job)
            .query(&mut con)
            .unwrap();
    }
    for (job, port, said) in &cameras {
        let end = wait_end(&mut con, job);
        assert!(end.starts_with("failed ("), "{job}: {end}");
        assert!(end.contains(said), "{job}: ffmpeg's words are kept: {end}");
        assert!(
            end.contains(&format!("rtsp://admin:***@127.0.0.1:{port}/cam")),
            "{job}: {end}"
        );
    }
    // Everything the worker wrote: the job hashes (whose `stream_ref` is the producer's
    // own, as given), results, end entries and events.
    let keys: Vec<String> = redis.cmd(&["KEYS", "*"]);
    let mut seen = String::new();
    for key in keys.iter().filter(|k| !k.ends_with(":jobs")) {
        let kind: String = redis.cmd(&["TYPE", key.as_str()]);
        let dump = match kind.as_str() {
            "hash" => format!("{:?}", redis.hgetall(key)),
            "stream" => format!("{:?}", redis.xrange(key)),
            _ => String::new(),
        };
        seen.push_str(&format!("{key}: {dump}\n"));
    }
    for (_, port, _) in &cameras {
        seen = seen.replace(&url(*port), "");
    }
    assert!(
        seen.contains(":events"),
        "the events are among what was read"
    );
    assert!(!seen.contains(password), "Redis shows it: {seen}");
    let (status, output) = worker.stop();
    assert!(status.success());
    assert!(
        output.contains("ffmpeg failed"),
        "the WARN log is read: {output}"
    );
    assert!(!output.contains(password), "the logs show it: {output}");
}

/// Reads what the server sends on `s` until it closes, or `None` if it keeps the
/// connection open and silent past the read timeout.
fn read_until_closed(s: &mut TcpStream) -> Option<String> {
    s.set_read_timeout(Some(
        free_roam::health::CONNECTION_TIMEOUT + Duration::from_secs(10),
    ))
    .unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
        Err(_) => None,
    }
}

#[test]
fn the_health_endpoint_serves_its_paths_only_and_outlasts_abuse() {
    let redis = TestRedis::start();
    let port = free_port();
    let mut worker = crate::common::process::worker(&redis, PREFIX, port, &[]);
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    let answers = || http_get(port, "/health/live").is_some_and(|(c, _)| c == 200);

    // Only the listed paths.
    for (path, _) in free_roam::health::Endpoint::PATHS {
        assert_eq!(http_get(port, path).unwrap().0 / 100, 2, "{path}");
    }
    for path in [
        "/",
        "/admin",
        "/health/",
        "/health/live/x",
        "/metrics/../health",
        "/.env",
    ] {
        assert_eq!(http_get(port, path).unwrap().0, 404, "{path}");
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    assert!(
        read_until_closed(&mut s)
            .unwrap()
            .starts_with("HTTP/1.1 405")
    );

    // Garbage bytes: an error answer or a closed connection, never a hang.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&garbage);
    let reply = read_until_closed(&mut s).expect("garbage gets the connection closed");
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
        "{reply}"
    );
    assert!(answers());

    // A request head over the size limit is refused.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let huge = "a".repeat(4 * free_roam::health::MAX_REQUEST_BYTES);
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: {huge}\r\n\r\n"
    );
    let reply = read_until_closed(&mut s).expect("an oversized head gets the connection closed");
    assert!(!reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(answers());

    // A slow client that never finishes its head is cut off.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(slow, "GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(
        read_until_closed(&mut slow).is_some(),
        "the server closes a connection whose head never ends"
    );

    signal(&worker, 15);
    assert!(worker.wait().unwrap().success());
}

/// Whether the server has closed `s` (a read gives end of file at once); false while it is
/// open and silent.
fn closed_by_server(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Anything on the pod network that keeps the connection cap full of idle connections
/// (64 every 5 s) must not fail the kubelet's probes: a new connection takes the place of
/// the oldest idle one, so `/health/live` answers while they are held, and never more
/// than the cap are open.
#[test]
fn liveness_answers_while_idle_connections_fill_the_cap() {
    let redis = TestRedis::start();
    let port = free_port();
    let mut worker = crate::common::process::worker(&redis, PREFIX, port, &[]);
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    let cap = free_roam::health::MAX_CONNECTIONS;
    let extra = 16;
    let held: Vec<TcpStream> = (0..cap + extra)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(
            http_get(port, path).map(|(c, _)| c),
            Some(200),
            "{path} with {} idle connections held",
            held.len()
        );
    }
    // The oldest idle ones made room: the server holds at most the cap.
    let mut still_open = usize::MAX;
    wait_until(WAIT, || {
        still_open = held.iter().filter(|s| !closed_by_server(s)).count();
        still_open <= cap
    });
    assert!(still_open <= cap, "{still_open} held open");
    // And the idle ones left are still cut off at the head deadline.
    wait_until(WAIT, || held.iter().all(closed_by_server));
    assert!(http_get(port, "/health/live").is_some_and(|(c, _)| c == 200));
    signal(&worker, 15);
    assert!(worker.wait().unwrap().success());
}
