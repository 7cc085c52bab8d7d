//! Redis frame-stream ingest end to end: a test producer `XADD`s JPEG, PNG, raw, MessagePack
//! and broken entries; the job samples, decodes, infers and writes results to a private Redis.

use crate::ingest_support::*;
use free_roam::metrics::Metrics;
use free_roam::model::PromptRule;
use free_roam::prompt::PromptFollow;
use free_roam::prompt::PromptRef;
use free_roam::queue::body::BodyOutcome;
use free_roam::queue::stop::StopReason;
use free_roam::queue::{Worker, WorkerIdentity, WorkerState};
use free_roam::results::{FrameCounters, ResumeState};
use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const LONG: Duration = Duration::from_secs(20);
const KEY: &str = "frames:cam";

fn encode(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 128]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn msgpack(ts: i64, w: u32, h: u32, data: &[u8]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        ts: i64,
        width: u32,
        height: u32,
        format: &'a str,
        #[serde(serialize_with = "as_bin")]
        data: &'a [u8],
    }
    fn as_bin<S: serde::Serializer>(v: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    rmp_serde::to_vec_named(&Envelope {
        ts,
        width: w,
        height: h,
        format: "rgb24",
        data,
    })
    .unwrap()
}

async fn xadd(h: &Harness, fields: &[(&str, Vec<u8>)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(KEY).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v.as_slice());
    }
    h.store.query(&cmd).await.unwrap()
}

fn ts(v: i64) -> (&'static str, Vec<u8>) {
    ("ts", v.to_string().into_bytes())
}

fn output(r: &HashMap<String, String>) -> serde_json::Value {
    serde_json::from_str(&r["output"]).unwrap_or_else(|_| panic!("no output in {r:?}"))
}

