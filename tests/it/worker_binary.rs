//! The real `free-roam worker` process: a job on a Redis frame stream runs through the real
//! pipeline (MODEL_TYPE=null), the health endpoint answers, SIGTERM hands a running job
//! back and the process exits 0, and SIGKILL leaves a job that another worker finishes; a
//! question job gets an answer per frame from a tiny random PaliGemma, and a camera job
//! boxes from a tiny random YOLO-World (whose prompt of too many phrases fails at claim),
//! the same boxes for a JPEG frame as the model gives it; a model folder of another family
//! is refused with the family it names; logs carry colour on a terminal only.

use crate::common::process::{WAIT, feed_frames, http_get, raw_frame_xadd, signal, worker};
use crate::common::{TestRedis, free_port, unique_prefix, wait_until};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn results(
    redis: &TestRedis,
    prefix: &str,
    job: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    redis
        .xrange(&free_roam::store::keys::Keys::new(prefix).results(job))
        .into_iter()
        .map(|(_, f)| f)
        .collect()
}

fn ended(redis: &TestRedis, prefix: &str, job: &str) -> Option<String> {
    results(redis, prefix, job)
        .into_iter()
        .find(|f| f.get("kind").map(String::as_str) == Some("end"))
        .map(|f| f["status"].clone())
}

