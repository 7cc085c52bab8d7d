//! RTSP cameras end to end: GStreamer's RTSP server (tests/rtsp/serve.py) sends a live
//! H.264 test pattern, the real ffmpeg child reads it over TCP or UDP, and the job's results
//! go to a private Redis; also the server going away mid-job, for a while and for good.

use crate::common::free_port;
use crate::ingest_support::*;
use free_roam::queue::body::BodyOutcome;
use free_roam::queue::stop::StopReason;
use free_roam::results::ResumeState;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

/// The RTSP server, killed when dropped.
struct RtspCamera {
    child: Child,
    port: u16,
}

impl RtspCamera {
    fn start(port: u16) -> Self {
        // Debian's GStreamer bindings (python3-gi) belong to the system Python.
        let python = if std::path::Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/rtsp/serve.py");
        let mut child = Command::new(python)
            .args([script, &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the RTSP server did not start (needs gir1.2-gst-rtsp-server-1.0, see scripts/lib.sh)"
        );
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/cam", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RtspCamera {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtsp_camera_is_read_live_over_tcp_by_default_and_over_udp() {
    let camera = RtspCamera::start(free_port());
    let h = Harness::new(
        Box::new(probe_model()),
        &[("MAX_FRAME_SIDE", "160"), ("SCENE_GATE", "false")],
    );
    for (job, transport) in [("tcp", None), ("udp", Some("udp"))] {
        let url = camera.url();
        let mut fields = vec![
            ("stream_ref", url.as_str()),
            ("fps", "5"),
            ("job_id", job),
            ("max_frames", "6"),
        ];
        if let Some(t) = transport {
            fields.push(("rtsp_transport", t));
        }
        let spec = h.spec(&fields);
        let outcome = h.start(spec, ResumeState::default()).finish(LONG).await;
        assert_eq!(outcome, Ok(BodyOutcome::Completed), "{job}");
        let results = h.results(job).await;
        assert_eq!(results.len(), 6, "{job}");
        for r in &results {
            assert_eq!(r["kind"], "result", "{r:?}");
            let out: serde_json::Value = serde_json::from_str(&r["output"]).unwrap();
            // 320x240 scaled so the longer side is MAX_FRAME_SIDE.
            assert_eq!(
                (out["w"].as_u64(), out["h"].as_u64()),
                (Some(160), Some(120))
            );
        }
        let hash = h.job_hash(job).await;
        assert_eq!(
            hash.get("cursor"),
            None,
            "a live camera saves no cursor: a job that comes back starts at the live edge"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_goes_away_for_a_while_is_reconnected_and_the_job_goes_on() {
    let port = free_port();
    let mut camera = RtspCamera::start(port);
    let h = Harness::new(
        Box::new(probe_model()),
        &[("MAX_FRAME_SIDE", "160"), ("SOURCE_RETRIES", "8")],
    );
    let spec = h.spec(&[
        ("stream_ref", &camera.url()),
        ("fps", "5"),
        ("job_id", "cam"),
    ]);
    let job = h.start(spec, ResumeState::default());
    let before = h.wait_results("cam", 3, LONG).await.len();
    camera.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _camera = RtspCamera::start(port);
    let after = h.wait_results("cam", before + 5, LONG).await;
    job.stop.stop(StopReason::Shutdown);
    assert_eq!(job.finish(LONG).await, Ok(BodyOutcome::Stopped));
    let frames: Vec<i64> = after.iter().map(|r| num(r, "frame")).collect();
    assert!(
        frames.windows(2).all(|w| w[0] < w[1]),
        "frames go on counting across the reconnect: {frames:?}"
    );
    assert!(after.iter().all(|r| r["kind"] == "result"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_gone_for_good_fails_the_job_with_what_ffmpeg_said() {
    let mut camera = RtspCamera::start(free_port());
    let h = Harness::new(Box::new(probe_model()), &[("SOURCE_RETRIES", "2")]);
    let spec = h.spec(&[
        ("stream_ref", &camera.url()),
        ("fps", "5"),
        ("job_id", "gone"),
    ]);
    let job = h.start(spec, ResumeState::default());
    h.wait_results("gone", 1, LONG).await;
    camera.stop();
    let err = job.finish(LONG).await.unwrap_err();
    assert!(err.message.contains("(3 attempts)"), "{}", err.message);
    assert!(
        err.message.contains("Connection refused"),
        "{}",
        err.message
    );
    assert!(err.message.contains(&camera.url()), "{}", err.message);
}
