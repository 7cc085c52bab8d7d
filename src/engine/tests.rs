//! The engine's tests, with the stub model standing in for a real one.

use super::*;
use crate::frame::Frame;
use crate::model::ModelError;
use crate::model::testing::stub::{Fault, HeldCalls, StubModel};
use crate::prompt::PromptRef;
use bytes::Bytes;
use tokio::sync::watch;

fn frame(index: u64) -> Frame {
    let mut f = Frame::new(2, 2, Bytes::from(vec![0u8; 12])).unwrap();
    f.index = index;
    f.cursor = Some(format!("c{index}"));
    f
}

/// A frame that reached the worker longer ago than the live queue's burst window (1 s
/// in [`settings`]), but not so long that it is too old for the model.
fn earlier_frame(index: u64) -> Frame {
    let mut f = frame(index);
    f.received = Instant::now() - Duration::from_secs(2);
    f
}

fn settings() -> EngineSettings {
    EngineSettings {
        max_batch_size: 8,
        batch_window: Duration::from_millis(20),
        max_frame_age: Duration::from_secs(5),
        inference_timeout: Duration::from_secs(5),
        live_queue: Duration::from_secs(1),
    }
}

fn fixed(text: &str) -> PromptFollow {
    PromptFollow::Fixed(PromptRef {
        text: text.into(),
        version: None,
    })
}

/// The stub as these tests script it: it echoes each frame's batch size, prompt and index,
/// and the prompts `fail`, `panic` and `short` make it fail, panic or answer no outputs.
fn scripted() -> StubModel {
    StubModel::named("scripted")
        .answering(|seen| {
            serde_json::json!({
                "batch": seen.batch,
                "prompt": &*seen.prompt.text,
                "index": seen.frame.index,
            })
        })
        .failing_on("fail", Fault::Error("out of memory".into()))
        .failing_on("panic", Fault::Panic("tensor shape mismatch".into()))
        .failing_on("short", Fault::NoOutputs)
}

/// The scripted stub answering one call per `()` sent, to hold it busy while frames queue.
fn gated() -> (std::sync::mpsc::Sender<()>, StubModel) {
    scripted().gated()
}

