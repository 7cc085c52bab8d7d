//! The user-side subcommands: submit, status, results, alerts, cancel, jobs, prompt. Text for
//! people by default, JSON with `--json`.

use clap::{Args, Subcommand};
use free_roam::client::{self, ClientError, Submission};
use free_roam::config::Config;
use free_roam::store::Store;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// An HLS URL (http/https) or a Redis frame stream key.
    #[arg(long)]
    stream_ref: String,
    /// The job's own prompt; leave it out to follow the active prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Frames per second to sample; the worker's DEFAULT_FPS when left out.
    #[arg(long)]
    fps: Option<f64>,
    /// The job's id (a UUID otherwise). An id already known is refused.
    #[arg(long)]
    job_id: Option<String>,
    #[arg(long)]
    max_frames: Option<u64>,
    #[arg(long)]
    max_duration_s: Option<f64>,
    /// `hls` or `redis`; detected from stream_ref when left out.
    #[arg(long)]
    source: Option<String>,
}

/// The commands that speak the Redis contract for a person.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Queue a job; prints its id.
    Submit(SubmitArgs),
    /// Show a job's state.
    Status { job_id: String },
    /// Print a job's results; with --follow, wait for new ones until the job ends.
    Results {
        job_id: String,
        #[arg(long)]
        follow: bool,
    },
    /// Print alert start and end events (all jobs, or one); with --follow, wait for new ones.
    Alerts {
        #[arg(long)]
        follow: bool,
        /// Only this job's alerts.
        #[arg(long = "job")]
        job_id: Option<String>,
    },
    /// Cancel a job: a queued one never runs, a running one stops within a second.
    Cancel { job_id: String },
    /// List jobs, newest first.
    Jobs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Read or change the active prompt.
    #[command(subcommand)]
    Prompt(PromptCommand),
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
    /// Show every version, newest first.
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
        ClientError::Invalid(_) => fail(e, 2),
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
    match command {
        ClientCommand::Submit(a) => {
            let sub = Submission {
                stream_ref: a.stream_ref,
                prompt: a.prompt,
                fps: a.fps,
                job_id: a.job_id,
                max_frames: a.max_frames,
                max_duration_s: a.max_duration_s,
                source: a.source,
            };
            match client::submit(&store, &sub).await {
                Ok(id) if json => print_json(&serde_json::json!({"job_id": id})),
                Ok(id) => println!("{id}"),
                Err(e) => return client_failure(e),
            }
        }
        ClientCommand::Status { job_id } => match client::status(&store, &job_id).await {
            Ok(h) if json => print_json(&serde_json::json!(h)),
            Ok(h) => print_fields(&h),
            Err(e) => return client_failure(e),
        },
        ClientCommand::Results { job_id, follow } => {
            return results(&store, &job_id, follow, json).await;
        }
        ClientCommand::Alerts { follow, job_id } => {
            return alerts(&store, job_id.as_deref(), follow, json).await;
        }
        ClientCommand::Cancel { job_id } => {
            match client::cancel(&store, &job_id, config.queue.retention()).await {
                Ok(v) if json => {
                    print_json(&serde_json::json!({"job_id": job_id, "result": v.to_string()}))
                }
                Ok(v) => println!("{job_id}: {v}"),
                Err(e) => return client_failure(e),
            }
        }
        ClientCommand::Jobs { status, limit } => {
            if let Some(s) = &status
                && free_roam::job::JobStatus::parse(s).is_none()
            {
                return fail(
                    format!(
                        "--status {s}: use queued, running, completed, failed, cancelled or dead"
                    ),
                    2,
                );
            }
            match client::list(&store, status.as_deref(), limit).await {
                Ok(jobs) if json => print_json(&serde_json::json!(jobs)),
                Ok(jobs) => {
                    for j in jobs {
                        let g = |k: &str| j.get(k).map(String::as_str).unwrap_or("-").to_string();
                        println!(
                            "{}  {:<9}  results={:<6}  {}",
                            g("job_id"),
                            g("status"),
                            g("results"),
                            g("stream_ref")
                        );
                    }
                }
                Err(e) => return client_failure(e),
            }
        }
        ClientCommand::Prompt(cmd) => return prompt(&store, cmd, json).await,
    }
    ExitCode::SUCCESS
}

