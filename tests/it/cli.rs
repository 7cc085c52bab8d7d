//! The `free-roam` command line against a real Redis: every subcommand, its text and JSON
//! output, and its exit codes (0 ok, 1 not found or failed, 2 bad usage).

use crate::common::worker::InProcessWorker;
use crate::common::{TestRedis, unique_prefix};
use std::process::{Command, Output};

fn run(redis: &TestRedis, prefix: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(args)
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("KEY_PREFIX", prefix)
        .output()
        .expect("the free-roam binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn prompt_commands_share_versions_with_fcall() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let tag = format!("{{{p}}}");
    let o = run(&redis, &p, &["prompt", "get"]);
    assert_eq!(o.status.code(), Some(1), "no prompt yet");
    assert!(stderr(&o).contains("no prompt has been set"));
    let o = run(
        &redis,
        &p,
        &["prompt", "set", "Detect all people and vehicles"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "1");
    assert_eq!(
        redis
            .cli(&["FCALL", "fr_prompt_set", "1", &tag, "Detect vehicles"])
            .trim(),
        "2"
    );
    let o = run(&redis, &p, &["prompt", "get", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(v["text"], "Detect vehicles");
    let o = run(&redis, &p, &["prompt", "history"]);
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("v2 ") && lines[0].ends_with("Detect vehicles"));
    let o = run(
        &redis,
        &p,
        &["prompt", "set", "Detect dogs", "--no-preserve"],
    );
    assert_eq!(stdout(&o).trim(), "3");
    let o = run(&redis, &p, &["prompt", "history", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let o = run(&redis, &p, &["prompt", "set", "   "]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("prompt text is empty"));
}

#[test]
fn submit_status_cancel_and_list_without_a_worker() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let o = run(
        &redis,
        &p,
        &[
            "submit",
            "--stream-ref",
            "cam:1",
            "--prompt",
            "Detect people",
            "--fps",
            "1",
            "--job-id",
            "j1",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "j1");
    let o = run(
        &redis,
        &p,
        &["submit", "--stream-ref", "cam:1", "--job-id", "j1"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("job_id j1 already exists"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &redis,
        &p,
        &["submit", "--stream-ref", "cam:1", "--fps", "60"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("field `fps`"), "{}", stderr(&o));
    let o = run(&redis, &p, &["submit", "--stream-ref", "cam:2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let generated = v["job_id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok());

    let o = run(&redis, &p, &["status", "j1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["status"], "queued");
    assert_eq!(v["stream_ref"], "cam:1");
    assert_eq!(v["fps"], "1");
    assert_eq!(
        v["results_key"],
        format!("{{{p}:j1}}:results"),
        "status names the job's result stream"
    );

    // An entry pushed with redis-cli that no worker has read yet is found too.
    redis.cli(&[
        "XADD",
        &format!("{{{p}}}:jobs"),
        "*",
        "stream_ref",
        "cam:3",
        "job_id",
        "raw-1",
    ]);
    let o = run(&redis, &p, &["status", "raw-1"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("not yet claimed"), "{}", stdout(&o));

    let o = run(&redis, &p, &["status", "missing"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no job with id missing"));

    let o = run(&redis, &p, &["cancel", "j1"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o).trim(), "j1: cancelled");
    let o = run(&redis, &p, &["cancel", "raw-1"]);
    assert_eq!(stdout(&o).trim(), "raw-1: cancelled");
    let o = run(&redis, &p, &["cancel", "missing"]);
    assert_eq!(o.status.code(), Some(1));

    let o = run(&redis, &p, &["jobs", "--status", "cancelled", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["raw-1", "j1"], "newest first");
    let o = run(&redis, &p, &["jobs"]);
    assert_eq!(stdout(&o).lines().count(), 3);
    let o = run(&redis, &p, &["jobs", "--status", "bogus"]);
    assert_eq!(o.status.code(), Some(2));

    let o = run(&redis, &p, &["results", "j1"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a cancelled job's results end non-zero"
    );
    assert!(stdout(&o).contains("end  status=cancelled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_follow_streams_until_the_end_entry() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let o = run(
        &redis,
        &p,
        &[
            "submit",
            "--stream-ref",
            "paced:6:100",
            "--job-id",
            "follow-me",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let url = redis.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_free-roam"))
            .args(["results", "follow-me", "--follow", "--json"])
            .env_clear()
            .env("REDIS_URL", url)
            .env("KEY_PREFIX", p)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[5]["fields"]["frame"], "5");
    assert_eq!(lines[6]["fields"]["kind"], "end");
    assert_eq!(lines[6]["fields"]["status"], "completed");
    w.stop().await;
}

#[test]
fn a_bad_setting_is_one_line_naming_it_with_exit_code_2() {
    let redis = TestRedis::start();
    let o = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .arg("worker")
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("DEFAULT_FPS", "abc")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("invalid DEFAULT_FPS=\"abc\": a number in (0, 30]"),
        "{err}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(["worker", "--log-format", "xml"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("LOG_FORMAT"));
    let o = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(["frobnicate"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn alerts_prints_each_event_once_though_a_retried_write_repeated_it() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let alerts = free_roam::store::keys::Keys::new(&p).alerts();
    let event = |job: &str, kind: &str, reason: &[&str]| {
        let id = format!("{job}:person:7");
        let mut args = vec![
            "XADD",
            &alerts,
            "*",
            "job_id",
            job,
            "alert_id",
            &id,
            "kind",
            kind,
            "label",
            "person",
            "first_frame",
            "7",
            "last_frame",
            "9",
        ];
        args.extend_from_slice(reason);
        let _: String = redis.cmd(&args);
    };
    event("lobby", "start", &[]);
    event("lobby", "start", &[]);
    event("door", "start", &[]);
    event("lobby", "end", &["reason", "cleared"]);
    event("lobby", "end", &["reason", "cleared"]);

    let out = run(&redis, &p, &["alerts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("start") && lines[0].contains("job=lobby"));
    assert!(lines[1].starts_with("start") && lines[1].contains("job=door"));
    assert!(lines[2].starts_with("end") && lines[2].contains("(cleared)"));

    let out = run(&redis, &p, &["alerts", "--job", "lobby", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let kinds: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"]["kind"].to_string()
        })
        .collect();
    assert_eq!(kinds, ["\"start\"", "\"end\""]);
}
