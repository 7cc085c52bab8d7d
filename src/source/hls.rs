//! The HLS source: runs ffmpeg as a child that decodes the stream to RGB frames at the job's
//! fps, restarts it with backoff when the stream breaks, and tells a finished playlist from
//! a live one so a recording ends the job and a live stream is followed at its edge.
//!
//! ffmpeg runs through `tokio::process` rather than ffmpeg-sidecar: the child needs a null
//! stdin, kill-on-drop, a SIGTERM of our own timing and raw access to both pipes (frames on
//! stdout read at ffmpeg's pace, stderr lines to the log), which tokio gives directly
//! without a second process-management layer or a blocking reader thread per stream.

use super::ffmpeg_args::{FfmpegRun, InputPlan, ffmpeg_args};
use super::stream_proxy::StreamProxy;
use super::{Slot, SourceEvent, SourceOptions};
use crate::frame::Frame;
use crate::store::{Backoff, now_ms};
use bytes::BytesMut;
use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What one HLS job needs from its spec.
#[derive(Clone, Debug)]
pub struct HlsJob {
    pub input: InputPlan,
    pub fps: f64,
    /// `pts_ms:<n>` saved by an earlier delivery of a finished stream.
    pub resume_cursor: Option<String>,
    pub options: SourceOptions,
}

/// Largest frame accepted from ffmpeg; it scales to `max_side`, so this only guards against
/// a misread header.
const MAX_FRAME_BYTES: usize = 8192 * 8192 * 3;
/// Stderr lines kept to explain a failure.
const KEPT_LINES: usize = 6;
/// How long a stopping ffmpeg gets after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// The cursor saved with results of a finished stream: where its last result was.
pub fn cursor_for(pts_ms: i64) -> String {
    format!("pts_ms:{pts_ms}")
}

/// Reads a cursor written by [`cursor_for`]; anything else resumes at the start (or, for a
/// live stream, at its live edge, which is where a live stream always starts).
pub fn parse_cursor(cursor: &str) -> Option<i64> {
    cursor
        .strip_prefix("pts_ms:")?
        .parse()
        .ok()
        .filter(|v| *v >= 0)
}

/// What ffmpeg's stderr told us about one run.
#[derive(Debug, Default)]
struct RunLog {
    /// Recent warning-or-worse lines, cleaned for people.
    last: VecDeque<String>,
    /// A transport or demuxer error (not a decoder hiccup): the stream did not end cleanly.
    transport_error: bool,
    /// Transport errors ffmpeg read past (a segment cut short, a failed reload), and the
    /// last one: a stream that keeps going but is damaged.
    transport_errors: u64,
    last_transport_error: Option<String>,
}

/// The note a job's progress hash shows for a stream that had transport errors while it
/// went on (`errors` so far in this job, `last` the latest line): its frames may be fewer
/// than the stream should give, and nothing else would say so.
fn damage_note(errors: u64, last: &str) -> String {
    format!("stream damaged: {errors} transport errors so far, the last: {last}")
}

/// A stderr line, split into its context (`hls`, `http`, ...), level and text.
#[derive(Debug, PartialEq)]
pub(crate) struct LogLine<'a> {
    pub context: Option<&'a str>,
    pub level: &'a str,
    pub text: &'a str,
}

/// Parses a `-loglevel level+...` line: `[hls @ 0x55..] [warning] text` or `[error] text`.
pub(crate) fn parse_line(line: &str) -> LogLine<'_> {
    let mut rest = line.trim_end();
    let mut context = None;
    if let Some(inner) = rest.strip_prefix('[')
        && let Some(end) = inner.find(']')
        && let Some((name, _addr)) = inner[..end].split_once(" @ ")
    {
        context = Some(name);
        rest = inner[end + 1..].trim_start();
    }
    if let Some(inner) = rest.strip_prefix('[')
        && let Some(end) = inner.find(']')
    {
        let level = &inner[..end];
        if matches!(
            level,
            "trace" | "debug" | "verbose" | "info" | "warning" | "error" | "fatal" | "panic"
        ) {
            return LogLine {
                context,
                level,
                text: inner[end + 1..].trim_start(),
            };
        }
    }
    LogLine {
        context,
        level: "info",
        text: rest,
    }
}

/// True for lines that mean the input was lost (rather than, say, a damaged frame the
/// decoder skipped).
fn is_transport_error(l: &LogLine<'_>) -> bool {
    let io_context = match l.context {
        None => true,
        Some(c) => matches!(
            c,
            "hls" | "http" | "https" | "tcp" | "tls" | "crypto" | "rtsp" | "udp" | "file" | "in"
        ),
    };
    match l.level {
        "error" | "fatal" | "panic" => io_context,
        "warning" => io_context && l.text.starts_with("Failed to"),
        _ => false,
    }
}

/// Parses `Duration: 00:00:12.00, start: ...` (a finished input) or `Duration: N/A` (live).
pub(crate) fn parse_duration(text: &str) -> Option<Option<i64>> {
    let rest = text.trim_start().strip_prefix("Duration:")?.trim_start();
    let value = rest.split(',').next()?.trim();
    if value == "N/A" {
        return Some(None);
    }
    let mut parts = value.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(Some(((h * 3600.0 + m * 60.0 + s) * 1000.0).round() as i64))
}

