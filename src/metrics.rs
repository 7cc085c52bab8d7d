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

    /// The histogram's samples under `name`: cumulative buckets, sum and count.
    fn render_samples(&self, out: &mut String, name: &str) {
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

/// What `/metrics` shows of one metric: its kind and its value, or values.
enum Reading<'a> {
    Counter(&'a Counter),
    Gauge(&'a Gauge),
    /// Gauges of one family told apart by their labels: `(labels, value)`.
    Labelled(Vec<(&'static str, u64)>),
    Histogram(&'a Histogram),
}

/// A metric as `/metrics` shows it: its name, what it means, and where its value is.
struct Declared {
    name: &'static str,
    help: &'static str,
    read: for<'a> fn(&'a Metrics) -> Reading<'a>,
}

/// The labels of `freeroam_build_info`.
const BUILD_LABELS: &str = concat!("version=\"", env!("CARGO_PKG_VERSION"), "\"");

/// Every metric the worker exports, in the order `/metrics` shows them.
static DECLARED: &[Declared] = &[
    Declared {
        name: "freeroam_jobs_claimed_total",
        help: "Jobs this worker started (new or reclaimed).",
        read: |m| Reading::Counter(&m.jobs_claimed),
    },
    Declared {
        name: "freeroam_jobs_completed_total",
        help: "Jobs that ended completed.",
        read: |m| Reading::Counter(&m.jobs_completed),
    },
    Declared {
        name: "freeroam_jobs_failed_total",
        help: "Jobs that ended failed.",
        read: |m| Reading::Counter(&m.jobs_failed),
    },
    Declared {
        name: "freeroam_jobs_cancelled_total",
        help: "Jobs that ended cancelled.",
        read: |m| Reading::Counter(&m.jobs_cancelled),
    },
    Declared {
        name: "freeroam_jobs_reclaimed_total",
        help: "Entries taken over from another worker after their lease ran out.",
        read: |m| Reading::Counter(&m.jobs_reclaimed),
    },
    Declared {
        name: "freeroam_jobs_dead_lettered_total",
        help: "Jobs moved to the dead-letter stream.",
        read: |m| Reading::Counter(&m.jobs_dead_lettered),
    },
    Declared {
        name: "freeroam_jobs_rejected_total",
        help: "Job entries refused as malformed or duplicate.",
        read: |m| Reading::Counter(&m.jobs_rejected),
    },
    Declared {
        name: "freeroam_jobs_handed_back_total",
        help: "Jobs handed back to the queue on shutdown.",
        read: |m| Reading::Counter(&m.jobs_handed_back),
    },
    Declared {
        name: "freeroam_leases_lost_total",
        help: "Jobs stopped because another worker took their entry.",
        read: |m| Reading::Counter(&m.leases_lost),
    },
    Declared {
        name: "freeroam_redis_errors_total",
        help: "Failed Redis exchanges.",
        read: |m| Reading::Counter(&m.redis_errors),
    },
    Declared {
        name: "freeroam_results_written_total",
        help: "Result entries written.",
        read: |m| Reading::Counter(&m.results_written),
    },
    Declared {
        name: "freeroam_frames_decoded_total",
        help: "Frames decoded by sources.",
        read: |m| Reading::Counter(&m.frames_decoded),
    },
    Declared {
        name: "freeroam_frames_sampled_total",
        help: "Frames kept by the sampler.",
        read: |m| Reading::Counter(&m.frames_sampled),
    },
    Declared {
        name: "freeroam_frames_dropped_total",
        help: "Sampled frames replaced by a newer one before the model took them.",
        read: |m| Reading::Counter(&m.frames_dropped),
    },
    Declared {
        name: "freeroam_frames_failed_total",
        help: "Frames that could not be decoded or inferred.",
        read: |m| Reading::Counter(&m.frames_failed),
    },
    Declared {
        name: "freeroam_inference_batches_total",
        help: "Model batches run.",
        read: |m| Reading::Counter(&m.inference_batches),
    },
    Declared {
        name: "freeroam_inference_frames_total",
        help: "Frames run through the model.",
        read: |m| Reading::Counter(&m.inference_frames),
    },
    Declared {
        name: "freeroam_inference_errors_total",
        help: "Model batches that failed.",
        read: |m| Reading::Counter(&m.inference_errors),
    },
    Declared {
        name: "freeroam_frames_too_old_total",
        help: "Live frames skipped unseen: older than MAX_FRAME_AGE_MS, or waiting longer than LIVE_QUEUE_MS with newer frames of their stream behind them.",
        read: |m| Reading::Counter(&m.frames_too_old),
    },
    Declared {
        name: "freeroam_frames_reused_total",
        help: "Sampled frames whose result repeated the last model output (scene unchanged).",
        read: |m| Reading::Counter(&m.frames_reused),
    },
    Declared {
        name: "freeroam_alerts_total",
        help: "Alert start and end events written to the alerts stream.",
        read: |m| Reading::Counter(&m.alerts_written),
    },
    Declared {
        name: "freeroam_jobs_running",
        help: "Jobs running on this worker.",
        read: |m| Reading::Gauge(&m.running_jobs),
    },
    Declared {
        name: "freeroam_jobs_capacity",
        help: "Jobs this worker runs at most (MAX_CONCURRENT_STREAMS).",
        read: |m| Reading::Gauge(&m.capacity),
    },
    Declared {
        name: "freeroam_queue_jobs",
        help: "Entries of the jobs stream (the whole fleet's), read when /metrics is.",
        read: |m| {
            Reading::Labelled(vec![
                ("state=\"waiting\"", m.queue_waiting.get()),
                ("state=\"running\"", m.queue_running.get()),
            ])
        },
    },
    Declared {
        name: "freeroam_build_info",
        help: "The worker's version; count it to count live workers.",
        read: |_| Reading::Labelled(vec![(BUILD_LABELS, 1)]),
    },
    Declared {
        name: "freeroam_frame_age_seconds",
        help: "Age of a frame when the model takes it.",
        read: |m| Reading::Histogram(&m.frame_age),
    },
    Declared {
        name: "freeroam_inference_batch_duration_seconds",
        help: "Time the model took for one batch.",
        read: |m| Reading::Histogram(&m.batch_latency),
    },
    Declared {
        name: "freeroam_inference_batch_size_frames",
        help: "Frames in one model batch.",
        read: |m| Reading::Histogram(&m.batch_size),
    },
    Declared {
        name: "freeroam_result_delay_seconds",
        help: "From a frame's arrival at the worker to its result being written.",
        read: |m| Reading::Histogram(&m.result_delay),
    },
];

impl Declared {
    /// The metric's `HELP` and `TYPE` lines and its samples.
    fn render(&self, metrics: &Metrics, out: &mut String) {
        let Declared { name, help, read } = self;
        let reading = read(metrics);
        let kind = match reading {
            Reading::Counter(_) => "counter",
            Reading::Gauge(_) | Reading::Labelled(_) => "gauge",
            Reading::Histogram(_) => "histogram",
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        match reading {
            Reading::Counter(counter) => {
                let _ = writeln!(out, "{name} {}", counter.get());
            }
            Reading::Gauge(gauge) => {
                let _ = writeln!(out, "{name} {}", gauge.get());
            }
            Reading::Labelled(samples) => {
                for (labels, value) in samples {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
            Reading::Histogram(histogram) => histogram.render_samples(out, name),
        }
    }
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for metric in DECLARED {
            metric.render(self, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric with a value of its own, so a line that moves or changes shows.
    fn every_metric_set() -> Metrics {
        let m = Metrics::default();
        let counters = [
            &m.jobs_claimed,
            &m.jobs_completed,
            &m.jobs_failed,
            &m.jobs_cancelled,
            &m.jobs_reclaimed,
            &m.jobs_dead_lettered,
            &m.jobs_rejected,
            &m.jobs_handed_back,
            &m.leases_lost,
            &m.redis_errors,
            &m.results_written,
            &m.frames_decoded,
            &m.frames_sampled,
            &m.frames_dropped,
            &m.frames_failed,
            &m.inference_batches,
            &m.inference_frames,
            &m.inference_errors,
            &m.frames_too_old,
            &m.frames_reused,
            &m.alerts_written,
        ];
        for (n, counter) in (1..).zip(counters) {
            counter.add(n);
        }
        let gauges = [
            &m.running_jobs,
            &m.capacity,
            &m.queue_waiting,
            &m.queue_running,
        ];
        for (n, gauge) in (101..).zip(gauges) {
            gauge.set(n);
        }
        for age in [0.003, 0.3, 0.3, 20.0] {
            m.frame_age.observe(age);
        }
        m.batch_latency.observe(0.05);
        m.batch_size.observe(3.0);
        m.batch_size.observe(64.0);
        m.result_delay.observe(1.5);
        m.result_delay.observe(0.0001);
        m
    }

    /// Dashboards and scrapers read this text: the whole of it is pinned.
    #[test]
    fn the_exposition_text_is_pinned() {
        let want = EXPOSITION.replace("{version}", env!("CARGO_PKG_VERSION"));
        let got = every_metric_set().render();
        if got != want {
            println!("{got}");
        }
        assert_eq!(got, want);
    }

    const EXPOSITION: &str = r#"# HELP freeroam_jobs_claimed_total Jobs this worker started (new or reclaimed).
# TYPE freeroam_jobs_claimed_total counter
freeroam_jobs_claimed_total 1
# HELP freeroam_jobs_completed_total Jobs that ended completed.
# TYPE freeroam_jobs_completed_total counter
freeroam_jobs_completed_total 2
# HELP freeroam_jobs_failed_total Jobs that ended failed.
# TYPE freeroam_jobs_failed_total counter
freeroam_jobs_failed_total 3
# HELP freeroam_jobs_cancelled_total Jobs that ended cancelled.
# TYPE freeroam_jobs_cancelled_total counter
freeroam_jobs_cancelled_total 4
# HELP freeroam_jobs_reclaimed_total Entries taken over from another worker after their lease ran out.
# TYPE freeroam_jobs_reclaimed_total counter
freeroam_jobs_reclaimed_total 5
# HELP freeroam_jobs_dead_lettered_total Jobs moved to the dead-letter stream.
# TYPE freeroam_jobs_dead_lettered_total counter
freeroam_jobs_dead_lettered_total 6
# HELP freeroam_jobs_rejected_total Job entries refused as malformed or duplicate.
# TYPE freeroam_jobs_rejected_total counter
freeroam_jobs_rejected_total 7
# HELP freeroam_jobs_handed_back_total Jobs handed back to the queue on shutdown.
# TYPE freeroam_jobs_handed_back_total counter
freeroam_jobs_handed_back_total 8
# HELP freeroam_leases_lost_total Jobs stopped because another worker took their entry.
# TYPE freeroam_leases_lost_total counter
freeroam_leases_lost_total 9
# HELP freeroam_redis_errors_total Failed Redis exchanges.
# TYPE freeroam_redis_errors_total counter
freeroam_redis_errors_total 10
# HELP freeroam_results_written_total Result entries written.
# TYPE freeroam_results_written_total counter
freeroam_results_written_total 11
# HELP freeroam_frames_decoded_total Frames decoded by sources.
# TYPE freeroam_frames_decoded_total counter
freeroam_frames_decoded_total 12
# HELP freeroam_frames_sampled_total Frames kept by the sampler.
# TYPE freeroam_frames_sampled_total counter
freeroam_frames_sampled_total 13
# HELP freeroam_frames_dropped_total Sampled frames replaced by a newer one before the model took them.
# TYPE freeroam_frames_dropped_total counter
freeroam_frames_dropped_total 14
# HELP freeroam_frames_failed_total Frames that could not be decoded or inferred.
# TYPE freeroam_frames_failed_total counter
freeroam_frames_failed_total 15
# HELP freeroam_inference_batches_total Model batches run.
# TYPE freeroam_inference_batches_total counter
freeroam_inference_batches_total 16
# HELP freeroam_inference_frames_total Frames run through the model.
# TYPE freeroam_inference_frames_total counter
freeroam_inference_frames_total 17
# HELP freeroam_inference_errors_total Model batches that failed.
# TYPE freeroam_inference_errors_total counter
freeroam_inference_errors_total 18
# HELP freeroam_frames_too_old_total Live frames skipped unseen: older than MAX_FRAME_AGE_MS, or waiting longer than LIVE_QUEUE_MS with newer frames of their stream behind them.
# TYPE freeroam_frames_too_old_total counter
freeroam_frames_too_old_total 19
# HELP freeroam_frames_reused_total Sampled frames whose result repeated the last model output (scene unchanged).
# TYPE freeroam_frames_reused_total counter
freeroam_frames_reused_total 20
# HELP freeroam_alerts_total Alert start and end events written to the alerts stream.
# TYPE freeroam_alerts_total counter
freeroam_alerts_total 21
# HELP freeroam_jobs_running Jobs running on this worker.
# TYPE freeroam_jobs_running gauge
freeroam_jobs_running 101
# HELP freeroam_jobs_capacity Jobs this worker runs at most (MAX_CONCURRENT_STREAMS).
# TYPE freeroam_jobs_capacity gauge
freeroam_jobs_capacity 102
# HELP freeroam_queue_jobs Entries of the jobs stream (the whole fleet's), read when /metrics is.
# TYPE freeroam_queue_jobs gauge
freeroam_queue_jobs{state="waiting"} 103
freeroam_queue_jobs{state="running"} 104
# HELP freeroam_build_info The worker's version; count it to count live workers.
# TYPE freeroam_build_info gauge
freeroam_build_info{version="{version}"} 1
# HELP freeroam_frame_age_seconds Age of a frame when the model takes it.
# TYPE freeroam_frame_age_seconds histogram
freeroam_frame_age_seconds_bucket{le="0.005"} 1
freeroam_frame_age_seconds_bucket{le="0.01"} 1
freeroam_frame_age_seconds_bucket{le="0.025"} 1
freeroam_frame_age_seconds_bucket{le="0.05"} 1
freeroam_frame_age_seconds_bucket{le="0.1"} 1
freeroam_frame_age_seconds_bucket{le="0.25"} 1
freeroam_frame_age_seconds_bucket{le="0.5"} 3
freeroam_frame_age_seconds_bucket{le="1"} 3
freeroam_frame_age_seconds_bucket{le="2.5"} 3
freeroam_frame_age_seconds_bucket{le="5"} 3
freeroam_frame_age_seconds_bucket{le="10"} 3
freeroam_frame_age_seconds_bucket{le="+Inf"} 4
freeroam_frame_age_seconds_sum 20.603
freeroam_frame_age_seconds_count 4
# HELP freeroam_inference_batch_duration_seconds Time the model took for one batch.
# TYPE freeroam_inference_batch_duration_seconds histogram
freeroam_inference_batch_duration_seconds_bucket{le="0.005"} 0
freeroam_inference_batch_duration_seconds_bucket{le="0.01"} 0
freeroam_inference_batch_duration_seconds_bucket{le="0.025"} 0
freeroam_inference_batch_duration_seconds_bucket{le="0.05"} 1
freeroam_inference_batch_duration_seconds_bucket{le="0.1"} 1
freeroam_inference_batch_duration_seconds_bucket{le="0.25"} 1
freeroam_inference_batch_duration_seconds_bucket{le="0.5"} 1
freeroam_inference_batch_duration_seconds_bucket{le="1"} 1
freeroam_inference_batch_duration_seconds_bucket{le="2.5"} 1
freeroam_inference_batch_duration_seconds_bucket{le="5"} 1
freeroam_inference_batch_duration_seconds_bucket{le="10"} 1
freeroam_inference_batch_duration_seconds_bucket{le="+Inf"} 1
freeroam_inference_batch_duration_seconds_sum 0.05
freeroam_inference_batch_duration_seconds_count 1
# HELP freeroam_inference_batch_size_frames Frames in one model batch.
# TYPE freeroam_inference_batch_size_frames histogram
freeroam_inference_batch_size_frames_bucket{le="1"} 0
freeroam_inference_batch_size_frames_bucket{le="2"} 0
freeroam_inference_batch_size_frames_bucket{le="4"} 1
freeroam_inference_batch_size_frames_bucket{le="8"} 1
freeroam_inference_batch_size_frames_bucket{le="16"} 1
freeroam_inference_batch_size_frames_bucket{le="32"} 1
freeroam_inference_batch_size_frames_bucket{le="64"} 2
freeroam_inference_batch_size_frames_bucket{le="+Inf"} 2
freeroam_inference_batch_size_frames_sum 67
freeroam_inference_batch_size_frames_count 2
# HELP freeroam_result_delay_seconds From a frame's arrival at the worker to its result being written.
# TYPE freeroam_result_delay_seconds histogram
freeroam_result_delay_seconds_bucket{le="0.005"} 1
freeroam_result_delay_seconds_bucket{le="0.01"} 1
freeroam_result_delay_seconds_bucket{le="0.025"} 1
freeroam_result_delay_seconds_bucket{le="0.05"} 1
freeroam_result_delay_seconds_bucket{le="0.1"} 1
freeroam_result_delay_seconds_bucket{le="0.25"} 1
freeroam_result_delay_seconds_bucket{le="0.5"} 1
freeroam_result_delay_seconds_bucket{le="1"} 1
freeroam_result_delay_seconds_bucket{le="2.5"} 2
freeroam_result_delay_seconds_bucket{le="5"} 2
freeroam_result_delay_seconds_bucket{le="10"} 2
freeroam_result_delay_seconds_bucket{le="+Inf"} 2
freeroam_result_delay_seconds_sum 1.5001
freeroam_result_delay_seconds_count 2
"#;
}