fn print_fields(h: &BTreeMap<String, String>) {
    let width = h.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in h {
        println!("{k:<width$}  {v}");
    }
}

async fn results(store: &Store, job_id: &str, follow: bool, json: bool) -> ExitCode {
    let mut last = "0".to_string();
    let mut seen_any = false;
    loop {
        let block = if follow { Some(1000) } else { None };
        let batch = match client::results_after(store, job_id, &last, 500, block).await {
            Ok(b) => b,
            Err(e) => return client_failure(e),
        };
        if batch.is_empty() {
            if !seen_any {
                match client::status(store, job_id).await {
                    Err(ClientError::NotFound(m)) => return fail(m, 1),
                    Err(e) => return client_failure(e),
                    Ok(_) => {}
                }
            }
            if follow {
                continue;
            }
            return ExitCode::SUCCESS;
        }
        seen_any = true;
        for (id, fields) in &batch {
            if json {
                print_json(&serde_json::json!({"id": id, "fields": fields}));
            } else {
                println!("{}", describe_result(fields));
            }
            if fields.get("kind").map(String::as_str) == Some("end") {
                let ok = fields.get("status").map(String::as_str) == Some("completed");
                return if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
            }
        }
        last = batch.last().map(|(id, _)| id.clone()).unwrap_or(last);
    }
}

/// One line per result entry, for people.
fn describe_result(f: &BTreeMap<String, String>) -> String {
    let g = |k: &str| f.get(k).map(String::as_str).unwrap_or("-");
    match g("kind") {
        "end" => {
            let err = f.get("error").map(|e| format!(": {e}")).unwrap_or_default();
            format!("end  status={} results={}{err}", g("status"), g("results"))
        }
        "error" => format!("frame {:>5}  error: {}", g("frame"), g("error")),
        _ => format!(
            "frame {:>5}  v{} {:>7}ms  {}",
            g("frame"),
            g("prompt_version"),
            g("latency_ms"),
            g("output")
        ),
    }
}

async fn alerts(store: &Store, job_id: Option<&str>, follow: bool, json: bool) -> ExitCode {
    let mut last = "0".to_string();
    let mut seen = SeenAlerts::default();
    loop {
        let block = if follow { Some(1000) } else { None };
        let batch = match client::alerts_after(store, &last, 500, block).await {
            Ok(b) => b,
            Err(e) => return client_failure(e),
        };
        if batch.is_empty() && !follow {
            return ExitCode::SUCCESS;
        }
        for (id, fields) in &batch {
            if job_id.is_some_and(|j| fields.get("job_id").map(String::as_str) != Some(j))
                || !seen.first_time(fields)
            {
                continue;
            }
            if json {
                print_json(&serde_json::json!({"id": id, "fields": fields}));
            } else {
                println!("{}", describe_alert(fields));
            }
        }
        last = batch.last().map(|(id, _)| id.clone()).unwrap_or(last);
    }
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

/// One line per alert event, for people.
fn describe_alert(f: &BTreeMap<String, String>) -> String {
    let g = |k: &str| f.get(k).map(String::as_str).unwrap_or("-");
    let reason = f
        .get("reason")
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "{:<5}  job={}  {}  frames {}..{}  peak={}{reason}",
        g("kind"),
        g("job_id"),
        g("label"),
        g("first_frame"),
        g("last_frame"),
        g("peak_score"),
    )
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
                for p in h {
                    println!("v{}  {}  {}", p.version, p.updated_ms, p.text);
                }
            }
            Err(e) => return fail(e, 1),
        },
    }
    ExitCode::SUCCESS
}