/// The size of the decoded picture before scaling, from the line ffmpeg's `showinfo` filter
/// prints for each frame it passes (`n:   0 pts: ... s:1920x1080 ...`; see
/// [`super::ffmpeg_args::ffmpeg_args`], which puts it between `fps` and `scale`).
pub(crate) fn parse_source_size(l: &LogLine<'_>) -> Option<(u32, u32)> {
    if !l.context?.starts_with("Parsed_showinfo") || !l.text.starts_with("n:") {
        return None;
    }
    let size = l
        .text
        .split_whitespace()
        .find_map(|t| t.strip_prefix("s:"))?;
    let (w, h) = size.split_once('x')?;
    Some((w.parse().ok()?, h.parse().ok()?))
}

/// Reads ffmpeg's stderr: every line to the log at debug, warnings kept for errors, the
/// input's duration published as soon as it is printed (`Some(None)`: live), and each
/// frame's size before scaling, in frame order. This is where ffmpeg's words come in, so
/// each line is masked here, once, before anything else sees it: ffmpeg names its input
/// (`rtsp://admin:PASSWORD@cam/...: Connection refused`) and the URLs a playlist leads to.
async fn read_stderr(
    stderr: impl AsyncRead + Unpin,
    log: Arc<Mutex<RunLog>>,
    duration: watch::Sender<Option<Option<i64>>>,
    source_sizes: mpsc::UnboundedSender<(u32, u32)>,
    url: String,
) {
    let mut lines = BufReader::new(stderr).lines();
    let url = crate::redact::redact_url(&url);
    while let Ok(Some(line)) = lines.next_line().await {
        let line = crate::redact::redact_text(&line);
        tracing::debug!(target: "free_roam::ffmpeg", stream = %url, "{line}");
        let l = parse_line(&line);
        if let Some(size) = parse_source_size(&l) {
            let _ = source_sizes.send(size);
            continue;
        }
        if duration.borrow().is_none()
            && let Some(d) = parse_duration(l.text)
        {
            let _ = duration.send(Some(d));
        }
        if l.text.starts_with("Output #0") && duration.borrow().is_none() {
            let _ = duration.send(Some(None));
        }
        if matches!(l.level, "warning" | "error" | "fatal" | "panic") {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            let text = match l.context {
                Some(c) => format!("{c}: {}", l.text),
                None => l.text.to_string(),
            };
            if is_transport_error(&l) {
                log.transport_error = true;
                log.transport_errors += 1;
                log.last_transport_error = Some(text.clone());
            }
            if log.last.len() == KEPT_LINES {
                log.last.pop_front();
            }
            log.last.push_back(text);
        }
    }
    // No duration line at all (ffmpeg failed to open the input): nothing is live.
    if duration.borrow().is_none() {
        let _ = duration.send(Some(None));
    }
}

/// Pairs each frame read from stdout with the size ffmpeg's stderr gave for it: the n-th
/// `showinfo` line belongs to the n-th frame of the run. The line is written before the
/// frame leaves ffmpeg, so it is normally waiting already; when the stderr reader lags
/// past [`SIZE_WAIT`] the frame goes without (it keeps its own size), and the late line is
/// skipped when it comes, so the pairing never shifts. After one such miss the run stops
/// waiting (a live frame must not be held back on every turn for a line that is slow).
struct SourceSizes {
    rx: mpsc::UnboundedReceiver<(u32, u32)>,
    patient: bool,
    /// Frames handed out so far in this run.
    frames: u64,
    /// Lines received so far in this run.
    lines: u64,
}

/// How long a frame waits for its `showinfo` line.
const SIZE_WAIT: Duration = Duration::from_millis(500);

impl SourceSizes {
    fn new(rx: mpsc::UnboundedReceiver<(u32, u32)>) -> Self {
        Self {
            rx,
            patient: true,
            frames: 0,
            lines: 0,
        }
    }

    /// The size before scaling of the next frame, if its line comes in time.
    async fn next(&mut self) -> Option<(u32, u32)> {
        let wanted = self.frames;
        self.frames += 1;
        while self.lines <= wanted {
            let wait = if self.patient {
                SIZE_WAIT
            } else {
                Duration::ZERO
            };
            let size = match tokio::time::timeout(wait, self.rx.recv()).await {
                Ok(Some(size)) => size,
                _ => {
                    self.patient = false;
                    return None;
                }
            };
            self.lines += 1;
            if self.lines == wanted + 1 {
                return Some(size);
            }
        }
        None
    }
}

