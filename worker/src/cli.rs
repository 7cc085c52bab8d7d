//! The user-side subcommands: submit, status, results, alerts, cancel, jobs, prompt, queue.
//! Text for people by default (`show`), JSON with `--json`. They take only the Redis
//! connection settings.

mod show;

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches, Subcommand};
use free_roam::client::{self, ClientError, ResultRecord};
use free_roam::config::Config;
use free_roam::job::JobField;
use free_roam::store::{Store, now_ms};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Each job field's `submit` help; a field without a line here gets a generic one.
const FIELD_HELP: &[(&str, &str)] = &[
    (
        "stream_ref",
        "What to watch: an HLS URL (http://, https://), an RTSP camera (rtsp://, rtsps://) or a Redis frame stream key (redis://KEY or the bare key).",
    ),
    (
        "prompt",
        "The job's own prompt. Leave it out and the job follows the active prompt (`free-roam prompt set`), switching when it changes.",
    ),
    (
        "fps",
        "Frames per second to sample, in (0, 30]; the worker's DEFAULT_FPS when left out.",
    ),
    (
        "job_id",
        "The job's id (a UUID otherwise): 1 to 128 of A-Z a-z 0-9 . _ : -. An id already known is refused.",
    ),
    (
        "max_frames",
        "End the job as completed after this many results.",
    ),
    (
        "max_duration_s",
        "End the job as completed after this many seconds of running.",
    ),
    (
        "source",
        "hls or redis; detected from the stream ref when left out.",
    ),
    (
        "scene_gate",
        "on or off: repeat the last output while the scene does not change; the worker's SCENE_GATE when left out.",
    ),
    (
        "alerts",
        "on (default) or off: whether the job writes alert start and end events.",
    ),
    (
        "alert_min_frames",
        "Consecutive sampled frames a label must be detected in before its alert starts, 1 to 1000 (default 2).",
    ),
    (
        "alert_clear_ms",
        "How long (capture time) a label must be absent before its alert ends (default 5000).",
    ),
    (
        "rtsp_transport",
        "tcp (default) or udp: how an RTSP camera sends its media.",
    ),
    (
        "track_activation_threshold",
        "Box models: the score a box needs to start a track, 0 to 1 (default 0.7; lower it for OWL-ViT, whose scores are mostly 0.1 to 0.4).",
    ),
    (
        "track_high_threshold",
        "Box models: the score over which a box is matched in the tracker's first pass, 0 to 1 (default 0.6).",
    ),
    (
        "track_min_iou",
        "Box models: the least overlap (IoU) for a box to continue a track, 0 to 1 (default 0.1).",
    ),
    (
        "track_min_frames",
        "Box models: frames in a row a track must be matched before it gets an id, 1 to 1000 (default 2).",
    ),
    (
        "track_lost_buffer",
        "Box models: how many frames (at 30 FPS) a lost track is kept, 0 to 18000 (default 30).",
    ),
    (
        "track_frame_rate",
        "Box models: the frame rate the tracker assumes (default: the job's fps).",
    ),
    (
        "zones",
        "Box models: JSON, zone name to polygon (or to an object with `points`, `labels`, `loiter_s`); enter, leave and loiter events go to the alerts stream (docs/redis-contract.md, \"Zones and lines\").",
    ),
    (
        "lines",
        "Box models: JSON, line name to two points (or an object with `points` and side names); crossings per direction go to the alerts stream.",
    ),
    (
        "zone_units",
        "pixels (default) or normalised: whether zone and line points are source pixels or 0 to 1.",
    ),
];

/// `submit`'s flags: one per job field (`JobField::ALL`), `--stream-ref` required; the
/// values go to the same validation a worker applies.
#[derive(Clone, Debug, Default)]
pub struct JobFieldArgs(Vec<(JobField, String)>);

