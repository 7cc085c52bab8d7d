//! The worker's counters and histograms, rendered as Prometheus text for `/metrics`.
//!
//! Plain atomics: cheap enough to bump on the per-frame path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram over fixed bucket bounds (in the metric's unit), Prometheus style (cumulative
/// on render).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, so it fits an atomic integer.
    sum_us: AtomicU64,
}

/// Buckets for frame age and latency, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for frames per model batch.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric the worker exports.
#[derive(Debug)]
pub struct Metrics {
    pub jobs_claimed: Counter,
    pub jobs_completed: Counter,
    pub jobs_failed: Counter,
    pub jobs_cancelled: Counter,
    pub jobs_reclaimed: Counter,
    pub jobs_dead_lettered: Counter,
    pub jobs_rejected: Counter,
    pub jobs_handed_back: Counter,
    pub leases_lost: Counter,
    pub redis_errors: Counter,
    pub running_jobs: Gauge,
    pub results_written: Counter,
    pub frames_decoded: Counter,
    pub frames_sampled: Counter,
    pub frames_dropped: Counter,
    pub frames_failed: Counter,
    /// Age of a frame when the model takes it (from arrival at the worker).
    pub frame_age: Histogram,
    pub inference_batches: Counter,
    pub inference_frames: Counter,
    pub inference_errors: Counter,
    pub frames_too_old: Counter,
    pub batch_latency: Histogram,
    /// Frames in each model batch: batches near MAX_BATCH_SIZE mean the model is the limit.
    pub batch_size: Histogram,
    /// From a frame's arrival at the worker to its result being written: unlike
    /// `frame_age`, this includes the model's time, so it shows a worker falling behind.
    pub result_delay: Histogram,
    /// MAX_CONCURRENT_STREAMS, so dashboards can show how full the fleet is.
    pub capacity: Gauge,
    /// The jobs stream when `/metrics` was last read: entries not yet delivered, and those
    /// delivered and not finished (running, or waiting for a reclaim).
    pub queue_waiting: Gauge,
    pub queue_running: Gauge,
    /// Camera behaviour: frames the scene gate answered, alert events written.
    pub frames_reused: Counter,
    pub alerts_written: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            jobs_claimed: Counter::default(),
            jobs_completed: Counter::default(),
            jobs_failed: Counter::default(),
            jobs_cancelled: Counter::default(),
            jobs_reclaimed: Counter::default(),
            jobs_dead_lettered: Counter::default(),
            jobs_rejected: Counter::default(),
            jobs_handed_back: Counter::default(),
            leases_lost: Counter::default(),
            redis_errors: Counter::default(),
            running_jobs: Gauge::default(),
            results_written: Counter::default(),
            frames_decoded: Counter::default(),
            frames_sampled: Counter::default(),
            frames_dropped: Counter::default(),
            frames_failed: Counter::default(),
            frame_age: Histogram::new(LATENCY_BUCKETS),
            inference_batches: Counter::default(),
            inference_frames: Counter::default(),
            inference_errors: Counter::default(),
            frames_too_old: Counter::default(),
            batch_latency: Histogram::new(LATENCY_BUCKETS),
            batch_size: Histogram::new(BATCH_SIZE_BUCKETS),
            result_delay: Histogram::new(LATENCY_BUCKETS),
            capacity: Gauge::default(),
            queue_waiting: Gauge::default(),
            queue_running: Gauge::default(),
            frames_reused: Counter::default(),
            alerts_written: Counter::default(),
        }
    }
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: &[(&str, &Counter, &str)] = &[
            (
                "freeroam_jobs_claimed_total",
                &self.jobs_claimed,
                "Jobs this worker started (new or reclaimed).",
            ),
            (
                "freeroam_jobs_completed_total",
                &self.jobs_completed,
                "Jobs that ended completed.",
            ),
            (
                "freeroam_jobs_failed_total",
                &self.jobs_failed,
                "Jobs that ended failed.",
            ),
            (
                "freeroam_jobs_cancelled_total",
                &self.jobs_cancelled,
                "Jobs that ended cancelled.",
            ),
            (
                "freeroam_jobs_reclaimed_total",
                &self.jobs_reclaimed,
                "Entries taken over from another worker after their lease ran out.",
            ),
            (
                "freeroam_jobs_dead_lettered_total",
                &self.jobs_dead_lettered,
                "Jobs moved to the dead-letter stream.",
            ),
            (
                "freeroam_jobs_rejected_total",
                &self.jobs_rejected,
                "Job entries refused as malformed or duplicate.",
            ),
            (
                "freeroam_jobs_handed_back_total",
                &self.jobs_handed_back,
                "Jobs handed back to the queue on shutdown.",
            ),
            (
                "freeroam_leases_lost_total",
                &self.leases_lost,
                "Jobs stopped because another worker took their entry.",
            ),
            (
                "freeroam_redis_errors_total",
                &self.redis_errors,
                "Failed Redis exchanges.",
            ),
            (
                "freeroam_results_written_total",
                &self.results_written,
                "Result entries written.",
            ),
            (
                "freeroam_frames_decoded_total",
                &self.frames_decoded,
                "Frames decoded by sources.",
            ),
            (
                "freeroam_frames_sampled_total",
                &self.frames_sampled,
                "Frames kept by the sampler.",
            ),
            (
                "freeroam_frames_dropped_total",
                &self.frames_dropped,
                "Sampled frames replaced by a newer one before the model took them.",
            ),
            (
                "freeroam_frames_failed_total",
                &self.frames_failed,
                "Frames that could not be decoded or inferred.",
            ),
            (
                "freeroam_inference_batches_total",
                &self.inference_batches,
                "Model batches run.",
            ),
            (
                "freeroam_inference_frames_total",
                &self.inference_frames,
                "Frames run through the model.",
            ),
            (
                "freeroam_inference_errors_total",
                &self.inference_errors,
                "Model batches that failed.",
            ),
            (
                "freeroam_frames_too_old_total",
                &self.frames_too_old,
                "Live frames skipped unseen: older than MAX_FRAME_AGE_MS, or waiting longer than LIVE_QUEUE_MS with newer frames of their stream behind them.",
            ),
            (
                "freeroam_frames_reused_total",
                &self.frames_reused,
                "Sampled frames whose result repeated the last model output (scene unchanged).",
            ),
            (
                "freeroam_alerts_total",
                &self.alerts_written,
                "Alert start and end events written to the alerts stream.",
            ),
        ];
        for (name, counter, help) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        let gauges: &[(&str, u64, &str)] = &[
            (
                "freeroam_jobs_running",
                self.running_jobs.get(),
                "Jobs running on this worker.",
            ),
            (
                "freeroam_jobs_capacity",
                self.capacity.get(),
                "Jobs this worker runs at most (MAX_CONCURRENT_STREAMS).",
            ),
        ];
        for (name, value, help) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP freeroam_queue_jobs Entries of the jobs stream (the whole fleet's), read when /metrics is.\n# TYPE freeroam_queue_jobs gauge\nfreeroam_queue_jobs{{state=\"waiting\"}} {}\nfreeroam_queue_jobs{{state=\"running\"}} {}",
            self.queue_waiting.get(),
            self.queue_running.get()
        );
        let _ = writeln!(
            out,
            "# HELP freeroam_build_info The worker's version; count it to count live workers.\n# TYPE freeroam_build_info gauge\nfreeroam_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        self.frame_age.render(
            &mut out,
            "freeroam_frame_age_seconds",
            "Age of a frame when the model takes it.",
        );
        self.batch_latency.render(
            &mut out,
            "freeroam_inference_batch_duration_seconds",
            "Time the model took for one batch.",
        );
        self.batch_size.render(
            &mut out,
            "freeroam_inference_batch_size_frames",
            "Frames in one model batch.",
        );
        self.result_delay.render(
            &mut out,
            "freeroam_result_delay_seconds",
            "From a frame's arrival at the worker to its result being written.",
        );
        out
    }
}