/// Waits until no frame is waiting: the (gated) model holds whatever was submitted.
async fn until_the_model_took_everything(engine: &Engine) {
    while engine.shared.lock().pending > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn start(model: impl VisionLanguageModel + 'static, s: EngineSettings) -> (Engine, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (Engine::start(Box::new(model), s, metrics.clone()), metrics)
}

#[tokio::test]
async fn frames_of_many_streams_share_a_batch_and_come_back_to_their_job() {
    let (tx, model) = gated();
    let model_calls = model.call_count();
    let (engine, metrics) = start(model, settings());
    // Hold the model on a first frame, so the next three wait together.
    let mut first = engine.register(fixed("p"), 1.0);
    first.submit(frame(100), true);
    until_the_model_took_everything(&engine).await;
    let mut streams: Vec<EngineStream> = (0..3).map(|_| engine.register(fixed("p"), 1.0)).collect();
    for (i, s) in streams.iter().enumerate() {
        assert_eq!(s.submit(frame(i as u64), true), Submitted::Queued);
    }
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    assert_eq!(first.recv().await.unwrap().meta.index, 100);
    for (i, s) in streams.iter_mut().enumerate() {
        let r = s.recv().await.unwrap();
        assert_eq!(r.meta.index, i as u64);
        assert_eq!(r.meta.cursor.as_deref(), Some(format!("c{i}").as_str()));
        let ReplyOutcome::Output(v) = r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(v["batch"], 3, "the three waiting frames form one batch");
    }
    assert_eq!(metrics.inference_batches.get(), 2);
    assert_eq!(model_calls.get(), 2, "the model saw the two batches");
    assert_eq!(metrics.inference_frames.get(), 4);
    assert_eq!(metrics.frame_age.count(), 4);
    drop(tx);
    assert!(engine.shutdown(Duration::from_secs(5)));
}

#[tokio::test]
async fn a_newer_frame_replaces_one_the_model_has_not_taken() {
    let (tx, model) = gated();
    let (engine, _) = start(model, settings());
    let mut s = engine.register(fixed("p"), 1.0);
    s.submit(frame(0), true);
    // Wait until the model holds frame 0 (its gate is closed), then queue two more.
    until_the_model_took_everything(&engine).await;
    assert_eq!(s.submit(earlier_frame(1), true), Submitted::Queued);
    assert_eq!(s.submit(frame(2), true), Submitted::Replaced { dropped: 1 });
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    assert_eq!(s.recv().await.unwrap().meta.index, 0);
    assert_eq!(s.recv().await.unwrap().meta.index, 2);
    drop(tx);
    engine.shutdown(Duration::from_secs(5));
}

#[test]
fn a_live_queue_holds_live_queue_ms_of_frames_within_bounds() {
    let s = settings();
    assert_eq!(s.live_queue_frames(2.0), 2);
    assert_eq!(s.live_queue_frames(1.5), 2);
    assert_eq!(s.live_queue_frames(0.5), 1);
    assert_eq!(s.live_queue_frames(1000.0), MAX_LIVE_QUEUE_FRAMES);
    let none = EngineSettings {
        live_queue: Duration::ZERO,
        ..settings()
    };
    assert_eq!(none.live_queue_frames(30.0), 1);
}

#[tokio::test]
async fn a_live_burst_waits_its_turn_and_overflow_drops_the_oldest() {
    let (tx, model) = gated();
    let (engine, _) = start(model, settings());
    // Two frames a second for one second of queue: two may wait.
    let mut s = engine.register(fixed("p"), 2.0);
    s.submit(frame(0), true);
    until_the_model_took_everything(&engine).await;
    // A segment's frames wait while the model is busy with frame 0; the next segment's
    // first frame comes a while later.
    assert_eq!(s.submit(earlier_frame(1), true), Submitted::Queued);
    assert_eq!(s.submit(earlier_frame(2), true), Submitted::Queued);
    assert_eq!(
        s.submit(frame(3), true),
        Submitted::Replaced { dropped: 1 },
        "the queue is full: frame 1 goes"
    );
    // A recording's frames still wait one at a time.
    assert_eq!(
        s.submit(frame(4), false),
        Submitted::Replaced { dropped: 2 }
    );
    assert_eq!(engine.shared.lock().pending, 1);
    assert_eq!(s.submit(frame(5), true), Submitted::Queued);
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    assert_eq!(s.recv().await.unwrap().meta.index, 0);
    let mut batch = Vec::new();
    for _ in 0..2 {
        let r = s.recv().await.unwrap();
        let ReplyOutcome::Output(v) = r.outcome else {
            panic!("{r:?}")
        };
        batch.push((r.meta.index, v["batch"].as_u64()));
    }
    assert_eq!(
        batch,
        [(4, Some(2)), (5, Some(2))],
        "one stream's waiting frames share a batch, oldest first"
    );
    drop(tx);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn frames_that_arrive_together_are_kept_together_up_to_the_cap() {
    let (tx, model) = gated();
    let (engine, _) = start(model, settings());
    // Two frames a second for one second of queue: two may wait by count.
    let s = engine.register(fixed("p"), 2.0);
    s.submit(frame(0), true);
    until_the_model_took_everything(&engine).await;
    // Two segments' frames arrive at once (a playlist reload that found two): all wait.
    for i in 1..=4 {
        assert_eq!(s.submit(frame(i), true), Submitted::Queued, "frame {i}");
    }
    // A burst never holds more than the cap.
    for i in 5..=MAX_LIVE_QUEUE_FRAMES as u64 {
        assert_eq!(s.submit(frame(i), true), Submitted::Queued, "frame {i}");
    }
    assert_eq!(
        s.submit(frame(MAX_LIVE_QUEUE_FRAMES as u64 + 1), true),
        Submitted::Replaced { dropped: 1 }
    );
    assert_eq!(engine.shared.lock().pending, MAX_LIVE_QUEUE_FRAMES);
    drop(tx);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn a_burst_the_model_cannot_get_through_gives_way_to_its_newest_frames() {
    let (tx, model) = gated();
    let (engine, _) = start(model, settings());
    // Two may wait by count; a burst of four is kept whole at first.
    let mut s = engine.register(fixed("p"), 2.0);
    s.submit(frame(0), true);
    until_the_model_took_everything(&engine).await;
    for i in 1..=4 {
        assert_eq!(s.submit(frame(i), true), Submitted::Queued);
    }
    // The model stays busy past LIVE_QUEUE_MS (1 s): the two oldest are skipped when
    // it takes the next frames, the two newest go to it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let r = s.recv().await.unwrap();
        outcomes.push((r.meta.index, matches!(r.outcome, ReplyOutcome::TooOld)));
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        [(0, false), (1, true), (2, true), (3, false), (4, false)]
    );
    drop(tx);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn a_full_queue_keeps_its_place_in_line() {
    let (tx, model) = gated();
    let mut s = settings();
    s.max_batch_size = 2;
    let (engine, _) = start(model, s);
    let mut a = engine.register(fixed("p"), 2.0);
    let mut b = engine.register(fixed("p"), 2.0);
    a.submit(frame(0), true);
    until_the_model_took_everything(&engine).await;
    // A's two frames wait first, then B's; A's newest pushes out A's oldest and A
    // stays ahead of B.
    a.submit(earlier_frame(1), true);
    a.submit(earlier_frame(2), true);
    b.submit(frame(10), true);
    b.submit(frame(11), true);
    assert_eq!(a.submit(frame(3), true), Submitted::Replaced { dropped: 1 });
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    assert_eq!(a.recv().await.unwrap().meta.index, 0);
    assert_eq!(a.recv().await.unwrap().meta.index, 2);
    assert_eq!(a.recv().await.unwrap().meta.index, 3);
    assert!(b.try_recv().is_none(), "B waits for the next batch");
    tx.send(()).unwrap();
    assert_eq!(b.recv().await.unwrap().meta.index, 10);
    assert_eq!(b.recv().await.unwrap().meta.index, 11);
    drop(tx);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn a_replaced_frame_keeps_its_place_in_line() {
    let (tx, model) = gated();
    let mut s = settings();
    s.max_batch_size = 1;
    let (engine, _) = start(model, s);
    let mut a = engine.register(fixed("p"), 1.0);
    let mut b = engine.register(fixed("p"), 1.0);
    a.submit(frame(0), true);
    until_the_model_took_everything(&engine).await;
    // A waits first, then B, then A gets a newer frame: A is still first in line.
    a.submit(earlier_frame(1), true);
    b.submit(frame(2), true);
    assert_eq!(a.submit(frame(3), true), Submitted::Replaced { dropped: 1 });
    // Let two calls through: frame 0 and the next batch of one.
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    let wait = Duration::from_secs(10);
    assert_eq!(a.recv().await.unwrap().meta.index, 0);
    let second = tokio::time::timeout(wait, a.recv()).await;
    assert_eq!(
        second.ok().flatten().map(|r| r.meta.index),
        Some(3),
        "A went second"
    );
    assert!(b.try_recv().is_none());
    tx.send(()).unwrap();
    assert_eq!(b.recv().await.unwrap().meta.index, 2);
    drop(tx);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn batches_are_split_by_prompt_and_follow_a_live_prompt() {
    let (engine, metrics) = start(scripted(), settings());
    let (ptx, prx) = watch::channel(PromptRef {
        text: "cars".into(),
        version: Some(1),
    });
    let mut live = engine.register(PromptFollow::Live(prx), 1.0);
    let mut own = engine.register(fixed("boats"), 1.0);
    live.submit(frame(0), true);
    own.submit(frame(1), true);
    let a = live.recv().await.unwrap();
    let b = own.recv().await.unwrap();
    assert_eq!(a.prompt_version, Some(1));
    assert_eq!(b.prompt_version, None);
    let (ReplyOutcome::Output(a), ReplyOutcome::Output(b)) = (a.outcome, b.outcome) else {
        panic!()
    };
    assert_eq!(
        (a["prompt"].as_str(), a["batch"].as_u64()),
        (Some("cars"), Some(1))
    );
    assert_eq!(
        (b["prompt"].as_str(), b["batch"].as_u64()),
        (Some("boats"), Some(1))
    );
    ptx.send(PromptRef {
        text: "people".into(),
        version: Some(2),
    })
    .unwrap();
    live.submit(frame(2), true);
    let c = live.recv().await.unwrap();
    assert_eq!(c.prompt_version, Some(2));
    assert!(matches!(c.outcome, ReplyOutcome::Output(v) if v["prompt"] == "people"));
    assert!(metrics.inference_batches.get() >= 3);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn errors_panics_and_wrong_output_counts_fail_only_their_batch() {
    let (engine, metrics) = start(scripted(), settings());
    for (prompt, expect) in [
        ("fail", "out of memory"),
        ("panic", "panicked: tensor shape mismatch"),
        ("short", "returned 0 outputs for 1 frames"),
    ] {
        let mut s = engine.register(fixed(prompt), 1.0);
        s.submit(frame(0), true);
        let r = s.recv().await.unwrap();
        assert!(
            matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains(expect)),
            "{r:?}"
        );
    }
    let mut ok = engine.register(fixed("fine"), 1.0);
    ok.submit(frame(9), true);
    assert!(matches!(
        ok.recv().await.unwrap().outcome,
        ReplyOutcome::Output(_)
    ));
    assert_eq!(metrics.inference_errors.get(), 3);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn a_call_over_the_timeout_fails_its_frames_and_the_engine_recovers() {
    let (tx, model) = gated();
    let mut s = settings();
    s.inference_timeout = Duration::from_millis(100);
    let (engine, _) = start(model, s);
    let mut st = engine.register(fixed("p"), 1.0);
    st.submit(frame(0), true);
    let r = st.recv().await.unwrap();
    assert!(
        matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("INFERENCE_TIMEOUT_MS")),
        "{r:?}"
    );
    // Release the stuck call and one more: the next frame is answered normally.
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    st.submit(frame(1), true);
    let r = st.recv().await.unwrap();
    assert_eq!(r.meta.index, 1);
    assert!(matches!(r.outcome, ReplyOutcome::Output(_)), "{r:?}");
    drop(tx);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn live_frames_past_their_age_are_skipped_but_recordings_wait() {
    let mut s = settings();
    s.max_frame_age = Duration::from_millis(50);
    let (engine, metrics) = start(scripted(), s);
    let mut st = engine.register(fixed("p"), 1.0);
    let mut old = frame(0);
    old.received = Instant::now() - Duration::from_secs(1);
    st.submit(old.clone(), true);
    assert_eq!(st.recv().await.unwrap().outcome, ReplyOutcome::TooOld);
    assert_eq!(metrics.frames_too_old.get(), 1);
    st.submit(old, false);
    assert!(matches!(
        st.recv().await.unwrap().outcome,
        ReplyOutcome::Output(_)
    ));
    engine.shutdown(Duration::from_secs(5));
}

/// A stub that answers through `submit` with at most `max_inflight` frames out: each call
/// waits in the returned list, with its frame indices, until the test answers it. The
/// prompt `panic` makes `submit` panic.
fn remote(max_inflight: usize) -> (HeldCalls, StubModel) {
    StubModel::named("remote")
        .failing_on("panic", Fault::Panic("lost the connection pool".into()))
        .holding_calls(max_inflight)
}

async fn until_calls(calls: &HeldCalls, n: usize) {
    let wait = async {
        while calls.len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the engine hands over the call");
}

#[tokio::test]
async fn a_remote_model_gets_the_next_batch_while_one_is_out() {
    let (calls, model) = remote(2);
    let (engine, metrics) = start(model, settings());
    let mut s = engine.register(fixed("p"), 2.0);
    s.submit(frame(0), true);
    until_calls(&calls, 1).await;
    s.submit(frame(1), true);
    until_calls(&calls, 2).await;
    // Both slots are taken: a third frame waits for one.
    s.submit(frame(2), true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.len(), 2);
    assert_eq!(engine.shared.lock().pending, 1);
    // The second call answers first, and its frame's reply does not wait for the first.
    let second = calls.get(1).replies;
    second.frame(0, Ok(serde_json::json!({"text": "b"})));
    let r = s.recv().await.unwrap();
    assert_eq!(r.meta.index, 1);
    assert_eq!(
        r.outcome,
        ReplyOutcome::Output(serde_json::json!({"text": "b"}))
    );
    // Its slot went to the waiting frame.
    until_calls(&calls, 3).await;
    assert_eq!(calls.get(2).indices, [2]);
    let first = calls.get(0).replies;
    first.frame(
        0,
        Err(ModelError::Inference(
            "openai server_error: HTTP 500".into(),
        )),
    );
    let r = s.recv().await.unwrap();
    assert_eq!(r.meta.index, 0);
    assert!(
        matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("HTTP 500")),
        "{r:?}"
    );
    // A second answer for the same frame is ignored.
    first.frame(0, Ok(serde_json::json!({})));
    assert!(s.try_recv().is_none());
    assert_eq!(metrics.inference_batches.get(), 3);
    assert_eq!(metrics.inference_errors.get(), 1);
    assert_eq!(engine.shared.lock().in_flight, 1);
    assert!(engine.shutdown(Duration::from_secs(5)));
}

#[tokio::test]
async fn a_remote_batch_takes_only_the_free_slots() {
    let (calls, model) = remote(3);
    // A second stream that stays empty makes the batcher wait out the window for a full
    // batch (of the free slots), so the frames below go out together.
    let mut s = settings();
    s.batch_window = Duration::from_secs(1);
    let (engine, _) = start(model, s);
    let mut a = engine.register(fixed("p"), 4.0);
    let _idle = engine.register(fixed("p"), 4.0);
    a.submit(frame(0), true);
    until_calls(&calls, 1).await;
    for i in 1..4 {
        a.submit(frame(i), true);
    }
    until_calls(&calls, 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let handed: Vec<Vec<u64>> = calls.lock().iter().map(|c| c.indices.clone()).collect();
    assert_eq!(
        handed,
        [vec![0], vec![1, 2]],
        "two slots were free, one frame waits"
    );
    for call in calls.lock().iter() {
        for i in 0..call.indices.len() {
            call.replies.frame(i, Ok(serde_json::json!({})));
        }
    }
    for i in 0..3 {
        assert_eq!(a.recv().await.unwrap().meta.index, i);
    }
    until_calls(&calls, 3).await;
    assert_eq!(calls.get(2).indices, [3]);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn a_remote_frame_past_the_timeout_fails_but_keeps_its_slot_until_answered() {
    let (calls, model) = remote(1);
    let mut s = settings();
    s.inference_timeout = Duration::from_millis(100);
    let (engine, metrics) = start(model, s);
    let mut st = engine.register(fixed("p"), 1.0);
    st.submit(frame(0), false);
    let r = st.recv().await.unwrap();
    assert!(
        matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("INFERENCE_TIMEOUT_MS")),
        "{r:?}"
    );
    assert_eq!(metrics.inference_errors.get(), 1);
    // The server still has frame 0: frame 1 waits for its slot.
    st.submit(frame(1), false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(calls.len(), 1);
    let late = calls.get(0).replies;
    late.frame(0, Ok(serde_json::json!({"late": true})));
    until_calls(&calls, 2).await;
    let next = calls.get(1).replies;
    next.frame(0, Ok(serde_json::json!({"text": "ok"})));
    let r = st.recv().await.unwrap();
    assert_eq!(r.meta.index, 1, "the late answer to frame 0 was dropped");
    assert!(matches!(r.outcome, ReplyOutcome::Output(_)));
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn a_remote_model_that_panics_in_submit_fails_only_that_call() {
    let (calls, model) = remote(4);
    let (engine, _) = start(model, settings());
    let mut bad = engine.register(fixed("panic"), 1.0);
    bad.submit(frame(0), true);
    let r = bad.recv().await.unwrap();
    assert!(
        matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("lost the connection pool")),
        "{r:?}"
    );
    let mut good = engine.register(fixed("p"), 1.0);
    good.submit(frame(1), true);
    until_calls(&calls, 1).await;
    calls.get(0).replies.frame(0, Ok(serde_json::json!({})));
    assert_eq!(good.recv().await.unwrap().meta.index, 1);
    assert_eq!(engine.shared.lock().in_flight, 0);
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_closes_streams() {
    let (engine, _) = start(scripted(), settings());
    let mut st = engine.register(fixed("p"), 1.0);
    assert!(engine.shutdown(Duration::from_secs(5)));
    assert_eq!(st.submit(frame(0), true), Submitted::Closed);
    assert!(st.recv().await.is_none());
}