impl FromArgMatches for JobFieldArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let given = JobField::ALL
            .into_iter()
            .filter_map(|f| match m.try_get_one::<String>(f.name()) {
                Ok(Some(v)) => Some((f, v.clone())),
                _ => None,
            })
            .collect();
        Ok(Self(given))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for JobFieldArgs {
    fn augment_args(cmd: Command) -> Command {
        cmd.args(JobField::ALL.into_iter().map(|f| {
            let help = FIELD_HELP
                .iter()
                .find(|(name, _)| *name == f.name())
                .map(|(_, help)| help.to_string())
                .unwrap_or_else(|| {
                    format!(
                        "The job's `{}` field (docs/redis-contract.md, \"A job entry\").",
                        f.name()
                    )
                });
            Arg::new(f.name())
                .long(Box::leak(f.name().replace('_', "-").into_boxed_str()) as &'static str)
                .value_name("VALUE")
                .required(f == JobField::StreamRef)
                .help(help)
        }))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// The commands that speak the Redis contract for a person.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Queue a job; prints its id. Every job field is a flag.
    Submit(JobFieldArgs),
    /// Show a job: its state, its prompt mode and both of its hashes.
    ///
    /// Prints the job's status, whether it has its own prompt or follows the active one, its
    /// results stream, then every field of its job hash and of its progress hash, times as
    /// UTC with their age. --json prints the fields as stored (times in ms).
    Status {
        /// The job's id, or the entry id XADD printed for a job pushed without job_id.
        job_id: String,
    },
    /// Print a job's results, one line per entry; --follow waits for new ones.
    ///
    /// Each line reads `frame N  vV  T ms  SUMMARY`: the frame's index, the prompt version
    /// that made it, the model's time for its batch, and what the output says (boxes per
    /// label with the best score and the top boxes, detected phrases with their scores, a
    /// caption). --full prints the output whole; --json prints each entry as JSON, numbers as
    /// numbers and `output` as an object.
    Results {
        /// The job's id, or the entry id of a job pushed without job_id.
        job_id: String,
        /// Wait for new entries until the job's end entry.
        #[arg(long)]
        follow: bool,
        /// Start with the last N entries written so far (0: only new ones).
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        /// Stop after printing N entries.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Print each output whole instead of its summary.
        #[arg(long)]
        full: bool,
    },
    /// Print alert start and end events (all jobs, or one); with --follow, wait for new ones.
    Alerts {
        #[arg(long)]
        follow: bool,
        /// Only this job's alerts.
        #[arg(long = "job")]
        job_id: Option<String>,
        /// Save each event's picture (its `snapshot`) in DIR, named by the event: its kind and
        /// `alert_id`, `:` and other characters unsafe in a file name written `_`, `.jpg`.
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
    },
    /// Save a running job's latest frame, its boxes, track ids, zones and lines drawn, as a
    /// JPEG (refreshed every SNAPSHOT_INTERVAL_MS).
    Snapshot {
        /// The job's id, or the entry id of a job pushed without job_id.
        job_id: String,
        /// Where to write the JPEG.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Cancel a job: a queued one never runs, a running one stops within a second.
    Cancel {
        /// The job's id, or the entry id of a job pushed without job_id.
        job_id: String,
    },
    /// List jobs, newest first.
    ///
    /// Columns: the job's id, its status, its prompt (`own`, or `active`: it follows the
    /// active prompt), results written, age, stream.
    Jobs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Read or change the active prompt, the one jobs without a prompt of their own follow.
    #[command(subcommand)]
    Prompt(PromptCommand),
    /// The job queue's layout: its shards.
    #[command(subcommand)]
    Queue(QueueCommand),
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Show the fleet's queue shard count and what each shard holds, or set the count.
    ///
    /// Without COUNT: the count, then per shard its job stream, the jobs waiting (no worker
    /// has read them), running (read and not finished: the group's pending entries) and the
    /// live workers (leases not run out); a shard with jobs and no live worker is flagged.
    /// With COUNT: sets it. Growing is always allowed; shrinking is refused while a shard
    /// it drops holds a job. Workers serving all shards follow a larger count within about
    /// 30 s; restart those with QUEUE_SHARDS_SERVED set. Shrink with the producers stopped: one that read the old count may still
    /// queue into a shard the new one drops.
    Shards {
        /// The new shard count (from 1; a count over the limit is refused, naming it).
        count: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PromptCommand {
    /// Set the active prompt; prints the new version.
    Set {
        text: String,
        /// Reset the history to this version alone.
        #[arg(long)]
        no_preserve: bool,
    },
    /// Show the active prompt.
    Get,
    /// Show every version, newest first, with when it was set.
    History {
        #[arg(long, default_value_t = 0)]
        count: usize,
    },
}

fn fail(e: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("free-roam: {e}");
    ExitCode::from(code)
}

fn client_failure(e: ClientError) -> ExitCode {
    match e {
        ClientError::NotFound(_) => fail(e, 1),
        ClientError::Invalid(_) | ClientError::ShardCount { .. } => fail(e, 2),
        ClientError::ShardBusy { .. } => fail(e, 1),
        ClientError::Store(ref s) if s.is_transient() => {
            fail(format!("{e} (is Redis reachable? check REDIS_URL)"), 1)
        }
        ClientError::Store(_) => fail(e, 1),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

pub async fn run(command: ClientCommand, config: Config, json: bool) -> ExitCode {
    let store = match Store::connect(&config.redis, 4) {
        Ok(s) => s,
        Err(e) => return fail(e, 2),
    };
    let result = match command {
        ClientCommand::Submit(JobFieldArgs(fields)) => submit(&store, &fields, json).await,
        ClientCommand::Status { job_id } => status(&store, &job_id, json).await,
        ClientCommand::Results {
            job_id,
            follow,
            last,
            limit,
            full,
        } => {
            let view = ResultsView {
                follow,
                last,
                limit,
                full,
                json,
            };
            return results(&store, &job_id, view).await;
        }
        ClientCommand::Alerts {
            follow,
            job_id,
            save,
        } => {
            let view = AlertsView {
                job_id,
                follow,
                save,
                json,
            };
            return alerts(&store, &view).await;
        }
        ClientCommand::Snapshot { job_id, output } => {
            return snapshot(&store, &job_id, &output, json).await;
        }
        ClientCommand::Cancel { job_id } => cancel(&store, &job_id, json).await,
        ClientCommand::Jobs { status, limit } => return jobs(&store, status, limit, json).await,
        ClientCommand::Prompt(cmd) => return prompt(&store, cmd, json).await,
        ClientCommand::Queue(QueueCommand::Shards { count }) => {
            queue_shards(&store, count, json).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => client_failure(e),
    }
}

async fn submit(
    store: &Store,
    fields: &[(JobField, String)],
    json: bool,
) -> Result<(), ClientError> {
    let id = client::submit(store, fields).await?;
    if json {
        print_json(&serde_json::json!({"job_id": id}));
    } else {
        println!("{id}");
    }
    Ok(())
}

async fn status(store: &Store, id: &str, json: bool) -> Result<(), ClientError> {
    let view = client::status(store, id).await?;
    if json {
        print_json(&client::typed_entry(&view.flat()));
    } else {
        println!("{}", show::status(&view, now_ms()));
    }
    Ok(())
}

async fn cancel(store: &Store, id: &str, json: bool) -> Result<(), ClientError> {
    let retention = client::fleet_retention(store).await?;
    let (job_id, outcome) = client::cancel_by_id(store, id, retention).await?;
    if json {
        print_json(&serde_json::json!({"job_id": job_id, "result": outcome.to_string()}));
    } else {
        println!("{job_id}: {outcome}");
    }
    Ok(())
}

/// `free-roam queue shards [COUNT]`: shows each shard's queue, or sets the count.
async fn queue_shards(store: &Store, count: Option<u32>, json: bool) -> Result<(), ClientError> {
    if let Some(count) = count {
        let change = client::set_queue_shards(store, count).await?;
        if json {
            print_json(&serde_json::json!({
                "queue_shards": change.now,
                "previous": change.previous,
            }));
        } else {
            println!("{}", show::shard_count_change(change));
        }
        return Ok(());
    }
    let (shards, queues) = client::queue_overview(store).await?;
    if json {
        let list: Vec<_> = queues
            .iter()
            .map(|q| {
                serde_json::json!({
                    "shard": q.shard,
                    "stream": q.stream,
                    "waiting": q.waiting,
                    "running": q.running,
                    "live_workers": q.live_workers,
                    "unserved": q.unserved(),
                })
            })
            .collect();
        print_json(&serde_json::json!({"queue_shards": shards, "shards": list}));
    } else {
        println!("{}", show::shards(shards, &queues));
    }
    Ok(())
}

async fn jobs(store: &Store, status: Option<String>, limit: usize, json: bool) -> ExitCode {
    if let Some(s) = &status
        && free_roam::job::JobStatus::parse(s).is_none()
    {
        return fail(
            format!("--status {s}: use queued, running, completed, failed, cancelled or dead"),
            2,
        );
    }
    let jobs = match client::list(store, status.as_deref(), limit).await {
        Ok(jobs) => jobs,
        Err(e) => return client_failure(e),
    };
    if json {
        let typed: Vec<_> = jobs.iter().map(client::typed_entry).collect();
        print_json(&serde_json::Value::Array(typed));
        return ExitCode::SUCCESS;
    }
    let width = jobs
        .iter()
        .filter_map(|j| j.get("job_id").map(String::len))
        .chain([3])
        .max()
        .unwrap_or(3);
    println!("{}", show::jobs_header(width));
    let now = now_ms();
    for j in &jobs {
        println!("{}", show::job_line(j, width, now));
    }
    ExitCode::SUCCESS
}

/// How `results` prints.
struct ResultsView {
    follow: bool,
    last: Option<usize>,
    limit: Option<usize>,
    full: bool,
    json: bool,
}

impl ResultsView {
    fn print(&self, id: &str, fields: &BTreeMap<String, String>) {
        if self.json {
            print_json(&serde_json::json!({"id": id, "fields": client::typed_entry(fields)}));
        } else {
            println!("{}", show::result(fields, self.full));
        }
    }
}

/// Prints a job's results; ends at its end entry (exit 0 when it completed, else 1), at
/// `--limit`, or, without `--follow`, when none are left.
async fn results(store: &Store, id: &str, view: ResultsView) -> ExitCode {
    let job_id = match client::resolve_job_id(store, id).await {
        Ok(j) => j,
        Err(e) => return client_failure(e),
    };
    let mut printed = 0usize;
    let mut last = "0".to_string();
    let mut first: Vec<ResultRecord> = Vec::new();
    if let Some(n) = view.last {
        match client::results_last(store, &job_id, n.max(1)).await {
            Ok(tail) => {
                last = tail.last().map_or(last, |(id, _)| id.clone());
                first = tail.into_iter().rev().take(n).rev().collect();
            }
            Err(e) => return client_failure(e),
        }
    }
    let mut seen_any = !first.is_empty() || last != "0";
    loop {
        let batch = if first.is_empty() {
            let block = view.follow.then_some(1000);
            match client::results_after(store, &job_id, &last, 500, block).await {
                Ok(b) => b,
                Err(e) => return client_failure(e),
            }
        } else {
            std::mem::take(&mut first)
        };
        if batch.is_empty() {
            if !seen_any && let Err(e) = client::status(store, &job_id).await {
                return client_failure(e);
            }
            seen_any = true;
            if view.follow {
                continue;
            }
            return ExitCode::SUCCESS;
        }
        seen_any = true;
        for (entry_id, fields) in &batch {
            if view.limit.is_some_and(|n| printed >= n) {
                return ExitCode::SUCCESS;
            }
            view.print(entry_id, fields);
            printed += 1;
            if fields.get("kind").map(String::as_str) == Some("end") {
                let ok = fields.get("status").map(String::as_str) == Some("completed");
                return if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
            }
        }
        if view.limit.is_some_and(|n| printed >= n) {
            return ExitCode::SUCCESS;
        }
        last = batch.last().map(|(id, _)| id.clone()).unwrap_or(last);
    }
}

/// What `free-roam alerts` shows and keeps.
struct AlertsView {
    job_id: Option<String>,
    follow: bool,
    /// Where each event's picture is saved.
    save: Option<PathBuf>,
    json: bool,
}

async fn alerts(store: &Store, view: &AlertsView) -> ExitCode {
    if let Some(dir) = &view.save
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return fail(format!("cannot create {}: {e}", dir.display()), 2);
    }
    let mut last = "0".to_string();
    let mut seen = SeenAlerts::default();
    loop {
        let block = if view.follow { Some(1000) } else { None };
        let batch = match client::alerts_after(store, &last, 500, block).await {
            Ok(b) => b,
            Err(e) => return client_failure(e),
        };
        if batch.is_empty() && !view.follow {
            return ExitCode::SUCCESS;
        }
        for (id, fields) in &batch {
            let job = fields.get("job_id").map(String::as_str);
            if view.job_id.as_deref().is_some_and(|j| job != Some(j)) || !seen.first_time(fields) {
                continue;
            }
            if view.json {
                print_json(&serde_json::json!({"id": id, "fields": client::typed_entry(fields)}));
            } else {
                println!("{}", show::alert(fields));
            }
            if let Some(dir) = &view.save
                && let Err(code) = save_event_picture(store, dir, fields).await
            {
                return code;
            }
        }
        last = batch.last().map(|(id, _)| id.clone()).unwrap_or(last);
    }
}

/// Writes the picture an event's `snapshot` names to `dir`, named by the event; an event
/// without one, or whose picture has expired, saves nothing.
async fn save_event_picture(
    store: &Store,
    dir: &Path,
    fields: &BTreeMap<String, String>,
) -> Result<(), ExitCode> {
    let (Some(key), Some(kind), Some(alert_id)) = (
        fields.get("snapshot"),
        fields.get("kind"),
        fields.get("alert_id"),
    ) else {
        return Ok(());
    };
    let Some(jpeg) = client::event_snapshot(store, key)
        .await
        .map_err(client_failure)?
    else {
        eprintln!("free-roam: the picture {key} has expired");
        return Ok(());
    };
    let path = dir.join(show::picture_file_name(kind, alert_id));
    std::fs::write(&path, jpeg)
        .map_err(|e| fail(format!("cannot write {}: {e}", path.display()), 1))
}

/// `free-roam snapshot`: writes the job's latest annotated frame to `output`.
async fn snapshot(store: &Store, id: &str, output: &Path, json: bool) -> ExitCode {
    let jpeg = match client::latest_snapshot(store, id).await {
        Ok(j) => j,
        Err(e) => return client_failure(e),
    };
    if let Err(e) = std::fs::write(output, &jpeg) {
        return fail(format!("cannot write {}: {e}", output.display()), 1);
    }
    if json {
        print_json(&serde_json::json!({"path": output.display().to_string(), "bytes": jpeg.len()}));
    } else {
        println!("{} ({} KB)", output.display(), jpeg.len().div_ceil(1024));
    }
    ExitCode::SUCCESS
}

/// Alert events already printed, by `alert_id` and `kind`: a write retried after a failure
/// may add an event twice (delivery is at least once). Repeats come within one retry of each
/// other, so the newest `SEEN_ALERTS` are enough.
#[derive(Default)]
struct SeenAlerts {
    order: VecDeque<(String, String)>,
    set: HashSet<(String, String)>,
}

const SEEN_ALERTS: usize = 10_000;

impl SeenAlerts {
    /// Whether this event is new; an entry without `alert_id` always is.
    fn first_time(&mut self, f: &BTreeMap<String, String>) -> bool {
        let (Some(id), Some(kind)) = (f.get("alert_id"), f.get("kind")) else {
            return true;
        };
        let key = (id.clone(), kind.clone());
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > SEEN_ALERTS
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

async fn prompt(store: &Store, cmd: PromptCommand, json: bool) -> ExitCode {
    use free_roam::prompt::active as prompt;
    match cmd {
        PromptCommand::Set { text, no_preserve } => {
            match prompt::set(store, &text, !no_preserve).await {
                Ok(v) if json => print_json(&serde_json::json!({"version": v})),
                Ok(v) => println!("{v}"),
                Err(e) => {
                    let msg = e.server_message().unwrap_or_else(|| e.to_string());
                    return fail(msg, if e.is_transient() { 1 } else { 2 });
                }
            }
        }
        PromptCommand::Get => match prompt::get(store).await {
            Ok(Some(p)) if json => print_json(&serde_json::json!(p)),
            Ok(Some(p)) => println!("v{}  {}", p.version, p.text),
            Ok(None) => return fail("no prompt has been set", 1),
            Err(e) => return fail(e, 1),
        },
        PromptCommand::History { count } => match prompt::history(store, count).await {
            Ok(h) if json => print_json(&serde_json::json!(h)),
            Ok(h) => {
                let now = now_ms();
                for p in h {
                    println!(
                        "v{}  {}  {}",
                        p.version,
                        show::time(p.updated_ms, now),
                        p.text
                    );
                }
            }
            Err(e) => return fail(e, 1),
        },
    }
    ExitCode::SUCCESS
}