/// Reads one PPM (`P6`) frame header; `None` at a clean end of stream.
async fn read_header(
    r: &mut (impl AsyncBufReadExt + Unpin),
) -> std::io::Result<Option<(u32, u32)>> {
    let mut fields = [0u32; 3];
    let mut magic = [0u8; 2];
    match r.read_exact(&mut magic).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &magic != b"P6" {
        return Err(bad_data("ffmpeg output is not a P6 frame"));
    }
    for field in fields.iter_mut() {
        let mut b = r.read_u8().await?;
        while b.is_ascii_whitespace() {
            b = r.read_u8().await?;
        }
        let mut v: u64 = 0;
        while b.is_ascii_digit() {
            v = v * 10 + u64::from(b - b'0');
            if v > u64::from(u32::MAX) {
                return Err(bad_data("frame header number out of range"));
            }
            b = r.read_u8().await?;
        }
        if !b.is_ascii_whitespace() {
            return Err(bad_data("malformed frame header"));
        }
        *field = v as u32;
    }
    if fields[2] != 255 {
        return Err(bad_data("frame is not 8-bit"));
    }
    Ok(Some((fields[0], fields[1])))
}

fn bad_data(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one whole frame from ffmpeg's stdout: the only copy of its pixels we make.
pub(crate) async fn read_frame(
    r: &mut (impl AsyncBufReadExt + Unpin),
) -> std::io::Result<Option<(u32, u32, bytes::Bytes)>> {
    let Some((w, h)) = read_header(r).await? else {
        return Ok(None);
    };
    // In u128: a declared u32 x u32 x 3 overflows usize.
    let len = u128::from(w) * u128::from(h) * 3;
    if w == 0 || h == 0 || len > MAX_FRAME_BYTES as u128 {
        return Err(bad_data("frame size out of range"));
    }
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = r.take(len as u64);
    while buf.len() < len {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "ffmpeg output ended inside a frame",
            ));
        }
    }
    Ok(Some((w, h, buf.freeze())))
}

/// Asks the child to stop (SIGTERM, so ffmpeg closes its input cleanly), then kills it.
async fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        // SAFETY: `pid` is our own child, not yet reaped (try_wait above), so the id cannot
        // have been reused by another process.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(TERM_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// A run whose stream pointed somewhere it may not: retrying cannot help.
fn refused_end(url: &str, refusal: &str) -> RunEnd {
    RunEnd::Fatal(format!(
        "`{}` led to a refused request: {refusal} (a variant, segment, key or redirect of \
         the stream names it)",
        crate::redact::redact_url(url)
    ))
}

/// The proxy's first refusal; never, without a proxy.
async fn refused(proxy: &mut Option<StreamProxy>) -> String {
    match proxy {
        Some(p) => p.refused().await,
        None => std::future::pending().await,
    }
}

/// How one ffmpeg run ended.
#[derive(Debug, PartialEq)]
enum RunEnd {
    Cancelled,
    /// The input ended cleanly (a finished playlist, a file): the job is complete.
    Finished,
    Failed(String),
    /// Retrying cannot help (ffmpeg cannot be started at all).
    Fatal(String),
}

/// Position bookkeeping across restarts.
struct Position {
    interval_ms: f64,
    /// The next frame's index and stream time.
    next_index: u64,
    next_pts_ms: f64,
    /// Stream time of the last frame handed over.
    last_pts_ms: Option<i64>,
    /// The input is a finished stream, so a restart may seek. A live input must not get
    /// `-ss`: ffmpeg cannot seek it but would still discard that much of its start.
    seekable: bool,
}

impl Position {
    /// Gives `frame` the next index and stream time (and, on a finished input, the cursor
    /// that resumes after it), and moves on by one frame.
    fn stamp(&mut self, frame: &mut Frame, finished_ms: Option<i64>, received: Instant) {
        let pts_ms = self.next_pts_ms.round() as i64;
        frame.index = self.next_index;
        frame.pts_ms = Some(pts_ms);
        frame.capture_ms = now_ms();
        frame.received = received;
        frame.cursor = finished_ms.map(|_| cursor_for(pts_ms));
        self.next_index += 1;
        self.next_pts_ms += self.interval_ms;
        self.last_pts_ms = Some(pts_ms);
    }
}

