//! HLS ingest end to end: playlists made by ffmpeg, served over HTTP by the test, decoded by
//! the real ffmpeg child, run through the engine and written to a private Redis.

use crate::ingest_support::*;
use free_roam::job::{JobSpec, SourceKind};
use free_roam::model::testing::stub::StubModel;
use free_roam::queue::body::BodyOutcome;
use free_roam::queue::stop::StopReason;
use free_roam::results::{FrameCounters, ResumeState};
use std::collections::BTreeMap;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(20);

fn model() -> Box<StubModel> {
    Box::new(probe_model())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_playlist_yields_one_result_per_sampled_frame_and_completes() {
    let dir = TempDir::new("vod");
    make_vod(&dir.0, 12);
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(model(), &[("MAX_FRAME_SIDE", "160")]);
    let spec = h.spec(&[
        ("stream_ref", &server.url("vod.m3u8")),
        ("fps", "2"),
        ("job_id", "vod"),
    ]);
    assert_eq!(spec.source, SourceKind::Hls);
    let outcome = h.start(spec, ResumeState::default()).finish(LONG).await;
    assert_eq!(outcome, Ok(BodyOutcome::Completed));

    let results = h.results("vod").await;
    // 12 s at 2 fps.
    assert!(
        (23..=25).contains(&results.len()),
        "{} results",
        results.len()
    );
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["kind"], "result", "{r:?}");
        assert_eq!(num(r, "frame"), i as i64);
        assert_eq!(num(r, "pts_ms"), i as i64 * 500);
        assert_eq!(r["model"], "probe");
        let out: serde_json::Value = serde_json::from_str(&r["output"]).unwrap();
        // 320x240 scaled so the longer side is MAX_FRAME_SIDE, and the frame knows the
        // size it had before, for models that give positions in the source's pixels.
        assert_eq!(
            (out["w"].as_u64(), out["h"].as_u64()),
            (Some(160), Some(120))
        );
        assert_eq!(out["source"], serde_json::json!([320, 240]), "frame {i}");
        assert!(
            out["mean"].as_u64().unwrap() > 10,
            "frames hold picture data"
        );
    }
    let hash = h.job_hash("vod").await;
    let n = results.len().to_string();
    assert_eq!(hash["frames_decoded"], n);
    assert_eq!(hash["frames_sampled"], n);
    assert_eq!(
        hash["frames_dropped"], "0",
        "a recording is not dropped from"
    );
    assert_eq!(hash["frames_failed"], "0");
    assert_eq!(hash["results"], n);
    assert_eq!(
        hash["cursor"],
        format!("pts_ms:{}", (results.len() - 1) * 500)
    );
    assert_eq!(h.metrics.results_written.get(), results.len() as u64);
    assert_eq!(h.metrics.frames_decoded.get(), results.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_recording_resumes_after_its_last_result() {
    let dir = TempDir::new("resume");
    make_vod(&dir.0, 8);
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(model(), &[]);
    let fields = [
        ("stream_ref", server.url("vod.m3u8")),
        ("fps", "2".into()),
        ("job_id", "r".into()),
    ];
    let as_refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // First delivery: max_frames stops it after 5 results.
    let mut spec = h.spec(&as_refs);
    spec.max_frames = Some(5);
    let first = h.start(spec, ResumeState::default()).finish(LONG).await;
    assert_eq!(first, Ok(BodyOutcome::Completed));
    let hash = h.job_hash("r").await;
    assert_eq!(hash["cursor"], "pts_ms:2000");

    // Second delivery, as the lifecycle builds it from the hash.
    let count = |k: &str| hash[k].parse::<u64>().unwrap();
    let resume = ResumeState {
        cursor: Some(hash["cursor"].clone()),
        results: count("results"),
        counters: FrameCounters {
            frames_decoded: count("frames_decoded"),
            frames_sampled: count("frames_sampled"),
            frames_dropped: count("frames_dropped"),
            frames_failed: count("frames_failed"),
        },
        attempt: 2,
    };
    let second = h.start(h.spec(&as_refs), resume).finish(LONG).await;
    assert_eq!(second, Ok(BodyOutcome::Completed));
    let results = h.results("r").await;
    let frames: Vec<i64> = results.iter().map(|r| num(r, "frame")).collect();
    let pts: Vec<i64> = results.iter().map(|r| num(r, "pts_ms")).collect();
    // 8 s at 2 fps, each frame once, in order.
    assert!((15..=17).contains(&frames.len()), "{frames:?}");
    assert_eq!(frames, (0..frames.len() as i64).collect::<Vec<_>>());
    assert_eq!(
        pts,
        (0..pts.len() as i64).map(|i| i * 500).collect::<Vec<_>>()
    );
    assert_eq!(h.counter("r", "results").await, frames.len() as u64);
    // The first delivery may have decoded a frame or two past max_frames before it ended.
    let decoded = h.counter("r", "frames_decoded").await;
    assert!(
        (frames.len() as u64..=frames.len() as u64 + 2).contains(&decoded),
        "{decoded}"
    );
}

/// Publishes a live playlist over the first `segments` segments of a `make_vod` output
/// (2 s each), atomically, with ENDLIST when `ended`.
fn publish_live(dir: &std::path::Path, segments: usize, ended: bool) {
    let mut text = String::from(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n",
    );
    for i in 0..segments {
        text.push_str(&format!("#EXTINF:2.000000,\nvod{i}.ts\n"));
    }
    if ended {
        text.push_str("#EXT-X-ENDLIST\n");
    }
    let tmp = dir.join("live.m3u8.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("live.m3u8")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_playlist_is_followed_from_its_edge_as_it_grows_and_ends_with_its_endlist() {
    let dir = TempDir::new("live");
    make_vod(&dir.0, 10);
    // Three segments (6 s) are listed when the job starts.
    publish_live(&dir.0, 3, false);
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(model(), &[]);
    let spec = h.spec(&[
        ("stream_ref", &server.url("live.m3u8")),
        ("fps", "2"),
        ("job_id", "live"),
    ]);
    let job = h.start(spec, ResumeState::default());
    // It starts at the live edge: the newest segment listed.
    server.wait_request("vod2.ts").await;
    // The playlist grows by two segments; the job reads them after a reload.
    publish_live(&dir.0, 5, false);
    server.wait_request("vod4.ts").await;
    // ENDLIST: the job completes after the last frame.
    publish_live(&dir.0, 5, true);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Completed));

    let hash = h.job_hash("live").await;
    let c = |k: &str| hash[k].parse::<u64>().unwrap();
    // Started at the live edge (the third segment): 3 segments of 4 frames were decoded,
    // not all 5 listed in the end.
    assert!(!server.requested("vod0.ts") && !server.requested("vod1.ts"));
    assert!((9..=13).contains(&c("frames_decoded")), "{hash:?}");
    assert_eq!(
        c("frames_sampled"),
        c("results") + c("frames_dropped") + c("frames_failed")
    );
    assert!(
        !hash.contains_key("cursor"),
        "a live stream saves no resume position"
    );
    let frames: Vec<i64> = h
        .results("live")
        .await
        .iter()
        .map(|r| num(r, "frame"))
        .collect();
    assert!(frames.windows(2).all(|w| w[0] < w[1]), "{frames:?}");
}