async fn wait_hash(h: &Harness, job: &str, field: &str, want: &str) {
    let start = std::time::Instant::now();
    loop {
        if h.job_hash(job).await.get(field).map(String::as_str) == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < LONG,
            "{field} never became {want:?}: {:?}",
            h.job_hash(job).await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_shape_decodes_and_bad_entries_become_error_entries() {
    let h = Harness::new(Box::new(probe_model()), &[("MAX_FRAME_PIXELS", "10000")]);
    let (_prompt_tx, prompt_rx) = watch::channel(PromptRef {
        text: "find cats".into(),
        version: Some(3),
    });
    let spec = h.spec(&[
        ("stream_ref", &format!("redis://{KEY}")),
        ("fps", "2"),
        ("job_id", "mix"),
    ]);
    let job = h.start_with(spec, ResumeState::default(), PromptFollow::Live(prompt_rx));
    wait_hash(
        &h,
        "mix",
        "note",
        &format!("waiting for frame stream {KEY}"),
    )
    .await;

    let raw: Vec<u8> = (0..8 * 4 * 3).map(|i| i as u8).collect();
    let entries: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![
            ("data", encode(64, 48, image::ImageFormat::Jpeg)),
            ts(1_000),
        ],
        vec![("data", encode(32, 32, image::ImageFormat::Png)), ts(2_000)],
        vec![
            ("data", raw.clone()),
            ("width", b"8".to_vec()),
            ("height", b"4".to_vec()),
            ("format", b"rgb24".to_vec()),
            ts(3_000),
        ],
        vec![("frame", msgpack(4_000, 4, 2, &raw[..24]))],
        vec![("data", b"garbage, not an image".to_vec()), ts(5_000)],
        vec![
            ("data", raw[..10].to_vec()),
            ("width", b"8".to_vec()),
            ("height", b"4".to_vec()),
            ("format", b"rgb24".to_vec()),
            ts(6_000),
        ],
        vec![
            ("data", encode(200, 200, image::ImageFormat::Png)),
            ts(7_000),
        ],
        vec![
            ("data", vec![200u8; 16]),
            ("width", b"4".to_vec()),
            ("height", b"4".to_vec()),
            ("format", b"gray8".to_vec()),
            ts(8_000),
        ],
    ];
    let mut ids = Vec::new();
    for (i, fields) in entries.iter().enumerate() {
        ids.push(xadd(&h, fields).await);
        h.wait_results("mix", i + 1, LONG).await;
    }
    let results = h.results("mix").await;
    let kinds: Vec<&str> = results.iter().map(|r| r["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "result", "result", "result", "result", "error", "error", "error", "result"
        ]
    );
    let dims: Vec<(u64, u64)> = [0, 1, 2, 3, 7]
        .iter()
        .map(|i| {
            let o = output(&results[*i]);
            (o["w"].as_u64().unwrap(), o["h"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(dims, [(64, 48), (32, 32), (8, 4), (4, 2), (4, 4)]);
    assert_eq!(
        output(&results[7])["mean"],
        200,
        "gray8 expands to equal RGB"
    );
    assert!(
        results[4]["error"].contains("not a JPEG or PNG"),
        "{:?}",
        results[4]
    );
    assert!(
        results[5]["error"].contains("needs 96 bytes, got 10"),
        "{:?}",
        results[5]
    );
    assert!(
        results[6]["error"].contains("MAX_FRAME_PIXELS"),
        "{:?}",
        results[6]
    );
    for (i, r) in results.iter().enumerate() {
        assert_eq!(num(r, "frame"), i as i64);
        assert_eq!(num(r, "capture_ms"), (i as i64 + 1) * 1000);
        assert_eq!(num(r, "prompt_version"), 3);
    }
    assert_eq!(output(&results[0])["prompt"], "find cats");

    let hash = h.job_hash("mix").await;
    assert_eq!(hash["frames_decoded"], "8");
    assert_eq!(hash["frames_sampled"], "8");
    assert_eq!(hash["frames_failed"], "3");
    assert_eq!(hash["cursor"], ids[7]);
    assert_eq!(hash["note"], format!("reading frame stream {KEY}"));

    job.stop.stop(StopReason::Shutdown);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_job_resumes_right_after_its_cursor() {
    let h = Harness::new(Box::new(probe_model()), &[]);
    let fields = [("stream_ref", KEY), ("fps", "2"), ("job_id", "res")];
    let png = |t: i64| vec![("data", encode(8, 8, image::ImageFormat::Png)), ts(t)];

    let job = h.start(h.spec(&fields), ResumeState::default());
    wait_hash(
        &h,
        "res",
        "note",
        &format!("waiting for frame stream {KEY}"),
    )
    .await;
    for i in 0..3 {
        xadd(&h, &png(i * 1000)).await;
        h.wait_results("res", i as usize + 1, LONG).await;
    }
    job.stop.stop(StopReason::Shutdown);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
    let hash = h.job_hash("res").await;
    let cursor = hash["cursor"].clone();

    // Written while no worker ran the job: the next delivery must start with it.
    xadd(&h, &png(3_000)).await;
    let count = |k: &str| hash[k].parse::<u64>().unwrap();
    let resume = ResumeState {
        cursor: Some(cursor),
        results: count("results"),
        counters: FrameCounters {
            frames_decoded: count("frames_decoded"),
            frames_sampled: count("frames_sampled"),
            frames_dropped: count("frames_dropped"),
            frames_failed: count("frames_failed"),
        },
        attempt: 2,
    };
    let job = h.start(h.spec(&fields), resume);
    let results = h.wait_results("res", 4, LONG).await;
    xadd(&h, &png(4_000)).await;
    let results2 = h.wait_results("res", 5, LONG).await;
    job.stop.stop(StopReason::Shutdown);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));

    assert_eq!(results.len(), 4);
    let capture: Vec<i64> = results2.iter().map(|r| num(r, "capture_ms")).collect();
    assert_eq!(
        capture,
        [0, 1000, 2000, 3000, 4000],
        "nothing repeated, nothing skipped"
    );
    let frames: Vec<i64> = results2.iter().map(|r| num(r, "frame")).collect();
    assert_eq!(frames, [0, 1, 2, 3, 4]);
    assert_eq!(h.counter("res", "results").await, 5);
    assert_eq!(h.counter("res", "frames_decoded").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_sampled_by_timestamp_and_only_the_newest_kept_frame_is_inferred() {
    let h = Harness::new(Box::new(probe_model()), &[]);
    let job = h.start(
        h.spec(&[("stream_ref", KEY), ("fps", "2"), ("job_id", "burst")]),
        ResumeState::default(),
    );
    wait_hash(
        &h,
        "burst",
        "note",
        &format!("waiting for frame stream {KEY}"),
    )
    .await;
    // 20 frames 100 ms apart, written in one transaction so one read sees them all.
    let data = encode(8, 8, image::ImageFormat::Png);
    let mut pipe = redis::pipe();
    pipe.atomic();
    for i in 0..20 {
        pipe.cmd("XADD")
            .arg(KEY)
            .arg("*")
            .arg("data")
            .arg(&data)
            .arg("ts")
            .arg(i * 100)
            .ignore();
    }
    let () = h.store.pipe(&pipe).await.unwrap();
    let results = h.wait_results("burst", 1, LONG).await;
    // A read of a few entries (ts 0..300) comes back full, so the reader skips to the
    // newest entry (ts 1900): the sampler keeps 0 and 1900, and the newest of those wins.
    assert_eq!(num(&results[0], "capture_ms"), 1900);
    let hash = h.job_hash("burst").await;
    assert_eq!(
        hash["frames_decoded"], "5",
        "the entries read: 4 and the newest"
    );
    assert_eq!(hash["frames_sampled"], "2");
    assert_eq!(hash["frames_dropped"], "1");
    job.stop.stop(StopReason::Cancelled);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
    assert_eq!(h.results("burst").await.len(), 1);
}

/// The bytes Redis has sent its clients so far (`INFO stats`).
async fn bytes_sent(h: &Harness) -> u64 {
    let info: String = h
        .store
        .query(redis::cmd("INFO").arg("stats"))
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_net_output_bytes")
}

/// A job that resumes far behind its stream (handed back while the producer went on at 30
/// fps) reads a few entries and the newest, not the backlog: what Redis sends it stays a
/// few frames' worth, and the frame it answers is the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resuming_far_behind_its_stream_reads_a_few_entries_not_the_backlog() {
    let h = Harness::new(Box::new(probe_model()), &[]);
    let side: u32 = 128;
    let frame_bytes = (side * side * 3) as usize;
    let raw = |t: i64| {
        vec![
            ("data", vec![(t % 251) as u8; frame_bytes]),
            ("width", side.to_string().into_bytes()),
            ("height", side.to_string().into_bytes()),
            ("format", b"rgb24".to_vec()),
            ts(t),
        ]
    };
    let cursor = xadd(&h, &raw(0)).await;
    let backlog = 300;
    for i in 1..=backlog {
        xadd(&h, &raw(i * 33)).await;
    }
    let before = bytes_sent(&h).await;
    let resume = ResumeState {
        cursor: Some(cursor),
        ..ResumeState::default()
    };
    let job = h.start(
        h.spec(&[("stream_ref", KEY), ("fps", "2"), ("job_id", "behind")]),
        resume,
    );
    let results = h.wait_results("behind", 1, LONG).await;
    let sent = bytes_sent(&h).await - before;
    job.stop.stop(StopReason::Shutdown);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
    assert_eq!(num(&results[0], "capture_ms"), backlog * 33, "the newest");
    assert!(
        sent < 10 * frame_bytes as u64,
        "{sent} bytes sent for a backlog of {} frames of {frame_bytes} bytes",
        backlog
    );
    assert_eq!(
        h.counter("behind", "frames_decoded").await,
        5,
        "4 read, and the newest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_model_makes_the_stream_drop_frames_instead_of_queueing_them() {
    // One frame per 400 ms call, against frames arriving every 50 ms for 1.5 s: frames that
    // arrived together wait together (LIVE_QUEUE_MS), older ones are dropped for newer ones.
    let h = Harness::new(
        Box::new(probe_model().with_pause(Duration::from_millis(400))),
        &[("MAX_BATCH_SIZE", "1")],
    );
    let job = h.start(
        h.spec(&[
            ("stream_ref", KEY),
            ("fps", "2"),
            ("job_id", "slow"),
            ("scene_gate", "off"),
        ]),
        ResumeState::default(),
    );
    wait_hash(
        &h,
        "slow",
        "note",
        &format!("waiting for frame stream {KEY}"),
    )
    .await;
    let data = encode(8, 8, image::ImageFormat::Png);
    let mut last = String::new();
    for i in 0..30 {
        last = xadd(&h, &[("data", data.clone()), ts(i * 1000)]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every sampled frame is accounted for once the last one is settled.
    wait_hash(&h, "slow", "cursor", &last).await;
    let hash = h.job_hash("slow").await;
    let c = |k: &str| hash[k].parse::<u64>().unwrap();
    assert_eq!(c("frames_sampled"), 30);
    assert_eq!(
        c("frames_sampled"),
        c("results") + c("frames_dropped"),
        "{hash:?}"
    );
    assert!(c("frames_dropped") >= 1, "{hash:?}");
    let results = h.results("slow").await;
    assert_eq!(
        num(results.last().unwrap(), "capture_ms"),
        29000,
        "the newest frame is inferred"
    );
    assert_eq!(h.metrics.frames_dropped.get(), c("frames_dropped"));
    job.stop.stop(StopReason::Shutdown);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_ends_with_max_duration_and_a_wrong_key_type_fails() {
    let h = Harness::new(Box::new(probe_model()), &[]);
    let spec = h.spec(&[
        ("stream_ref", "never:written"),
        ("job_id", "wait"),
        ("max_duration_s", "1"),
    ]);
    assert_eq!(
        h.start(spec, ResumeState::default()).finish(LONG).await,
        Ok(BodyOutcome::Completed)
    );
    assert_eq!(
        h.job_hash("wait").await["note"],
        "waiting for frame stream never:written"
    );
    assert!(h.results("wait").await.is_empty());

    let () = h
        .store
        .query(redis::cmd("SET").arg("plain:string").arg("x"))
        .await
        .unwrap();
    let spec = h.spec(&[("stream_ref", "plain:string"), ("job_id", "wrong")]);
    let err = h
        .start(spec, ResumeState::default())
        .finish(LONG)
        .await
        .unwrap_err();
    assert!(err.message.contains("not a stream"), "{}", err.message);
}

/// The stall watchdog (STALL_TIMEOUT_MS): a frame stream deleted mid-job fails its job with
/// an error saying so, instead of leaving it waiting for ever (scripts/chaos found such a
/// job still running minutes later); a stream whose producer stopped fails the same way,
/// naming the silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_stream_deleted_or_gone_silent_fails_its_job_after_the_stall_timeout() {
    let h = Harness::new(Box::new(probe_model()), &[("STALL_TIMEOUT_MS", "1500")]);
    let png = |t: i64| vec![("data", encode(8, 8, image::ImageFormat::Png)), ts(t)];
    for (job, delete) in [("deleted", true), ("silent", false)] {
        xadd(&h, &png(1_000)).await;
        let spec = h.spec(&[("stream_ref", KEY), ("fps", "2"), ("job_id", job)]);
        let running = h.start(spec, ResumeState::default());
        xadd(&h, &png(2_000)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if delete {
            let _: i64 = h.store.query(redis::cmd("DEL").arg(KEY)).await.unwrap();
        }
        let asked = std::time::Instant::now();
        let err = running.finish(LONG).await.unwrap_err();
        let took = asked.elapsed();
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_secs(5),
            "{job}: failed {took:?} after its last frame"
        );
        let want = if delete {
            format!("frame stream `{KEY}` does not exist (deleted, or never written)")
        } else {
            format!("no frame from frame stream `{KEY}` for 1.5 s (STALL_TIMEOUT_MS)")
        };
        assert!(err.message.contains(&want), "{job}: {}", err.message);
        assert!(!h.results(job).await.is_empty(), "{job} ran before");
        let _: i64 = h.store.query(redis::cmd("DEL").arg(KEY)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_its_own_prompt_follows_the_active_one_from_the_next_batch() {
    let h = Harness::new(Box::new(probe_model()), &[]);
    let (prompt_tx, prompt_rx) = watch::channel(PromptRef {
        text: "cats".into(),
        version: Some(1),
    });
    let spec = h.spec(&[("stream_ref", KEY), ("fps", "2"), ("job_id", "follow")]);
    let job = h.start_with(spec, ResumeState::default(), PromptFollow::Live(prompt_rx));
    wait_hash(
        &h,
        "follow",
        "note",
        &format!("waiting for frame stream {KEY}"),
    )
    .await;
    let png = encode(8, 8, image::ImageFormat::Png);
    xadd(&h, &[("data", png.clone()), ts(0)]).await;
    h.wait_results("follow", 1, LONG).await;
    prompt_tx
        .send(PromptRef {
            text: "dogs".into(),
            version: Some(2),
        })
        .unwrap();
    xadd(&h, &[("data", png), ts(1_000)]).await;
    let results = h.wait_results("follow", 2, LONG).await;
    let seen: Vec<(i64, String)> = results
        .iter()
        .map(|r| {
            (
                num(r, "prompt_version"),
                output(r)["prompt"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(seen, [(1, "cats".to_string()), (2, "dogs".to_string())]);
    assert_eq!(h.job_hash("follow").await["prompt_version"], "2");
    job.stop.stop(StopReason::Shutdown);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
}

/// Runs a job entry through a whole worker (queue and stream body) while frames arrive every
/// 100 ms; returns the job's result entries once its end entry is there, and its job hash.
async fn run_through_a_worker(
    h: &Harness,
    entry: &[(&str, &str)],
    job_id: &str,
) -> (Vec<HashMap<String, String>>, HashMap<String, String>) {
    let worker = Arc::new(Worker::new(
        h.store.clone(),
        Arc::new(h.config.queue.clone()),
        h.body.clone(),
        Arc::new(Metrics::default()),
        Arc::new(WorkerState::default()),
        WorkerIdentity {
            id: "w1".into(),
            model: "probe".into(),
            device: "cpu".into(),
        },
    ));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let mut cmd = redis::cmd("XADD");
    cmd.arg(h.store.keys().jobs()).arg("*");
    for (k, v) in entry {
        cmd.arg(*k).arg(*v);
    }
    let _: String = h.store.query(&cmd).await.unwrap();
    let png = encode(8, 8, image::ImageFormat::Png);
    let start = std::time::Instant::now();
    loop {
        let results = h.results(job_id).await;
        if results.iter().any(|r| r["kind"] == "end") {
            break;
        }
        assert!(start.elapsed() < LONG, "no end entry: {results:?}");
        xadd(h, &[("data", png.clone()), ts(free_roam::store::now_ms())]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more frames, which a job that ended must not answer.
    for _ in 0..5 {
        xadd(h, &[("data", png.clone()), ts(free_roam::store::now_ms())]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(LONG, running).await.unwrap().unwrap();
    let hash: HashMap<String, String> = h
        .store
        .query(redis::cmd("HGETALL").arg(h.store.keys().job(job_id)))
        .await
        .unwrap();
    (h.results(job_id).await, hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_names_nothing_fails_the_job_once_when_claimed() {
    let entry = [
        ("stream_ref", KEY),
        ("prompt", "Detect:"),
        ("fps", "10"),
        ("max_frames", "3"),
        ("job_id", "nothing"),
    ];
    // A model that looks for phrases: the job fails at claim and never reads a frame.
    let h = Harness::new(
        Box::new(probe_model().with_prompt_rule(PromptRule::Phrases)),
        &[],
    );
    let (results, hash) = run_through_a_worker(&h, &entry, "nothing").await;
    assert_eq!(hash["status"], "failed", "{hash:?}");
    assert!(
        hash["error"].starts_with("field `prompt`: the prompt names nothing to look for"),
        "{hash:?}"
    );
    assert_eq!(results.len(), 1, "the end entry alone: {results:?}");
    assert_eq!(results[0]["kind"], "end");
    assert_eq!(results[0]["error"], hash["error"]);
    assert!(!h.job_hash("nothing").await.contains_key("frames_decoded"));
    drop(h);

    // A model that takes any prompt (a captioning model continues it) runs the same job.
    let h = Harness::new(Box::new(probe_model()), &[]);
    let (results, hash) = run_through_a_worker(&h, &entry, "nothing").await;
    assert_eq!(hash["status"], "completed", "{hash:?}");
    let kinds: Vec<&str> = results.iter().map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds, ["result", "result", "result", "end"]);
}
