//! The job body that turns a stream job into results: opens the job's source, hands its
//! frames to the shared inference engine, and writes one result entry per frame (with the
//! job's counters and resume cursor) in one pipelined write per batch of replies.
//!
//! This is the only module that knows sources, the engine and the result sink together.

use crate::config::Config;
use crate::engine::{Engine, EngineStream, Reply, ReplyOutcome, Submitted};
use crate::job::{
    BodyFuture, BodyOutcome, FrameCounters, JobBody, JobContext, JobFailure, StopReason,
};
use crate::metrics::Metrics;
use crate::results::{FrameOutcome, Progress, ResultEntry};
use crate::source::{BadFrame, Source, SourceCounters, SourceEvent, SourceOptions};
use crate::store::Store;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The longest side of decoded frames when MAX_FRAME_SIDE is unset: twice the model's input
/// side. Models resize the short side to their input and crop, so a 16:9 frame needs a long
/// side near twice the input to keep the short side at full resolution.
pub fn default_max_side(input_size: u32) -> u32 {
    input_size.saturating_mul(2).clamp(64, 8192)
}

/// The stream job body, built once per worker and shared by all its jobs.
#[derive(Clone)]
pub struct StreamJobBody {
    engine: Engine,
    store: Store,
    metrics: Arc<Metrics>,
    sources: SourceOptions,
}

impl StreamJobBody {
    pub fn new(config: &Config, engine: Engine, store: Store, metrics: Arc<Metrics>) -> Self {
        let max_side = config
            .max_frame_side
            .unwrap_or_else(|| default_max_side(engine.model_info().input_size));
        Self {
            sources: SourceOptions::new(config, max_side),
            engine,
            store,
            metrics,
        }
    }

    /// How sources behave (retry delays, stall timeout, the ffmpeg program).
    pub fn source_options(&self) -> &SourceOptions {
        &self.sources
    }

    /// Replaces the source options, e.g. shorter retry delays in tests.
    pub fn with_source_options(mut self, options: SourceOptions) -> Self {
        self.sources = options;
        self
    }

    async fn run_job(&self, ctx: JobContext) -> Result<BodyOutcome, JobFailure> {
        let source = Source::open(&ctx.spec, &ctx.resume, &self.sources, &self.store)?;
        let stream = self.engine.register(ctx.prompt.clone(), ctx.spec.fps);
        let mut run = Run {
            model: self.engine.model_name(),
            metrics: &self.metrics,
            base: ctx.resume.counters,
            reported: FrameCounters::default(),
            dropped: 0,
            failed: 0,
            pending: Vec::new(),
            pending_received: Vec::new(),
            cursor: None,
            note: None,
            in_flight: 0,
        };
        run.reported = run.counters(source.counters());
        let outcome = run.drive(&ctx, &source, stream).await;
        source.close().await;
        outcome
    }
}

impl JobBody for StreamJobBody {
    fn run(&self, ctx: JobContext) -> BodyFuture<'_> {
        Box::pin(self.run_job(ctx))
    }
}

/// One job's bookkeeping while it runs.
struct Run<'a> {
    model: Arc<str>,
    metrics: &'a Metrics,
    /// Counters saved by earlier deliveries.
    base: FrameCounters,
    /// What has already been added to the worker's metrics.
    reported: FrameCounters,
    /// Frames the engine dropped (replaced or too old) for this job.
    dropped: u64,
    failed: u64,
    /// Entries not yet written.
    pending: Vec<ResultEntry>,
    /// When each pending model result's frame reached the worker.
    pending_received: Vec<std::time::Instant>,
    /// The newest finished frame's index and resume cursor, not yet written.
    cursor: Option<(u64, String)>,
    note: Option<String>,
    /// Frames handed to the engine and not answered yet.
    in_flight: u64,
}

enum Step {
    Stop,
    Done,
    Fail(JobFailure),
}