/// Segments cut short (the server declares their length and closes early) still give the
/// frames they hold, and the job's progress hash says that the stream is damaged and how.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_segments_are_told_in_the_jobs_note() {
    let dir = TempDir::new("trunc");
    make_vod(&dir.0, 10);
    for i in 2..4 {
        std::fs::write(dir.0.join(format!("vod{i}.truncate")), "").unwrap();
    }
    publish_live(&dir.0, 3, false);
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(model(), &[]);
    let spec = h.spec(&[
        ("stream_ref", &server.url("live.m3u8")),
        ("fps", "2"),
        ("job_id", "trunc"),
    ]);
    let job = h.start(spec, ResumeState::default());
    server.wait_request("vod2.ts").await;
    publish_live(&dir.0, 5, false);
    server.wait_request("vod4.ts").await;
    let start = std::time::Instant::now();
    let note = loop {
        let hash = h.job_hash("trunc").await;
        if let Some(note) = hash.get("note").filter(|n| n.starts_with("stream damaged")) {
            break note.clone();
        }
        assert!(start.elapsed() < LONG, "no damage note: {hash:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(note.contains("Stream ends prematurely"), "{note}");
    // The frames the stream still gives are answered.
    h.wait_results("trunc", 2, LONG).await;
    job.stop.stop(StopReason::Cancelled);
    let _ = job.finish(LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_vanishes_is_retried_then_fails_with_what_ffmpeg_said() {
    let dir = TempDir::new("vanish");
    let encoder = LiveEncoder::start(&dir.0, 30);
    encoder.wait_segments(2).await;
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(model(), &[("SOURCE_RETRIES", "2")]);
    let spec = h.spec(&[("stream_ref", &server.url("live.m3u8")), ("job_id", "gone")]);
    let job = h.start(spec, ResumeState::default());
    h.wait_results("gone", 1, LONG).await;
    server.vanish().await;
    let err = job.finish(LONG).await.unwrap_err();
    assert!(err.message.contains("(3 attempts)"), "{}", err.message);
    assert!(
        err.message.contains("Connection refused"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains(&server.url("live.m3u8")),
        "{}",
        err.message
    );
    drop(encoder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_playlist_fails_with_the_404() {
    let dir = TempDir::new("404");
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(model(), &[("SOURCE_RETRIES", "1")]);
    let spec = h.spec(&[
        ("stream_ref", &server.url("missing.m3u8")),
        ("job_id", "nf"),
    ]);
    let err = h
        .start(spec, ResumeState::default())
        .finish(LONG)
        .await
        .unwrap_err();
    assert!(err.message.contains("404"), "{}", err.message);
    assert!(err.message.contains("(2 attempts)"), "{}", err.message);
    assert!(h.results("nf").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_ends_a_live_job_as_completed() {
    let dir = TempDir::new("maxdur");
    let encoder = LiveEncoder::start(&dir.0, 30);
    encoder.wait_segments(2).await;
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(model(), &[]);
    let spec = h.spec(&[
        ("stream_ref", &server.url("live.m3u8")),
        ("job_id", "md"),
        ("max_duration_s", "3"),
    ]);
    assert_eq!(
        h.start(spec, ResumeState::default()).finish(LONG).await,
        Ok(BodyOutcome::Completed)
    );
    // The encoder runs for 30 s, so the job did not end with the stream.
    assert!(
        !std::fs::read_to_string(&encoder.playlist)
            .unwrap()
            .contains("ENDLIST")
    );
}

/// A spec built field by field, bypassing `JobSpec::parse`, to show the source checks the
/// reference again on its own.
fn raw_spec(stream_ref: &str, source: SourceKind) -> JobSpec {
    JobSpec {
        job_id: "refused".into(),
        entry_id: "1-0".into(),
        stream_ref: stream_ref.into(),
        source,
        prompt: None,
        fps: 2.0,
        max_frames: None,
        max_duration_s: None,
        scene_gate: None,
        alerts: None,
        rtsp_transport: Default::default(),
        tracker: Default::default(),
        places: Default::default(),
        extra: BTreeMap::new(),
        warnings: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_stream_refs_are_refused_with_a_reason() {
    let h = Harness::new(model(), &[("ALLOW_FILE_SOURCES", "false")]);
    let cases = [
        ("/var/media/clip.m3u8", "ALLOW_FILE_SOURCES"),
        ("file:/etc/passwd", "ALLOW_FILE_SOURCES"),
        ("concat:/a.ts|/b.ts", "ALLOW_FILE_SOURCES"),
        ("-i /etc/passwd", "'-'"),
        ("http://h/a.m3u8\n-y", "control characters"),
    ];
    for (stream_ref, expect) in cases {
        let err = h
            .start(
                raw_spec(stream_ref, SourceKind::Hls),
                ResumeState::default(),
            )
            .finish(LONG)
            .await
            .unwrap_err();
        assert!(
            err.message.contains(expect),
            "{stream_ref:?}: {}",
            err.message
        );
    }
    let long = format!("http://h/{}", "a".repeat(3000));
    let err = h
        .start(raw_spec(&long, SourceKind::Hls), ResumeState::default())
        .finish(LONG)
        .await
        .unwrap_err();
    assert!(err.message.contains("longer than"), "{}", err.message);
    let err = h
        .start(
            raw_spec("redis://-x", SourceKind::Redis),
            ResumeState::default(),
        )
        .finish(LONG)
        .await
        .unwrap_err();
    assert!(err.message.contains("'-'"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_play_when_allowed() {
    let dir = TempDir::new("file");
    let playlist = make_vod(&dir.0, 2);
    let h = Harness::new(model(), &[("ALLOW_FILE_SOURCES", "true")]);
    let spec = h.spec(&[
        ("stream_ref", playlist.to_str().unwrap()),
        ("source", "hls"),
        ("job_id", "local"),
    ]);
    assert_eq!(
        h.start(spec, ResumeState::default()).finish(LONG).await,
        Ok(BodyOutcome::Completed)
    );
    let n = h.results("local").await.len();
    assert!((3..=5).contains(&n), "{n} results");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_faster_than_the_model_drops_frames_instead_of_queueing() {
    let dir = TempDir::new("slow");
    let encoder = LiveEncoder::start(&dir.0, 30);
    encoder.wait_segments(2).await;
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(
        Box::new(probe_model().with_pause(Duration::from_millis(1500))),
        &[],
    );
    let spec = h.spec(&[
        ("stream_ref", &server.url("live.m3u8")),
        ("fps", "2"),
        ("job_id", "slow"),
    ]);
    let job = h.start(spec, ResumeState::default());
    // Frames come every 0.5 s and the model takes 1.5 s: some must be dropped.
    let start = std::time::Instant::now();
    while h.counter("slow", "results").await < 2 || h.counter("slow", "frames_dropped").await < 1 {
        assert!(start.elapsed() < LONG, "{:?}", h.job_hash("slow").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    job.stop.stop(StopReason::Cancelled);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
    let hash = h.job_hash("slow").await;
    let c = |k: &str| hash[k].parse::<u64>().unwrap();
    // Every sampled frame was inferred or dropped, except those still on their way when
    // the job stopped: one in the source's slot, the engine's queue (LIVE_QUEUE_MS of 1 s
    // at 2 fps: two frames) and one in the model.
    let settled = c("results") + c("frames_dropped");
    assert!(
        settled <= c("frames_sampled") && c("frames_sampled") <= settled + 4,
        "{hash:?}"
    );
    drop(encoder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segments_burst_waits_for_a_busy_model_instead_of_replacing_itself() {
    let dir = TempDir::new("burst");
    let encoder = LiveEncoder::start(&dir.0, 40);
    encoder.wait_segments(2).await;
    let server = FileServer::start(&dir.0).await;
    // The model has time for every frame (4 a second, 150 ms a call), but they arrive a
    // segment (four frames) at a time, within milliseconds: while the model runs the first,
    // the other three must wait rather than replace one another.
    let h = Harness::new(
        Box::new(probe_model().with_pause(Duration::from_millis(150))),
        &[],
    );
    let spec = h.spec(&[
        ("stream_ref", &server.url("live.m3u8")),
        ("fps", "4"),
        ("job_id", "burst"),
    ]);
    let job = h.start(spec, ResumeState::default());
    // A job starts with whatever ffmpeg hands over first (up to two segments at once), so
    // count from the fifth result on.
    let start = std::time::Instant::now();
    let wait_for = async |n: u64| {
        while h.counter("burst", "results").await < n {
            assert!(start.elapsed() < LONG, "{:?}", h.job_hash("burst").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for(5).await;
    let results_before = h.counter("burst", "results").await;
    let dropped_before = h.counter("burst", "frames_dropped").await;
    wait_for(results_before + 16).await;
    job.stop.stop(StopReason::Cancelled);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
    let hash = h.job_hash("burst").await;
    let c = |k: &str| hash[k].parse::<u64>().unwrap();
    let results = c("results") - results_before;
    let dropped = c("frames_dropped") - dropped_before;
    // A one-frame slot loses two frames of every four here; allow a stray hiccup.
    assert!(
        dropped * 8 <= results,
        "{dropped} dropped, {results} inferred since the fifth result: {hash:?}"
    );
    drop(encoder);
}

/// Writes `cross.m3u8` beside a `make_vod` output: the same segments, each named by an
/// absolute URL on `segment_host` (`http://host:port`).
fn publish_cross_host(dir: &std::path::Path, segment_host: &str) {
    let vod = std::fs::read_to_string(dir.join("vod.m3u8")).unwrap();
    let text: String = vod
        .lines()
        .map(|l| {
            if l.ends_with(".ts") {
                format!("{segment_host}/{l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(text.contains(&format!("{segment_host}/vod0.ts")), "{text}");
    std::fs::write(dir.join("cross.m3u8"), text).unwrap();
}

/// Two servers on 127.0.0.1 (hosts A and B to ALLOWED_STREAM_HOSTS, which tells them by
/// port) over one recording, A's `cross.m3u8` naming its segments on B.
async fn two_hosts(tag: &str) -> (TempDir, FileServer, FileServer) {
    let dir = TempDir::new(tag);
    make_vod(&dir.0, 4);
    let a = FileServer::start(&dir.0).await;
    let b = FileServer::start(&dir.0).await;
    publish_cross_host(&dir.0, &format!("http://127.0.0.1:{}", b.port));
    (dir, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_keys_or_variants_on_a_host_not_allowed_fail_the_job_and_are_never_fetched() {
    let (dir, a, b) = two_hosts("cross-refused").await;
    // A second playlist keeps its segments on A but fetches its AES key from B.
    let vod = std::fs::read_to_string(dir.0.join("vod.m3u8")).unwrap();
    let key_line = format!(
        "#EXT-X-KEY:METHOD=AES-128,URI=\"http://127.0.0.1:{}/key.bin\"\n#EXTINF",
        b.port
    );
    std::fs::write(
        dir.0.join("keyed.m3u8"),
        vod.replacen("#EXTINF", &key_line, 1),
    )
    .unwrap();
    std::fs::write(dir.0.join("key.bin"), [7u8; 16]).unwrap();
    // A third is a master playlist whose variant is on B.
    let master = format!(
        "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=200000,RESOLUTION=320x240\nhttp://127.0.0.1:{}/vod.m3u8\n",
        b.port
    );
    std::fs::write(dir.0.join("master.m3u8"), master).unwrap();
    let allowed = format!("127.0.0.1:{}", a.port);
    let h = Harness::new(model(), &[("ALLOWED_STREAM_HOSTS", &allowed)]);
    for playlist in ["cross.m3u8", "keyed.m3u8", "master.m3u8"] {
        let spec = h.spec(&[("stream_ref", &a.url(playlist)), ("job_id", "x")]);
        let started = std::time::Instant::now();
        let err = h
            .start(spec, ResumeState::default())
            .finish(LONG)
            .await
            .unwrap_err();
        let refused_host = format!("host `127.0.0.1:{}` is not in ALLOWED_STREAM_HOSTS", b.port);
        assert!(err.message.contains(&refused_host), "{}", err.message);
        assert!(err.message.contains(&a.url(playlist)), "{}", err.message);
        // Refused once, not retried: SOURCE_RETRIES restarts would each take a backoff.
        assert!(!err.message.contains("attempts"), "{}", err.message);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(a.requested(playlist), "{:?}", a.requests());
        assert!(b.requests().is_empty(), "B was reached: {:?}", b.requests());
        assert!(h.results("x").await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_on_an_allowed_host_play_through_the_proxy() {
    let (_dir, a, b) = two_hosts("cross-allowed").await;
    // A by its port, B by a pattern that covers it among others.
    let allowed = format!("cam.example, 127.0.0.1:{}, 127.0.0.1:{}", a.port, b.port);
    let h = Harness::new(model(), &[("ALLOWED_STREAM_HOSTS", &allowed)]);
    let spec = h.spec(&[("stream_ref", &a.url("cross.m3u8")), ("job_id", "ok")]);
    assert_eq!(
        h.start(spec, ResumeState::default()).finish(LONG).await,
        Ok(BodyOutcome::Completed)
    );
    let n = h.results("ok").await.len();
    assert!((7..=9).contains(&n), "{n} results for 4 s at 2 fps");
    assert!(
        b.requested("vod0.ts") && b.requested("vod1.ts"),
        "{:?}",
        b.requests()
    );
    assert!(!a.requested("vod0.ts"), "{:?}", a.requests());
    // Relative segments on A itself, and a live playlist reloaded through the proxy.
    let spec = h.spec(&[("stream_ref", &a.url("vod.m3u8")), ("job_id", "rel")]);
    assert_eq!(
        h.start(spec, ResumeState::default()).finish(LONG).await,
        Ok(BodyOutcome::Completed)
    );
    assert!(a.requested("vod1.ts"), "{:?}", a.requests());
    let live_dir = TempDir::new("cross-live");
    let encoder = LiveEncoder::start(&live_dir.0, 30);
    encoder.wait_segments(2).await;
    let live = FileServer::start(&live_dir.0).await;
    let h = Harness::new(
        model(),
        &[("ALLOWED_STREAM_HOSTS", &format!("127.0.0.1:{}", live.port))],
    );
    let spec = h.spec(&[("stream_ref", &live.url("live.m3u8")), ("job_id", "live")]);
    let job = h.start(spec, ResumeState::default());
    let before = live.requests().len();
    h.wait_results("live", 6, LONG).await;
    assert!(
        live.requests().len() >= before + 3,
        "the playlist was reloaded and new segments fetched: {:?}",
        live.requests()
    );
    job.stop.stop(StopReason::Cancelled);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
    drop(encoder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_allowed_list_lets_segments_come_from_any_host() {
    let (_dir, a, b) = two_hosts("cross-open").await;
    let h = Harness::new(model(), &[("ALLOWED_STREAM_HOSTS", " ")]);
    let spec = h.spec(&[("stream_ref", &a.url("cross.m3u8")), ("job_id", "open")]);
    assert_eq!(
        h.start(spec, ResumeState::default()).finish(LONG).await,
        Ok(BodyOutcome::Completed)
    );
    assert!(b.requested("vod0.ts"), "{:?}", b.requests());
    assert!(!h.results("open").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ref_or_redirect_to_a_host_not_allowed_is_refused() {
    let (dir, a, b) = two_hosts("host-refused").await;
    let allowed = format!("127.0.0.1:{}", a.port);
    let h = Harness::new(model(), &[("ALLOWED_STREAM_HOSTS", &allowed)]);
    // The job's own host: refused when the source opens, before ffmpeg runs.
    for (stream_ref, expect) in [
        (
            b.url("vod.m3u8"),
            format!("host `127.0.0.1:{}` is not in", b.port),
        ),
        (
            "http://localhost:1/a.m3u8".to_string(),
            "host `localhost:1` is not in".into(),
        ),
        (
            "rtsp://cam.example/live".to_string(),
            "host `cam.example:554` is not in".into(),
        ),
        (
            "https://127.0.0.1/a.m3u8".to_string(),
            "host `127.0.0.1:443` is not in".into(),
        ),
    ] {
        let spec = h.spec(&[("stream_ref", &stream_ref), ("job_id", "r")]);
        let started = std::time::Instant::now();
        let err = h
            .start(spec, ResumeState::default())
            .finish(LONG)
            .await
            .unwrap_err();
        assert!(
            err.message.contains(&expect),
            "{stream_ref}: {}",
            err.message
        );
        assert!(
            err.message.contains("ALLOWED_STREAM_HOSTS"),
            "{}",
            err.message
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{stream_ref}: {:?}",
            started.elapsed()
        );
    }
    // https on an allowed host is refused too: ffmpeg's TLS would go around the proxy.
    let https = format!("https://127.0.0.1:{}/vod.m3u8", a.port);
    let spec = h.spec(&[("stream_ref", &https), ("job_id", "s")]);
    let err = h
        .start(spec, ResumeState::default())
        .finish(LONG)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("https:// cannot be confined"),
        "{}",
        err.message
    );
    // A redirect from A to B is followed through the proxy, which refuses it.
    std::fs::write(dir.0.join("moved.location"), b.url("vod.m3u8")).unwrap();
    let spec = h.spec(&[("stream_ref", &a.url("moved.m3u8")), ("job_id", "m")]);
    let err = h
        .start(spec, ResumeState::default())
        .finish(LONG)
        .await
        .unwrap_err();
    assert!(
        err.message.contains(&format!(
            "host `127.0.0.1:{}` is not in ALLOWED_STREAM_HOSTS",
            b.port
        )),
        "{}",
        err.message
    );
    assert!(a.requested("moved.m3u8"), "{:?}", a.requests());
    assert!(b.requests().is_empty(), "B was reached: {:?}", b.requests());
}

/// The results stream is capped near RESULTS_MAXLEN (`XADD MAXLEN ~`: Redis trims whole
/// nodes of at most 100 entries), whatever the number of frames a job answers, while the
/// job's own count keeps them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_results_stream_stays_near_results_maxlen() {
    let dir = TempDir::new("hls-cap");
    make_vod(&dir.0, 30);
    let server = FileServer::start(&dir.0).await;
    let h = Harness::new(
        model(),
        &[("MAX_FRAME_SIDE", "64"), ("RESULTS_MAXLEN", "20")],
    );
    let spec = h.spec(&[
        ("stream_ref", &server.url("vod.m3u8")),
        ("fps", "10"),
        ("job_id", "capped"),
        ("scene_gate", "off"),
    ]);
    let outcome = h.start(spec, ResumeState::default()).finish(LONG).await;
    assert_eq!(outcome, Ok(BodyOutcome::Completed));
    let written = h.job_hash("capped").await["results"]
        .parse::<usize>()
        .unwrap();
    assert!(written >= 290, "30 s at 10 fps: {written} results");
    let kept = h.results("capped").await.len();
    // One node of 100 entries past the cap at most, and the entries kept are the newest.
    assert!(kept <= 20 + 100, "{kept} entries kept of {written}");
    let newest = h.results("capped").await;
    assert_eq!(
        num(newest.last().unwrap(), "frame") as usize,
        written - 1,
        "the newest result is kept"
    );
}