#[test]
fn the_worker_process_runs_a_frame_stream_job_and_answers_health() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let port = free_port();
    let mut w = worker(&redis, &p, port, &[]);
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    feed_frames(&redis, "cam:1", 1_000_000, 30);
    redis.cli(&[
        "XADD",
        &format!("{{{p}}}:jobs"),
        "*",
        "stream_ref",
        "cam:1",
        "fps",
        "2",
        "max_duration_s",
        "2",
        "job_id",
        "j",
    ]);
    wait_until(WAIT, || ended(&redis, &p, "j").is_some());
    assert_eq!(ended(&redis, &p, "j").as_deref(), Some("completed"));
    let rs = results(&redis, &p, "j");
    let frames: Vec<&std::collections::HashMap<String, String>> =
        rs.iter().filter(|f| f["kind"] == "result").collect();
    assert!(!frames.is_empty(), "the sampled frames reach the model");
    assert!(
        frames.len() <= 7,
        "3 s of frames at 2 fps, never more: {}",
        frames.len()
    );
    assert_eq!(frames[0]["model"], "null");
    assert_eq!(frames[0]["output"], "{}");
    let (code, body) = http_get(port, "/health").unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"]["info"]["name"], "null");
    // One queue shard, the default, served.
    assert_eq!(
        v["queue"],
        serde_json::json!({ "shards": 1, "served": [0] }),
        "{v}"
    );
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    assert!(
        metrics.contains("freeroam_jobs_completed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("freeroam_frames_sampled_total"));
    let delays: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("freeroam_result_delay_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(
        delays as usize,
        frames.len(),
        "one delay per result written"
    );
    signal(&w, 15);
    assert!(w.wait().unwrap().success());
}

#[test]
fn a_question_job_gets_an_answer_per_frame_from_paligemma() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let dir = std::env::temp_dir().join(format!("free-roam-{}-paligemma", std::process::id()));
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args([
            "model",
            "make",
            "--type",
            "paligemma",
            "--size",
            "tiny",
            "--seed",
            "3",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let port = free_port();
    let model_path = dir.to_str().unwrap();
    let mut w = worker(
        &redis,
        &p,
        port,
        &[
            ("MODEL_TYPE", "paligemma"),
            ("MODEL_PATH", model_path),
            ("MAX_NEW_TOKENS", "4"),
        ],
    );
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    // Bounded by frames, not seconds, as in the yoloworld test below.
    feed_frames(&redis, "cam:1", 1_000_000, 10);
    redis.cli(&[
        "XADD",
        &format!("{{{p}}}:jobs"),
        "*",
        "stream_ref",
        "cam:1",
        "fps",
        "2",
        "max_frames",
        "1",
        "prompt",
        "answer en is anyone wearing a helmet?",
        "job_id",
        "q",
    ]);
    wait_until(WAIT, || ended(&redis, &p, "q").is_some());
    assert_eq!(ended(&redis, &p, "q").as_deref(), Some("completed"));
    let rs = results(&redis, &p, "q");
    let answers: Vec<serde_json::Value> = rs
        .iter()
        .filter(|f| f["kind"] == "result")
        .map(|f| serde_json::from_str(&f["output"]).unwrap())
        .collect();
    assert!(!answers.is_empty(), "the sampled frames reach the model");
    for a in &answers {
        assert!(a["text"].is_string(), "{a}");
        assert!(a.get("detected").is_none(), "{a}");
    }
    assert!(rs.iter().all(|f| f["kind"] != "error"), "{rs:?}");
    signal(&w, 15);
    assert!(w.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_and_sigkill_lose_no_job() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let lease = [("JOB_LEASE_MS", "3000")];
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let mut a = worker(&redis, &p, pa, &lease);
    wait_until(WAIT, || {
        http_get(pa, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    // A live frame stream that keeps growing while the job runs.
    let feeding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let feeder = {
        let feeding = feeding.clone();
        let url = redis.url();
        std::thread::spawn(move || {
            let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut ts = 2_000_000i64;
            while feeding.load(std::sync::atomic::Ordering::Relaxed) {
                let _: Result<String, _> = raw_frame_xadd("cam:2", None, 7, ts).query(&mut con);
                ts += 100;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    redis.cli(&[
        "XADD",
        &format!("{{{p}}}:jobs"),
        "*",
        "stream_ref",
        "cam:2",
        "fps",
        "4",
        "job_id",
        "live",
    ]);
    let job = free_roam::store::keys::Keys::new(&p).job("live");
    let progress = free_roam::store::keys::Keys::new(&p).progress("live");
    wait_until(WAIT, || {
        redis
            .hget(&progress, "results")
            .is_some_and(|r| r.parse::<u32>().unwrap_or(0) >= 2)
    });

    // SIGTERM: a hands the job back and exits 0; b takes it at once, long before the lease.
    let mut b = worker(&redis, &p, pb, &lease);
    wait_until(WAIT, || {
        http_get(pb, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    let t = Instant::now();
    signal(&a, 15);
    assert!(a.wait().unwrap().success(), "exit 0 on SIGTERM");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "within SHUTDOWN_TIMEOUT_MS"
    );
    wait_until(WAIT, || {
        redis.hget(&job, "handoffs").as_deref() == Some("1")
            && redis.hget(&job, "status").as_deref() == Some("running")
    });
    let before = redis
        .hget(&progress, "results")
        .unwrap()
        .parse::<u32>()
        .unwrap();
    wait_until(WAIT, || {
        redis
            .hget(&progress, "results")
            .unwrap()
            .parse::<u32>()
            .unwrap()
            > before + 2
    });

    // SIGKILL: b dies mid-job; c takes over after the lease and the job goes on.
    let mut c = worker(&redis, &p, pc, &lease);
    wait_until(WAIT, || {
        http_get(pc, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    signal(&b, 9);
    let _ = b.wait();
    let owner_b = redis.hget(&job, "worker").unwrap();
    wait_until(WAIT, || {
        redis.hget(&job, "worker").is_some_and(|w| w != owner_b)
    });
    assert_eq!(
        redis.hget(&job, "attempts").as_deref(),
        Some("2"),
        "the killed run counts"
    );
    let before = redis
        .hget(&progress, "results")
        .unwrap()
        .parse::<u32>()
        .unwrap();
    wait_until(WAIT, || {
        redis
            .hget(&progress, "results")
            .unwrap()
            .parse::<u32>()
            .unwrap()
            > before + 2
    });

    let cancel = redis.cli(&["FCALL", "fr_cancel", "1", &format!("{{{p}}}"), "live"]);
    assert_eq!(cancel.trim(), "cancelling");
    wait_until(WAIT, || ended(&redis, &p, "live").is_some());
    assert_eq!(ended(&redis, &p, "live").as_deref(), Some("cancelled"));
    feeding.store(false, std::sync::atomic::Ordering::Relaxed);
    feeder.join().unwrap();
    signal(&c, 15);
    assert!(c.wait().unwrap().success());
}

/// `free-roam model make --type KIND` into a fresh folder.
#[test]
fn a_yoloworld_worker_boxes_frames_and_refuses_a_prompt_of_too_many_phrases_at_claim() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let dir = make_model("yoloworld");
    let port = free_port();
    let mut w = worker(
        &redis,
        &p,
        port,
        &[
            ("MODEL_TYPE", "yoloworld"),
            ("MODEL_PATH", dir.to_str().unwrap()),
        ],
    );
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    // Bounded by frames, not seconds: on a loaded machine the first frame (and the
    // prompt's text pass) can take longer than a short duration, which would end the job
    // before any frame was answered. The frames are read as one burst, of which a live
    // job keeps the newest: one result, then the job completes.
    feed_frames(&redis, "cam:1", 1_000_000, 10);
    let many: Vec<String> = (0..65).map(|i| format!("thing{i}")).collect();
    for (job, prompt) in [
        ("boxes", "Detect all people and cars".to_string()),
        ("many", many.join(", ")),
    ] {
        redis.cli(&[
            "XADD",
            &format!("{{{p}}}:jobs"),
            "*",
            "stream_ref",
            "cam:1",
            "fps",
            "2",
            "max_frames",
            "1",
            "prompt",
            &prompt,
            "job_id",
            job,
        ]);
    }
    wait_until(WAIT, || {
        ended(&redis, &p, "boxes").is_some() && ended(&redis, &p, "many").is_some()
    });
    assert_eq!(ended(&redis, &p, "boxes").as_deref(), Some("completed"));
    let outputs: Vec<serde_json::Value> = results(&redis, &p, "boxes")
        .iter()
        .filter(|f| f["kind"] == "result")
        .inspect(|f| assert!(f["model"].ends_with("made-yoloworld"), "{f:?}"))
        .map(|f| serde_json::from_str(&f["output"]).unwrap())
        .collect();
    assert!(!outputs.is_empty(), "the sampled frames reach the model");
    let mut boxes = 0;
    for o in &outputs {
        assert_eq!(o["frame_size"], serde_json::json!([8, 8]), "{o}");
        assert_eq!(o["phrases"][0]["phrase"], "people");
        assert_eq!(o["phrases"][1]["phrase"], "cars");
        for d in o["detections"].as_array().unwrap() {
            boxes += 1;
            let b: Vec<f64> = d["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert!(
                b.iter().all(|v| (0.0..=8.0).contains(v)),
                "clipped to the frame: {d}"
            );
            assert!(d["score"].as_f64().unwrap() > 0.25, "{d}");
            assert!(d.get("track_id").is_some(), "{d}");
        }
    }
    assert!(boxes > 0, "the tiny model keeps boxes over 0.25");
    let failed = results(&redis, &p, "many");
    assert_eq!(failed.len(), 1, "the end entry alone: {failed:?}");
    assert_eq!(failed[0]["status"], "failed");
    assert!(
        failed[0]["error"].contains("the prompt gives 65 phrases; at most 64 are scored"),
        "{failed:?}"
    );
    signal(&w, 15);
    assert!(w.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JPEG frame through Redis and a yoloworld worker gets the very boxes the model gives for
/// the worker's decode of the file (the model's own parity with Ultralytics on that file is
/// `parity_yoloworld`'s JPEG test).
#[test]
fn a_jpeg_frame_through_a_yoloworld_worker_gets_the_boxes_the_model_gives_it() {
    use free_roam::model::{ModelSettings, ModelType, PromptRef, load_model};
    let redis = TestRedis::start();
    let p = unique_prefix();
    let dir = make_model_in("yoloworld", "yoloworld-jpeg");
    let port = free_port();
    let mut w = worker(
        &redis,
        &p,
        port,
        &[
            ("MODEL_TYPE", "yoloworld"),
            ("MODEL_PATH", dir.to_str().unwrap()),
        ],
    );
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    let jpeg = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/parity/jpeg/scene-420-320x240.jpg"
    ))
    .unwrap();
    let mut con = redis.client().get_connection().unwrap();
    let _: String = redis::cmd("XADD")
        .arg("cam:jpeg")
        .arg("*")
        .arg("data")
        .arg(&jpeg)
        .arg("ts")
        .arg(1_000_000)
        .query(&mut con)
        .unwrap();
    let job = [
        "XADD",
        &format!("{{{p}}}:jobs"),
        "*",
        "stream_ref",
        "cam:jpeg",
        "prompt",
        "people, cars",
        "max_frames",
        "1",
        "job_id",
        "jpeg",
    ];
    redis.cli(&job);
    wait_until(WAIT, || ended(&redis, &p, "jpeg").is_some());
    assert_eq!(ended(&redis, &p, "jpeg").as_deref(), Some("completed"));
    let entry = results(&redis, &p, "jpeg")
        .into_iter()
        .find(|f| f["kind"] == "result")
        .expect("a result for the frame");
    let mut got: serde_json::Value = serde_json::from_str(&entry["output"]).unwrap();
    for d in got["detections"].as_array_mut().unwrap() {
        // The job's tracker adds track ids; the model gives none.
        d.as_object_mut().unwrap().remove("track_id");
    }

    let settings = ModelSettings {
        model_type: ModelType::YoloWorld,
        model_path: Some(dir.clone()),
        ..ModelSettings::default()
    };
    let frame = free_roam::source::image_decode::decode_image(&jpeg, u64::MAX).unwrap();
    let prompt = PromptRef {
        text: "people, cars".into(),
        version: None,
    };
    let want = load_model(&settings)
        .unwrap()
        .infer(&[&frame], &prompt)
        .unwrap()
        .remove(0);
    assert!(!want["detections"].as_array().unwrap().is_empty());
    assert_eq!(got, want);
    signal(&w, 15);
    assert!(w.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

fn make_model(kind: &str) -> std::path::PathBuf {
    make_model_in(kind, kind)
}

/// A tiny random model of `kind` in a folder of its own, named by `tag` (two tests of one
/// family run at once in this process).
fn make_model_in(kind: &str, tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("free-roam-{}-made-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let made = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .args(["model", "make", "--type", kind, "--size", "tiny"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    dir
}

/// The settings of a worker whose model cannot load, so that it exits by itself: it loads
/// its model before it first asks Redis, so the Redis it is given need not run.
fn failing_worker_env(model_type: &str, model_path: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", format!("redis://127.0.0.1:{}", free_port())),
        ("HEALTH_ADDR", format!("127.0.0.1:{}", free_port())),
        ("LOG_LEVEL", "info".into()),
        ("MODEL_TYPE", model_type.into()),
        ("MODEL_PATH", model_path.into()),
    ]
}

fn run_worker(env: &[(&'static str, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .arg("worker")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_model_folder_of_another_family_is_refused_with_the_family_its_config_names() {
    let owlvit = make_model("owlvit");
    let clip = make_model("clip");
    for (model_type, folder, named) in [("clip", &owlvit, "owlvit"), ("owlvit", &clip, "clip")] {
        let out = run_worker(&failing_worker_env(model_type, folder.to_str().unwrap()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let hint = format!(
            "its config.json names model_type \"{named}\", a MODEL_TYPE={named} checkpoint; \
             set MODEL_TYPE={named}"
        );
        assert!(stderr.contains(&hint), "{stderr}");
        assert!(
            !stderr.contains("lacks"),
            "no list of missing tensors: {stderr}"
        );
    }
    for dir in [owlvit, clip] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let port = free_port();
    let mut w = Command::new(env!("CARGO_BIN_EXE_free-roam"))
        .arg("worker")
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("KEY_PREFIX", &p)
        .env("MODEL_TYPE", "null")
        .env("HEALTH_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    signal(&w, 15);
    let mut log = String::new();
    std::io::Read::read_to_string(&mut w.stderr.take().unwrap(), &mut log).unwrap();
    assert!(w.wait().unwrap().success());
    assert!(log.contains("model loaded"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "no escape codes in a piped log: {log:?}"
    );
}

/// The worker's stderr when it runs on a terminal (a pseudo-terminal of `script`, from
/// util-linux), with `no_color` as NO_COLOR when given.
fn log_on_a_terminal(no_color: Option<&str>) -> String {
    let dir = std::env::temp_dir().join(format!("free-roam-{}-no-model", std::process::id()));
    let mut cmd = Command::new("script");
    cmd.args(["--quiet", "--return", "--command"])
        .arg(format!("'{}' worker", env!("CARGO_BIN_EXE_free-roam")))
        .arg("/dev/null")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .envs(failing_worker_env("clip", dir.to_str().unwrap()))
        .stdin(Stdio::null());
    if let Some(value) = no_color {
        cmd.env("NO_COLOR", value);
    }
    let out = cmd.output().expect("`script` (util-linux) runs");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "the model cannot load: {log}");
    assert!(log.contains("health endpoint listening"), "{log}");
    log
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    assert!(log_on_a_terminal(None).contains("\x1b["));
    assert!(!log_on_a_terminal(Some("1")).contains('\x1b'));
}