/// The source task: runs ffmpeg until the stream ends, fails for good, or the job stops.
pub(crate) async fn run(job: HlsJob, slot: Arc<Slot>, cancel: CancellationToken) {
    let interval_ms = 1000.0 / job.fps;
    let resume_ms = job
        .resume_cursor
        .as_deref()
        .and_then(parse_cursor)
        .map(|pts| pts as f64 + interval_ms);
    let mut pos = Position {
        interval_ms,
        next_index: resume_ms.map_or(0, |ms| (ms / interval_ms).round() as u64),
        next_pts_ms: resume_ms.unwrap_or(0.0),
        last_pts_ms: None,
        seekable: resume_ms.is_some(),
    };
    let opts = &job.options;
    let mut backoff = Backoff::new(opts.retry_initial, opts.retry_max);
    let mut failures = 0u32;
    let mut damage = Damage::default();
    loop {
        let (end, delivered) = run_once(&job, &slot, &cancel, &mut pos, &mut damage).await;
        match end {
            RunEnd::Cancelled => return,
            RunEnd::Fatal(reason) => {
                slot.finish(SourceEvent::Failed(reason));
                return;
            }
            RunEnd::Finished => {
                slot.finish(SourceEvent::End);
                return;
            }
            RunEnd::Failed(reason) => {
                if delivered {
                    failures = 0;
                    backoff.reset();
                }
                failures += 1;
                if failures > opts.retries {
                    slot.finish(SourceEvent::Failed(format!(
                        "ffmpeg could not read `{}` ({failures} attempts): {reason}",
                        crate::redact::redact_url(&job.input.url)
                    )));
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(stream = %crate::redact::redact_url(&job.input.url), %reason, ?delay, attempt = failures, "ffmpeg failed; restarting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// The transport errors of a job's ffmpeg runs so far, and how many its note has told.
#[derive(Debug, Default)]
struct Damage {
    errors: u64,
    told: u64,
}

impl Damage {
    /// Adds the run's errors not counted yet; `Some(note)` when there are new ones to tell.
    fn update(&mut self, counted_this_run: &mut u64, log: &RunLog) -> Option<String> {
        self.errors += log.transport_errors - *counted_this_run;
        *counted_this_run = log.transport_errors;
        if self.errors == self.told {
            return None;
        }
        self.told = self.errors;
        let last = log.last_transport_error.as_deref().unwrap_or("");
        Some(damage_note(self.errors, last))
    }
}

/// One ffmpeg run. Returns how it ended and whether it handed over any frame.
async fn run_once(
    job: &HlsJob,
    slot: &Slot,
    cancel: &CancellationToken,
    pos: &mut Position,
    damage: &mut Damage,
) -> (RunEnd, bool) {
    // A restart of a finished stream picks up after the last frame handed over; a live one
    // goes back to the live edge.
    let start_ms = pos.seekable.then(|| pos.next_pts_ms.round() as i64);
    // A confined input (ALLOWED_STREAM_HOSTS) gets a proxy of its own for this run.
    let proxy = match &job.input.confined {
        None => None,
        Some(allowed) => match StreamProxy::start(allowed.clone(), job.options.io_timeout).await {
            Ok(p) => Some(p),
            Err(e) => {
                return (
                    RunEnd::Failed(format!("could not start the stream proxy: {e}")),
                    false,
                );
            }
        },
    };
    let mut run = match Run::spawn(job, start_ms, proxy) {
        Ok(run) => run,
        Err(reason) => return (RunEnd::Fatal(reason), false),
    };
    let read = match run.hand_over_frames(job, slot, cancel, pos, damage).await {
        Stop::Cancelled => {
            run.abandon().await;
            return (RunEnd::Cancelled, run.delivered);
        }
        Stop::Refused(refusal) => {
            run.abandon().await;
            return (refused_end(&job.input.url, &refusal), run.delivered);
        }
        Stop::OutputEnded => ReadEnd::OutputEnded(run.wait_exit().await),
        Stop::ReadFailed(reason) => {
            terminate(&mut run.child).await;
            ReadEnd::Failed(reason)
        }
    };
    let (said, transport_error) = run.last_words().await;
    let end = classify_end(RunSeen {
        url: &job.input.url,
        rtsp: job.input.rtsp.is_some(),
        read,
        said,
        transport_error,
        refusal: run.proxy.as_ref().and_then(StreamProxy::refusal),
        finished_ms: run.finished_ms,
        last_pts_ms: pos.last_pts_ms,
        interval_ms: pos.interval_ms,
    });
    (end, run.delivered)
}

/// One ffmpeg child with the reader of its stderr and the proxy it goes through, and what
/// this run has learned and done so far.
struct Run {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr_task: JoinHandle<()>,
    log: Arc<Mutex<RunLog>>,
    /// The input's duration once ffmpeg printed it (`Some(None)`: live).
    duration: watch::Receiver<Option<Option<i64>>>,
    source_sizes: SourceSizes,
    proxy: Option<StreamProxy>,
    /// Whether any frame was handed over in this run.
    delivered: bool,
    /// This run's transport errors already added to the job's [`Damage`].
    errors_counted: u64,
    /// Whether the input is finished or live is known (from the first frame on).
    mode_known: bool,
    /// The length of a finished input; `None` for a live one.
    finished_ms: Option<i64>,
}

/// Why a run stopped handing over frames.
enum Stop {
    Cancelled,
    /// The proxy refused a request the stream led to.
    Refused(String),
    /// ffmpeg's output ended cleanly.
    OutputEnded,
    /// Reading failed: a stall, a broken pipe, a frame that makes no sense.
    ReadFailed(String),
}

impl Run {
    /// Starts ffmpeg on the job's input (through `proxy` when there is one) and the reader of
    /// its stderr. `Err`: ffmpeg cannot be started at all.
    fn spawn(
        job: &HlsJob,
        start_ms: Option<i64>,
        proxy: Option<StreamProxy>,
    ) -> Result<Self, String> {
        let opts = &job.options;
        let proxy_url = proxy.as_ref().map(StreamProxy::url);
        let args = ffmpeg_args(&FfmpegRun {
            input: &job.input,
            fps: job.fps,
            max_side: opts.max_side,
            start_ms,
            io_timeout: opts.io_timeout,
            http_proxy: proxy_url.as_deref(),
        });
        let mut command = Command::new(&opts.ffmpeg);
        if proxy.is_some() {
            // ffmpeg skips its proxy for hosts in `no_proxy`: none may go around this one.
            for var in ["no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY"] {
                command.env_remove(var);
            }
        }
        let mut child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "could not start `{}` (is ffmpeg installed?): {e}",
                    opts.ffmpeg
                )
            })?;
        #[cfg(target_os = "linux")]
        if let Some(out) = child.stdout.as_ref() {
            use std::os::fd::AsRawFd;
            // A frame is megabytes; a 1 MiB pipe (the unprivileged maximum) instead of 64 KiB
            // moves it in a few reads and wake-ups instead of dozens. Best effort.
            // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own; no memory is passed.
            unsafe {
                libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
            }
        }
        let log = Arc::new(Mutex::new(RunLog::default()));
        let (duration_tx, duration) = watch::channel(None);
        let (sizes_tx, sizes_rx) = mpsc::unbounded_channel();
        let stderr_task = tokio::spawn(read_stderr(
            child.stderr.take().expect("stderr is piped"),
            log.clone(),
            duration_tx,
            sizes_tx,
            job.input.url.clone(),
        ));
        let stdout =
            BufReader::with_capacity(256 * 1024, child.stdout.take().expect("stdout is piped"));
        Ok(Self {
            child,
            stdout,
            stderr_task,
            log,
            duration,
            source_sizes: SourceSizes::new(sizes_rx),
            proxy,
            delivered: false,
            errors_counted: 0,
            mode_known: false,
            finished_ms: None,
        })
    }

    /// Reads ffmpeg's frames and hands them to the job, stamped, until its output ends,
    /// reading fails, the proxy refuses a request or the job stops.
    async fn hand_over_frames(
        &mut self,
        job: &HlsJob,
        slot: &Slot,
        cancel: &CancellationToken,
        pos: &mut Position,
        damage: &mut Damage,
    ) -> Stop {
        let stall_timeout = job.options.stall_timeout;
        loop {
            let read = tokio::select! {
                _ = cancel.cancelled() => return Stop::Cancelled,
                refusal = refused(&mut self.proxy) => return Stop::Refused(refusal),
                r = tokio::time::timeout(stall_timeout, read_frame(&mut self.stdout)) => r,
            };
            let (w, h, rgb) = match read {
                Err(_) => {
                    return Stop::ReadFailed(format!(
                        "no frame for {} s (the stream stalled)",
                        stall_timeout.as_secs_f64()
                    ));
                }
                Ok(Err(e)) => return Stop::ReadFailed(format!("reading ffmpeg output: {e}")),
                Ok(Ok(None)) => return Stop::OutputEnded,
                Ok(Ok(Some(f))) => f,
            };
            let received = Instant::now();
            if !self.mode_known {
                self.learn_mode(slot, pos).await;
            }
            let mut frame = match Frame::new(w, h, rgb) {
                Ok(f) => f,
                Err(e) => return Stop::ReadFailed(format!("bad frame from ffmpeg: {e}")),
            };
            if let Some((sw, sh)) = self.source_sizes.next().await {
                frame = frame.with_source_size(sw, sh);
            }
            pos.stamp(&mut frame, self.finished_ms, received);
            self.delivered = true;
            slot.counters.decoded.fetch_add(1, Ordering::Relaxed);
            slot.counters.sampled.fetch_add(1, Ordering::Relaxed);
            // Told with the frames it damaged: a stream going on after a transport error (a
            // segment cut short) gives fewer frames, and its job says why.
            let note = damage.update(
                &mut self.errors_counted,
                &self.log.lock().unwrap_or_else(|e| e.into_inner()),
            );
            if let Some(note) = note {
                slot.note(note);
            }
            if self.finished_ms.is_some() {
                tokio::select! {
                    _ = slot.put_wait(frame) => {}
                    _ = cancel.cancelled() => return Stop::Cancelled,
                }
            } else {
                slot.put_latest(frame);
            }
        }
    }

    /// Learns whether the input is finished or live. ffmpeg prints the input's duration
    /// before it writes any frame; this waits for the stderr reader to get there, so the
    /// first frame already goes the right way.
    async fn learn_mode(&mut self, slot: &Slot, pos: &mut Position) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.duration.wait_for(|d| d.is_some()),
        )
        .await;
        self.finished_ms = self.duration.borrow().flatten();
        slot.set_live(self.finished_ms.is_none());
        pos.seekable = self.finished_ms.is_some();
        self.mode_known = true;
    }

    /// Stops ffmpeg and its stderr reader, without waiting for its last lines.
    async fn abandon(&mut self) {
        terminate(&mut self.child).await;
        self.stderr_task.abort();
    }

    /// ffmpeg's exit status after its output ended; `None` (and ffmpeg stopped) when it
    /// does not exit in a moment.
    async fn wait_exit(&mut self) -> Option<ExitStatus> {
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                terminate(&mut self.child).await;
                None
            }
        }
    }

    /// What ffmpeg said last (its kept lines, joined) and whether it had a transport error.
    async fn last_words(&mut self) -> (String, bool) {
        // stderr closes when ffmpeg exits; give the reader a moment to finish the last lines.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.stderr_task).await;
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        (
            log.last.iter().cloned().collect::<Vec<_>>().join(" | "),
            log.transport_error,
        )
    }
}