impl Run<'_> {
    fn counters(&self, src: &SourceCounters) -> FrameCounters {
        let b = &self.base;
        FrameCounters {
            frames_decoded: b.frames_decoded + src.decoded.load(Ordering::Relaxed),
            frames_sampled: b.frames_sampled + src.sampled.load(Ordering::Relaxed),
            frames_dropped: b.frames_dropped + src.dropped.load(Ordering::Relaxed) + self.dropped,
            frames_failed: b.frames_failed + self.failed,
        }
    }

    fn finished(&mut self, index: u64, cursor: Option<String>) {
        if let Some(c) = cursor
            && self.cursor.as_ref().is_none_or(|(i, _)| index >= *i)
        {
            self.cursor = Some((index, c));
        }
    }

    fn reply(&mut self, r: Reply) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let outcome = match r.outcome {
            ReplyOutcome::Output(v) => FrameOutcome::Output(v),
            ReplyOutcome::Error(e) => {
                self.failed += 1;
                FrameOutcome::Error(e)
            }
            ReplyOutcome::TooOld => {
                self.dropped += 1;
                self.finished(r.meta.index, r.meta.cursor);
                return;
            }
        };
        self.pending_received.push(r.meta.received);
        self.pending.push(ResultEntry {
            frame: r.meta.index,
            pts_ms: r.meta.pts_ms,
            capture_ms: r.meta.capture_ms,
            prompt_version: r.prompt_version,
            model: self.model.clone(),
            latency_ms: r.latency_ms,
            outcome,
        });
        self.finished(r.meta.index, r.meta.cursor);
    }

    fn bad(&mut self, b: BadFrame, prompt_version: Option<u64>) {
        self.failed += 1;
        self.pending.push(ResultEntry {
            frame: b.index,
            pts_ms: None,
            capture_ms: b.capture_ms,
            prompt_version,
            model: self.model.clone(),
            latency_ms: 0.0,
            outcome: FrameOutcome::Error(b.error),
        });
        self.finished(b.index, b.cursor);
    }

    /// Writes pending entries with the job's counters and cursor in one round trip, and
    /// adds what changed to the worker's metrics.
    async fn flush(&mut self, ctx: &JobContext, src: &SourceCounters) -> Result<(), Step> {
        let counters = self.counters(src);
        let progress = Progress {
            counters,
            cursor: self.cursor.as_ref().map(|(_, c)| c.clone()),
            note: self.note.take(),
        };
        if let Err(e) = ctx.sink.write(&self.pending, &progress).await {
            return Err(if ctx.stop.is_stopped() {
                Step::Stop
            } else {
                Step::Fail(JobFailure::new(format!(
                    "writing results to Redis failed: {e}"
                )))
            });
        }
        let m = self.metrics;
        let r = &self.reported;
        m.results_written.add(self.pending.len() as u64);
        for received in self.pending_received.drain(..) {
            m.result_delay.observe(received.elapsed().as_secs_f64());
        }
        m.frames_decoded
            .add(counters.frames_decoded.saturating_sub(r.frames_decoded));
        m.frames_sampled
            .add(counters.frames_sampled.saturating_sub(r.frames_sampled));
        m.frames_dropped
            .add(counters.frames_dropped.saturating_sub(r.frames_dropped));
        m.frames_failed
            .add(counters.frames_failed.saturating_sub(r.frames_failed));
        self.reported = counters;
        self.pending.clear();
        Ok(())
    }

    async fn drive(
        &mut self,
        ctx: &JobContext,
        source: &Source,
        mut stream: EngineStream,
    ) -> Result<BodyOutcome, JobFailure> {
        let spec = &ctx.spec;
        let deadline = spec
            .max_duration_s
            .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
        let src = source.counters();
        let mut source_done = false;
        let step = loop {
            let done = ctx.sink.written() + self.pending.len() as u64;
            if spec.max_frames.is_some_and(|m| done >= m) || (source_done && self.in_flight == 0) {
                break Step::Done;
            }
            // A live stream keeps handing frames over (the engine keeps the newest); a
            // recording sends its next frame once the last one is answered. Never take more
            // than `max_frames` allows.
            let accept = !source_done
                && (source.is_live() || self.in_flight == 0)
                && spec.max_frames.is_none_or(|m| done + self.in_flight < m);
            let mut dirty = false;
            tokio::select! {
                biased;
                _ = ctx.stop.stopped() => break Step::Stop,
                _ = sleep_until(deadline) => break Step::Done,
                reply = stream.recv() => {
                    let Some(r) = reply else {
                        break Step::Fail(JobFailure::new("the inference engine has stopped"));
                    };
                    self.reply(r);
                    while let Some(r) = stream.try_recv() {
                        self.reply(r);
                    }
                    dirty = true;
                }
                event = source.next(), if accept => match event {
                    SourceEvent::Frame(frame) => match stream.submit(frame, source.is_live()) {
                        Submitted::Queued => self.in_flight += 1,
                        Submitted::Replaced { dropped } => {
                            self.dropped += dropped;
                            self.in_flight = (self.in_flight + 1).saturating_sub(dropped);
                        }
                        Submitted::Closed => {
                            break Step::Fail(JobFailure::new("the inference engine has stopped"));
                        }
                    },
                    SourceEvent::Bad(b) => {
                        self.bad(b, ctx.prompt.current().version);
                        dirty = true;
                    }
                    SourceEvent::Note(n) => {
                        self.note = Some(n);
                        dirty = true;
                    }
                    SourceEvent::End => source_done = true,
                    SourceEvent::Failed(msg) => break Step::Fail(JobFailure::new(msg)),
                },
            }
            if dirty && let Err(step) = self.flush(ctx, src).await {
                break step;
            }
        };
        drop(stream);
        // Save what is in hand (the final counters and cursor) unless another worker owns
        // the job now.
        let save = !matches!(ctx.stop.reason(), Some(StopReason::LeaseLost));
        let flushed = if save {
            self.flush(ctx, src).await
        } else {
            Ok(())
        };
        match (step, flushed) {
            (Step::Fail(f), _) => Err(f),
            (_, Err(Step::Fail(f))) => Err(f),
            (Step::Stop, _) | (_, Err(_)) => Ok(BodyOutcome::Stopped),
            (Step::Done, Ok(())) => Ok(BodyOutcome::Completed),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_side_is_twice_the_model_input_within_bounds() {
        assert_eq!(default_max_side(224), 448);
        assert_eq!(default_max_side(384), 768);
        assert_eq!(default_max_side(1), 64);
        assert_eq!(default_max_side(u32::MAX), 8192);
    }
}
