//! The `free-roam` command line against a real Redis: every subcommand, its text and JSON
//! output, and its exit codes (0 ok, 1 not found or failed, 2 bad usage).

use crate::common::process::{run_cli as run, stderr, stdout};
use crate::common::worker::InProcessWorker;
use crate::common::{TestRedis, unique_prefix};
use std::process::Command;

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
    assert_eq!(v["fps"], 1, "numbers are numbers in --json");
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
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three jobs: {text}");
    assert!(
        lines[0].starts_with("JOB") && lines[0].contains("STATUS"),
        "{text}"
    );
    assert!(lines[1].starts_with("raw-1"), "{text}");
    assert!(
        lines[3].starts_with("j1 ") && lines[3].contains("ago"),
        "{text}"
    );
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
    assert_eq!(lines[5]["fields"]["frame"], 5, "numbers are numbers");
    assert!(
        lines[5]["fields"]["output"].is_object(),
        "output is JSON, not a string"
    );
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

#[test]
fn client_commands_take_only_the_connection_settings() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let help = stdout(&run(&redis, &p, &["submit", "--help"]));
    for flag in [
        "--redis-url",
        "--key-prefix",
        "--stream-ref",
        "--scene-gate",
        "--alerts",
    ] {
        assert!(help.contains(flag), "submit --help lacks {flag}: {help}");
    }
    assert!(help.contains("RTSP"), "--stream-ref names RTSP: {help}");
    assert!(!help.contains("--openai"), "{help}");
    assert!(!help.contains("--max-batch-size"), "{help}");
    let status_help = stdout(&run(&redis, &p, &["status", "--help"]));
    let flags = status_help
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .count();
    let connection = free_roam::config::CONNECTION_SETTINGS.len();
    assert_eq!(
        flags,
        connection + 2,
        "status --help lists the connection, --json and --help: {status_help}"
    );
    let o = run(
        &redis,
        &p,
        &[
            "submit",
            "--stream-ref",
            "cam:1",
            "--openai-max-retries",
            "3",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "a worker setting is refused");
    assert!(
        stderr(&o).contains("--openai-max-retries"),
        "{}",
        stderr(&o)
    );
    // A worker setting in the environment is not the client's business.
    let o = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(["status", "nothing-here"])
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("KEY_PREFIX", &p)
        .env("DEFAULT_FPS", "abc")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no job with id nothing-here"));
    // Connection flags go before or after the subcommand, nested ones included.
    let o = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(["prompt", "set", "person", "--redis-url", &redis.url()])
        .args(["--key-prefix", &p])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args([
            "prompt",
            "--redis-url",
            &redis.url(),
            "get",
            "--key-prefix",
            &p,
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "v1  person", "{}", stderr(&o));
    // Every setting stays a flag and a variable of the worker.
    let o = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(["worker", "--help"])
        .output()
        .unwrap();
    let worker_help = stdout(&o);
    for s in free_roam::config::SETTINGS {
        let flag = format!("--{}", s.env.to_ascii_lowercase().replace('_', "-"));
        assert!(worker_help.contains(&flag), "worker --help lacks {flag}");
        assert!(worker_help.contains(s.env), "worker --help lacks {}", s.env);
    }
}

#[test]
fn submit_has_a_flag_for_every_job_field() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let values = [
        ("stream_ref", "rtsp://cam-7.local/stream"),
        ("prompt", "person, car"),
        ("fps", "1.5"),
        ("job_id", "all-fields"),
        ("max_frames", "5"),
        ("max_duration_s", "2.5"),
        ("source", "hls"),
        ("scene_gate", "off"),
        ("alerts", "off"),
        ("alert_min_frames", "3"),
        ("alert_clear_ms", "800"),
        ("rtsp_transport", "udp"),
    ];
    let mut args = vec!["submit".to_string()];
    for field in free_roam::job::JobField::ALL {
        let value = values
            .iter()
            .find(|(name, _)| *name == field.name())
            .map(|(_, v)| *v);
        let Some(value) = value else {
            continue; // a field added since this list was written has its flag too
        };
        args.push(format!("--{}", field.name().replace('_', "-")));
        args.push(value.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&redis, &p, &args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let entries = redis.xrange(&format!("{{{p}}}:jobs"));
    let (_, fields) = &entries[0];
    for (name, value) in values.iter().filter(|(n, _)| *n != "job_id") {
        assert_eq!(
            fields.get(*name).map(String::as_str),
            Some(*value),
            "{name}"
        );
    }
    let help = stdout(&run(&redis, &p, &["submit", "--help"]));
    for field in free_roam::job::JobField::ALL {
        let flag = format!("--{}", field.name().replace('_', "-"));
        assert!(help.contains(&flag), "submit --help lacks {flag}");
    }
    let o = run(
        &redis,
        &p,
        &[
            "submit",
            "--stream-ref",
            "rtsp://c/s",
            "--rtsp-transport",
            "pigeon",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("field `rtsp_transport`"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_both_hashes_the_prompt_mode_and_finds_a_job_by_its_entry_id() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    // Pushed without job_id: the entry id XADD prints finds it, before and after a worker
    // reads it.
    let entry_id = redis
        .cli(&[
            "XADD",
            &format!("{{{p}}}:jobs"),
            "*",
            "stream_ref",
            "paced:3:20",
        ])
        .trim()
        .to_string();
    let o = run(&redis, &p, &["status", &entry_id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("not yet claimed"), "{text}");
    assert!(text.contains("follows the active prompt"), "{text}");
    let o = run(&redis, &p, &["status", &entry_id, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let job_id = v["job_id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&job_id).is_ok(), "{v}");

    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let o = run(
        &redis,
        &p,
        &[
            "submit",
            "--stream-ref",
            "paced:2:20",
            "--prompt",
            "cars",
            "--job-id",
            "own",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ended = |id: &str| {
        redis
            .hget(&format!("{{{p}:{id}}}:progress"), "ended")
            .is_some()
    };
    let (a, b) = (job_id.clone(), "own");
    crate::common::eventually(std::time::Duration::from_secs(30), "both jobs end", || {
        ended(&a) && ended(b)
    })
    .await;
    w.stop().await;

    let o = run(&redis, &p, &["status", &entry_id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains(&format!("job          {job_id}")), "{text}");
    assert!(text.contains("follows the active prompt"), "{text}");
    let (job_part, progress_part) = text.split_once("progress hash:").expect("both hashes");
    assert!(
        job_part.contains("job hash:") && job_part.contains("updated_ms"),
        "{text}"
    );
    assert!(progress_part.contains("updated_ms"), "{text}");
    assert!(progress_part.contains("ended"), "{text}");
    assert!(job_part.contains(" UTC ("), "times read as UTC: {text}");
    let o = run(&redis, &p, &["status", "own"]);
    assert!(
        stdout(&o).contains("prompt       own prompt"),
        "{}",
        stdout(&o)
    );
    let o = run(&redis, &p, &["status", "own", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ended"], "completed");
    assert!(
        v["progress_updated_ms"].is_u64() && v["updated_ms"].is_u64(),
        "{v}"
    );
    let o = run(&redis, &p, &["results", &entry_id]);
    assert_eq!(o.status.code(), Some(0), "results find it by entry id too");
    assert!(
        stdout(&o).contains("end  status=completed results=3"),
        "{}",
        stdout(&o)
    );
}

/// A result entry as an owlvit worker writes it: 400 boxes, a 40 KB line whole.
fn write_owlvit_results(redis: &TestRedis, p: &str, job: &str, frames: u64) {
    let boxes: Vec<serde_json::Value> = (0..400)
        .map(|i| {
            let label = if i % 4 == 0 { "vehicles" } else { "people" };
            let score = 0.5 - f64::from(i) * 0.001;
            serde_json::json!({"label": label, "score": score, "box": [i, 2 * i, i + 10, 2 * i + 20]})
        })
        .collect();
    let output = serde_json::json!({"detections": boxes, "detected": ["people", "vehicles"],
        "frame_size": [640, 360]})
    .to_string();
    let key = format!("{{{p}:{job}}}:results");
    for frame in 0..frames {
        let frame = frame.to_string();
        let _: String = redis.cmd(&[
            "XADD",
            &key,
            "*",
            "kind",
            "result",
            "frame",
            &frame,
            "capture_ms",
            "1765094462000",
            "prompt_version",
            "2",
            "model",
            "owlvit",
            "latency_ms",
            "61.5",
            "output",
            &output,
        ]);
    }
}

#[test]
fn results_are_a_readable_line_by_default_and_whole_with_json_or_full() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    write_owlvit_results(&redis, &p, "owl", 4);
    let o = run(&redis, &p, &["results", "owl"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].len() < 300,
        "a summary, not the output: {}",
        lines[0]
    );
    assert!(
        lines[0].starts_with("frame     0  v2")
            && lines[0].contains("61.5 ms")
            && lines[0].contains("400 boxes: vehicles x100 (best 0.50), people x300 (best 0.50)")
            && lines[0].contains("top: vehicles 0.50 [0,0,10,20]"),
        "{}",
        lines[0]
    );
    let full = stdout(&run(
        &redis,
        &p,
        &["results", "owl", "--full", "--limit", "1"],
    ));
    assert_eq!(full.lines().count(), 1);
    assert!(full.len() > 20_000, "--full prints the output whole");
    let last = stdout(&run(&redis, &p, &["results", "owl", "--last", "2"]));
    let frames: Vec<&str> = last.lines().map(|l| &l[..11]).collect();
    assert_eq!(frames, ["frame     2", "frame     3"]);
    let json = stdout(&run(
        &redis,
        &p,
        &["results", "owl", "--json", "--last", "1"],
    ));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["fields"]["frame"], 3);
    assert_eq!(v["fields"]["latency_ms"], 61.5);
    assert_eq!(v["fields"]["model"], "owlvit");
    assert_eq!(
        v["fields"]["output"]["detections"]
            .as_array()
            .unwrap()
            .len(),
        400
    );
    let o = run(&redis, &p, &["results", "owl", "--last", "0"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), ""));

    let o = run(&redis, &p, &["prompt", "set", "cars"]);
    assert_eq!(o.status.code(), Some(0));
    let history = stdout(&run(&redis, &p, &["prompt", "history"]));
    assert!(
        history.starts_with("v1  20") && history.contains(" UTC ("),
        "{history}"
    );
}

/// An entry pushed with redis-cli without `job_id` is cancelled by the entry id `XADD`
/// printed, before any worker reads it: its job (the id workers derive from the entry) is
/// cancelled, and the entry is marked so that no worker runs it.
#[test]
fn an_unread_entry_without_job_id_is_cancelled_by_its_entry_id() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = free_roam::store::keys::Keys::new(&p);
    // The library is loaded the way any CLI call loads it.
    let o = run(&redis, &p, &["jobs"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let entry = redis.cli(&["XADD", &keys.jobs(), "*", "stream_ref", "cam:9"]);
    let entry = entry.trim();
    let derived = free_roam::queue::job_id_for_entry(keys.tag(), entry);
    let o = run(&redis, &p, &["cancel", entry]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!("{derived}: cancelled"));
    let o = run(&redis, &p, &["status", entry, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(
        redis.hget(&keys.jobs_cancelled(), entry).as_deref(),
        Some(derived.as_str())
    );
}