/// How a run's output stopped.
#[derive(Debug)]
enum ReadEnd {
    /// The output ended and ffmpeg exited with this status (`None`: it did not exit in time).
    OutputEnded(Option<ExitStatus>),
    /// Reading failed, for this reason.
    Failed(String),
}

/// What was observed of a run that stopped by itself, to judge how it ended.
struct RunSeen<'a> {
    /// The job's input, as the user gave it.
    url: &'a str,
    rtsp: bool,
    read: ReadEnd,
    /// ffmpeg's last warnings, joined.
    said: String,
    /// ffmpeg reported a transport or demuxer error.
    transport_error: bool,
    /// The proxy's first refusal, if it refused anything.
    refusal: Option<String>,
    /// The length of a finished input; `None` for a live one.
    finished_ms: Option<i64>,
    /// Stream time of the last frame handed over.
    last_pts_ms: Option<i64>,
    interval_ms: f64,
}

/// How a run that stopped by itself ended: done, worth a retry, or beyond retrying.
fn classify_end(seen: RunSeen<'_>) -> RunEnd {
    // ffmpeg may give up on a refused segment before the proxy's refusal is seen.
    if let Some(refusal) = &seen.refusal {
        return refused_end(seen.url, refusal);
    }
    let with_said = |reason: String| {
        if seen.said.is_empty() {
            reason
        } else {
            format!("{reason}; ffmpeg said: {}", seen.said)
        }
    };
    match seen.read {
        ReadEnd::Failed(reason) => RunEnd::Failed(with_said(reason)),
        ReadEnd::OutputEnded(Some(s)) if s.success() => {
            // A finished stream that reached (nearly) its end is done even if a segment
            // was lost on the way; anything else that ended with transport errors is a
            // broken stream: a live playlist whose server went away also ends "cleanly".
            let reached_end = match (seen.finished_ms, seen.last_pts_ms) {
                (Some(total), Some(last)) => last as f64 + 2.0 * seen.interval_ms >= total as f64,
                _ => false,
            };
            if seen.rtsp && seen.finished_ms.is_none() {
                // A live camera never ends: its server closing the stream is a break.
                RunEnd::Failed(with_said("the RTSP server closed the stream".into()))
            } else if !seen.transport_error || reached_end {
                RunEnd::Finished
            } else {
                RunEnd::Failed(with_said("the stream ended with errors".into()))
            }
        }
        ReadEnd::OutputEnded(Some(s)) => {
            RunEnd::Failed(with_said(format!("ffmpeg exited with {s}")))
        }
        ReadEnd::OutputEnded(None) => RunEnd::Failed(with_said(
            "ffmpeg did not exit after its output ended".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_split_into_context_level_and_text() {
        assert_eq!(
            parse_line("[hls @ 0x55af8ed0aa40] [warning] Failed to reload playlist 0"),
            LogLine {
                context: Some("hls"),
                level: "warning",
                text: "Failed to reload playlist 0"
            }
        );
        assert_eq!(
            parse_line("[error] http://h/x.m3u8: Server returned 404 Not Found\n"),
            LogLine {
                context: None,
                level: "error",
                text: "http://h/x.m3u8: Server returned 404 Not Found"
            }
        );
        assert_eq!(parse_line("plain").level, "info");
    }

    #[test]
    fn showinfo_lines_give_the_size_before_scaling() {
        let size = |s: &str| parse_source_size(&parse_line(s));
        assert_eq!(
            size(
                "[Parsed_showinfo_1 @ 0x55b1] [info] n:   0 pts:      0 pts_time:0       \
                 pos:       -1 fmt:yuv420p sar:1/1 s:1920x1080 i:P iskey:1 type:I "
            ),
            Some((1920, 1080))
        );
        // The filter's other lines, and other filters' lines, are not sizes.
        assert_eq!(
            size("[Parsed_showinfo_1 @ 0x1] [info] color_range:tv color_space:bt709"),
            None
        );
        assert_eq!(
            size("[Parsed_showinfo_1 @ 0x1] [info] config in time_base: 1/2"),
            None
        );
        assert_eq!(size("[hls @ 0x1] [info] n: 0 s:640x360"), None);
        assert_eq!(
            size("[Parsed_showinfo_1 @ 0x1] [info] n: 0 s:640xabc"),
            None
        );
    }

    #[tokio::test]
    async fn a_late_size_line_is_skipped_not_shifted_onto_the_next_frame() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sizes = SourceSizes::new(rx);
        tx.send((100, 50)).unwrap();
        assert_eq!(sizes.next().await, Some((100, 50)));
        // Frame 1's line is late: the frame goes without.
        assert_eq!(sizes.next().await, None);
        tx.send((101, 50)).unwrap();
        tx.send((102, 50)).unwrap();
        // Frame 2 gets its own line, not frame 1's late one.
        assert_eq!(sizes.next().await, Some((102, 50)));
    }

    #[test]
    fn transport_errors_are_told_from_decoder_noise() {
        let t = |s: &str| is_transport_error(&parse_line(s));
        assert!(t(
            "[tcp @ 0x1] [error] Connection to tcp://h:1 failed: Connection refused"
        ));
        assert!(t(
            "[hls @ 0x1] [warning] Failed to open segment 3 of playlist 0"
        ));
        assert!(t("[error] http://h/a.m3u8: Connection refused"));
        assert!(!t("[h264 @ 0x1] [error] non-existing PPS 0 referenced"));
        assert!(!t("[hls @ 0x1] [warning] Skip ('#EXT-X-VERSION:3')"));
        assert!(!t("[hls @ 0x1] [info] Opening 'http://h/1.ts' for reading"));
    }

    #[test]
    fn durations_tell_finished_inputs_from_live_ones() {
        assert_eq!(
            parse_duration("  Duration: 00:00:12.00, start: 1.400000, bitrate: 0 kb/s"),
            Some(Some(12_000))
        );
        assert_eq!(
            parse_duration("Duration: 01:02:03.50, start: 0"),
            Some(Some(3_723_500))
        );
        assert_eq!(
            parse_duration("Duration: N/A, start: 2.4, bitrate: N/A"),
            Some(None)
        );
        assert_eq!(parse_duration("Stream #0:0: Video"), None);
    }

    #[test]
    fn cursors_round_trip_and_junk_is_ignored() {
        assert_eq!(parse_cursor(&cursor_for(1500)), Some(1500));
        assert_eq!(parse_cursor("1700000000000-0"), None);
        assert_eq!(parse_cursor("pts_ms:-5"), None);
    }

    #[tokio::test]
    async fn ppm_frames_are_read_back_to_back() {
        let mut data = Vec::new();
        for (w, h, v) in [(2u32, 1u32, 7u8), (1, 3, 9)] {
            data.extend_from_slice(format!("P6\n{w} {h}\n255\n").as_bytes());
            data.extend(std::iter::repeat_n(v, (w * h * 3) as usize));
        }
        let mut r = BufReader::new(&data[..]);
        let (w, h, px) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((w, h, px.len(), px[0]), (2, 1, 6, 7));
        let (w, h, px) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((w, h, px.len(), px[8]), (1, 3, 9, 9));
        assert!(read_frame(&mut r).await.unwrap().is_none());

        let truncated = b"P6\n4 4\n255\nabc".to_vec();
        let mut r = BufReader::new(&truncated[..]);
        assert!(read_frame(&mut r).await.is_err());
        let mut r = BufReader::new(&b"GIF89a"[..]);
        assert!(read_frame(&mut r).await.is_err());
    }

    /// Found by `scripts/fuzz` (ppm_reader): the byte count of a 4294967295x4294967295
    /// header overflowed.
    #[tokio::test]
    async fn ppm_sizes_whose_byte_count_overflows_are_refused() {
        for header in [
            &b"P6\n4294967295 4294967295\n255\n"[..],
            b"P6\n4294967295 1\n255\n",
            b"P6\n8192 8193\n255\n",
        ] {
            let mut r = BufReader::new(header);
            let err = read_frame(&mut r).await.unwrap_err();
            assert_eq!(err.to_string(), "frame size out of range");
        }
    }

    /// A job's damage note counts every run's transport errors once, and is told again only
    /// when there are new ones.
    #[test]
    fn damage_is_told_once_per_new_error_across_runs() {
        let mut damage = Damage::default();
        let mut counted = 0;
        assert_eq!(damage.update(&mut counted, &RunLog::default()), None);
        let log = RunLog {
            transport_errors: 2,
            last_transport_error: Some(
                "http: Stream ends prematurely at 10490, should be 52452".into(),
            ),
            ..Default::default()
        };
        let note = damage.update(&mut counted, &log).unwrap();
        assert!(
            note.starts_with("stream damaged: 2 transport errors"),
            "{note}"
        );
        assert!(note.ends_with("should be 52452"), "{note}");
        assert_eq!(damage.update(&mut counted, &log), None, "nothing new");
        // A new run starts its own count; the job's goes on.
        let mut counted = 0;
        let log = RunLog {
            transport_errors: 1,
            last_transport_error: Some("http://cam/x: Failed to open".into()),
            ..Default::default()
        };
        let note = damage.update(&mut counted, &log).unwrap();
        assert!(
            note.starts_with("stream damaged: 3 transport errors"),
            "{note}"
        );
    }

    /// What ffmpeg says of a camera that is down or refuses the login names its URL with
    /// the password: masked as it is read, so neither the log, the kept lines nor the
    /// damage note ever hold it.
    #[tokio::test]
    async fn ffmpegs_words_are_masked_as_they_are_read() {
        let said = "[tcp @ 0x1] [error] Connection to tcp://127.0.0.1:1?timeout=2 failed: \
                    Connection refused\n\
                    [error] rtsp://admin:Pw-9@127.0.0.1:1/cam: Connection refused\n\
                    [rtsp @ 0x2] [error] method OPTIONS failed: 401 Unauthorized\n\
                    [error] rtsp://admin:Pw-9@127.0.0.1:2/cam?token=t0k: Server returned 401 \
                    Unauthorized (authorization failed)\n";
        let log = Arc::new(Mutex::new(RunLog::default()));
        let (duration, _duration_rx) = watch::channel(None);
        let (sizes, _sizes_rx) = mpsc::unbounded_channel();
        let url = "rtsp://admin:Pw-9@127.0.0.1:1/cam".to_string();
        read_stderr(said.as_bytes(), log.clone(), duration, sizes, url).await;
        let log = log.lock().unwrap();
        let kept = format!("{:?} {:?}", log.last, log.last_transport_error);
        assert!(!kept.contains("Pw-9") && !kept.contains("t0k"), "{kept}");
        assert!(
            kept.contains("rtsp://admin:***@127.0.0.1:1/cam: Connection refused"),
            "{kept}"
        );
        assert_eq!(log.last.len(), 4, "{kept}");
    }

    /// A run that stopped by itself, seen as a clean end of a live HLS stream.
    fn seen(read: ReadEnd) -> RunSeen<'static> {
        RunSeen {
            url: "http://u:secret@cam/live.m3u8",
            rtsp: false,
            read,
            said: String::new(),
            transport_error: false,
            refusal: None,
            finished_ms: None,
            last_pts_ms: Some(9_000),
            interval_ms: 500.0,
        }
    }

    fn exited(code: i32) -> ReadEnd {
        use std::os::unix::process::ExitStatusExt;
        ReadEnd::OutputEnded(Some(ExitStatus::from_raw(code << 8)))
    }

    fn failed(end: RunEnd) -> String {
        match end {
            RunEnd::Failed(reason) => reason,
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn a_clean_exit_finishes_unless_the_stream_broke_on_the_way() {
        assert_eq!(classify_end(seen(exited(0))), RunEnd::Finished);
        let broken = RunSeen {
            transport_error: true,
            said: "http: Connection reset".into(),
            ..seen(exited(0))
        };
        assert_eq!(
            failed(classify_end(broken)),
            "the stream ended with errors; ffmpeg said: http: Connection reset"
        );
        // A recording that reached (nearly) its end is done despite a lost segment...
        let recording = |last_pts_ms| RunSeen {
            transport_error: true,
            finished_ms: Some(10_000),
            last_pts_ms: Some(last_pts_ms),
            ..seen(exited(0))
        };
        assert_eq!(classify_end(recording(9_000)), RunEnd::Finished);
        // ...and one cut short is not.
        assert_eq!(
            failed(classify_end(recording(8_999))),
            "the stream ended with errors"
        );
    }

    #[test]
    fn a_live_camera_closing_its_stream_is_a_break() {
        let camera = RunSeen {
            rtsp: true,
            ..seen(exited(0))
        };
        assert_eq!(
            failed(classify_end(camera)),
            "the RTSP server closed the stream"
        );
        let recorded = RunSeen {
            rtsp: true,
            finished_ms: Some(10_000),
            ..seen(exited(0))
        };
        assert_eq!(classify_end(recorded), RunEnd::Finished);
    }

    #[test]
    fn failed_reads_and_exits_say_what_ffmpeg_said() {
        let stalled = RunSeen {
            said: "hls: Failed to reload playlist 0".into(),
            ..seen(ReadEnd::Failed(
                "no frame for 10 s (the stream stalled)".into(),
            ))
        };
        assert_eq!(
            failed(classify_end(stalled)),
            "no frame for 10 s (the stream stalled); ffmpeg said: hls: Failed to reload \
             playlist 0"
        );
        assert_eq!(
            failed(classify_end(seen(exited(1)))),
            "ffmpeg exited with exit status: 1"
        );
        assert_eq!(
            failed(classify_end(seen(ReadEnd::OutputEnded(None)))),
            "ffmpeg did not exit after its output ended"
        );
    }

    #[test]
    fn a_refusal_ends_the_job_whatever_else_happened() {
        for read in [exited(0), exited(1), ReadEnd::Failed("stalled".into())] {
            let refused = RunSeen {
                refusal: Some("`evil.example` is not in ALLOWED_STREAM_HOSTS".into()),
                ..seen(read)
            };
            let RunEnd::Fatal(reason) = classify_end(refused) else {
                panic!("a refusal is fatal");
            };
            assert!(reason.contains("led to a refused request"), "{reason}");
            assert!(!reason.contains("secret"), "{reason}");
        }
    }

    #[test]
    fn frames_are_stamped_in_stream_time_and_a_recording_gets_cursors() {
        let mut pos = Position {
            interval_ms: 333.4,
            next_index: 3,
            next_pts_ms: 1000.2,
            last_pts_ms: None,
            seekable: true,
        };
        let mut frame = Frame::new(1, 1, bytes::Bytes::from_static(&[0, 0, 0])).unwrap();
        pos.stamp(&mut frame, Some(60_000), Instant::now());
        assert_eq!((frame.index, frame.pts_ms), (3, Some(1000)));
        assert_eq!(frame.cursor.as_deref(), Some("pts_ms:1000"));
        pos.stamp(&mut frame, None, Instant::now());
        assert_eq!(
            (frame.index, frame.pts_ms, frame.cursor),
            (4, Some(1334), None)
        );
        assert_eq!((pos.next_index, pos.last_pts_ms), (5, Some(1334)));
    }
}
