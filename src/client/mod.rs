//! The user's operations on the contract, as the CLI performs them: submit, status, results,
//! cancel and listing, over every queue shard of the fleet. They do exactly what `redis-cli`
//! would, so either can be used.

mod shards;

pub use shards::{
    ShardCountChange, ShardQueue, queue_overview, search_order, set_queue_shards, shard_holding,
};

use crate::job::{JobField, JobSpec, JobStatus, SpecError};
use crate::queue::job_id_for_entry;
use crate::store::functions::{self, CancelOutcome, JOB_EXISTS, NO_JOB, Retention};
use crate::store::keys::shard_of_job;
use crate::store::{MAX_BLOCK_MS, Store, StoreError};
use std::collections::{BTreeMap, VecDeque};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// A queue shard count outside 1..=`MAX_QUEUE_SHARDS`.
    #[error("the queue shard count must be 1 to {max}, not {given}")]
    ShardCount { given: u32, max: u32 },
    /// A shrink of the shard count refused: `shard`, which the new count drops, still holds
    /// jobs that no worker would serve any more.
    #[error(
        "shard {shard} ({stream}) still holds {waiting} waiting and {running} running jobs; \
         shrink once the shards it drops are empty (stop the producers first)"
    )]
    ShardBusy {
        shard: u32,
        stream: String,
        waiting: u64,
        running: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SpecError> for ClientError {
    fn from(e: SpecError) -> Self {
        ClientError::Invalid(e.to_string())
    }
}

/// Validates and queues a job from its fields as given (unset ones left out); returns its
/// id, a UUID when `job_id` is not among them. The job goes to its own queue shard
/// ([`shard_of_job`] of its id among the fleet's shards). A job_id already known there, or
/// in shard 0 (the front door of plain `XADD`s), is refused.
pub async fn submit(store: &Store, given: &[(JobField, String)]) -> Result<String, ClientError> {
    let job_id = given
        .iter()
        .find(|(f, _)| *f == JobField::JobId)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let fields: Vec<(&str, String)> = given
        .iter()
        .filter(|(f, _)| *f != JobField::JobId)
        .map(|(f, v)| (f.name(), v.clone()))
        .collect();
    // The same validation a worker applies, so a bad job is refused before it is queued.
    let mut raw: Vec<(Vec<u8>, Vec<u8>)> = fields
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    raw.push((
        JobField::JobId.name().as_bytes().to_vec(),
        job_id.as_bytes().to_vec(),
    ));
    JobSpec::parse("0-0", &raw, 2.0, || job_id.clone()).map_err(|(e, _)| e)?;

    let shard = shard_of_job(&job_id, store.queue_shards().await?);
    if shard != 0 {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(store.keys().shard(0).job(&job_id)).arg("status");
        if let Some(status) = store.query::<Option<String>>(&cmd).await? {
            return Err(ClientError::Invalid(format!(
                "job_id {job_id} already exists (status {status})"
            )));
        }
    }
    match functions::submit(&store.shard(shard), &job_id, &fields).await {
        Ok(_) => Ok(job_id),
        Err(e) if e.code() == Some(JOB_EXISTS) => Err(ClientError::Invalid(
            e.server_message().unwrap_or_else(|| e.to_string()),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Whether a job runs with its own prompt or follows the active one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptMode {
    /// The job's own `prompt` (`prompt_mode` = `fixed`).
    Own,
    /// No `prompt`: the active prompt, live (`prompt_mode` = `live`).
    FollowsActive,
}

/// A job as `status` shows it: both of its hashes, neither hiding the other's fields.
#[derive(Clone, Debug, Default)]
pub struct JobView {
    pub job_id: String,
    /// The queue shard that holds the job (0 for an entry no worker has read yet).
    pub shard: u32,
    /// The job hash (`{fr}:job:<id>`, `{fr:q<i>}:job:<id>` in shard i); for an entry no
    /// worker has read yet, the entry's fields with `status` = `queued`, `entry_id` and a
    /// `note` saying so.
    pub job: BTreeMap<String, String>,
    /// The progress hash (`{fr:<id>}:progress`): counters, `updated_ms`, `ended`, ...
    pub progress: BTreeMap<String, String>,
    /// The job's result stream.
    pub results_key: String,
}

impl JobView {
    /// From the hash's `prompt_mode` once a worker read the job, else from its `prompt`.
    pub fn prompt_mode(&self) -> PromptMode {
        match self.job.get("prompt_mode").map(String::as_str) {
            Some("live") => PromptMode::FollowsActive,
            Some("fixed") => PromptMode::Own,
            _ if self.job.contains_key(JobField::Prompt.name()) => PromptMode::Own,
            _ => PromptMode::FollowsActive,
        }
    }

    /// One flat map (what `--json` prints): the job hash's fields as stored, the progress
    /// hash's beside them (those the job hash also has, such as `updated_ms`, as
    /// `progress_<name>`), `job_id`, `results_key` and `queue_shard`.
    pub fn flat(&self) -> BTreeMap<String, String> {
        let mut out = self.job.clone();
        for (k, v) in &self.progress {
            let name = if out.contains_key(k) {
                format!("progress_{k}")
            } else {
                k.clone()
            };
            out.insert(name, v.clone());
        }
        out.insert("job_id".into(), self.job_id.clone());
        out.insert("results_key".into(), self.results_key.clone());
        out.insert("queue_shard".into(), self.shard.to_string());
        out
    }
}

/// Whether `id` has the shape of a stream entry id (`<ms>-<seq>`).
pub fn is_entry_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A job as the lookups found it: the id the user means, and the queue shard whose job
/// hash holds it (`None`: no shard has one: an entry no worker has read yet, or no job).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundJob {
    pub job_id: String,
    pub shard: Option<u32>,
}

/// The job id a user means: `id` itself, or, for the id of a `{fr}:jobs` entry pushed
/// without `job_id`, the id every worker gives that entry ([`job_id_for_entry`]). Only an
/// entry id costs a lookup.
pub async fn resolve_job_id(store: &Store, id: &str) -> Result<String, ClientError> {
    if !is_entry_id(id) {
        return Ok(id.to_string());
    }
    Ok(find_job(store, id).await?.job_id)
}

/// Finds the job a user means, and the shard that holds it: `id`'s job hash in the shards
/// of [`search_order`]; else, for an entry id, the job of that entry in shard 0's stream
/// (the `XADD {fr}:jobs` front door: entry ids of the other shards' streams are not looked
/// up, their jobs are queued with a `job_id`).
pub async fn find_job(store: &Store, id: &str) -> Result<FoundJob, ClientError> {
    let shards = store.queue_shards().await?;
    let held = shard_holding(store, id, shards).await?;
    if held.is_some() || !is_entry_id(id) {
        return Ok(FoundJob {
            job_id: id.to_string(),
            shard: held,
        });
    }
    let front = store.shard(0);
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(front.keys().jobs()).arg(id).arg(id);
    let entry: Vec<(String, BTreeMap<String, String>)> = front.query(&cmd).await?;
    let given = entry
        .into_iter()
        .next()
        .and_then(|(_, f)| f.get(JobField::JobId.name()).cloned());
    if let Some(given) = given {
        let shard = shard_holding(store, &given, shards).await?;
        return Ok(FoundJob {
            job_id: given,
            shard,
        });
    }
    // A worker claims the entry in the shard it read it from: shard 0.
    let derived = job_id_for_entry(front.keys().tag(), id);
    if exists(&front, &front.keys().job(&derived)).await? {
        return Ok(FoundJob {
            job_id: derived,
            shard: Some(0),
        });
    }
    if find_unread_entry(&front, &derived).await?.is_some() {
        return Ok(FoundJob {
            job_id: derived,
            shard: None,
        });
    }
    Ok(FoundJob {
        job_id: id.to_string(),
        shard: None,
    })
}

async fn exists(store: &Store, key: &str) -> Result<bool, StoreError> {
    let mut cmd = redis::cmd("EXISTS");
    cmd.arg(key);
    Ok(store.query::<i64>(&cmd).await? > 0)
}

/// A job's hash and progress hash, or, for an entry no worker has read yet, what the entry
/// says. `id` may be a job id or the entry id of a job pushed without one.
pub async fn status(store: &Store, id: &str) -> Result<JobView, ClientError> {
    let FoundJob { job_id, shard } = find_job(store, id).await?;
    if let Some(shard) = shard {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(store.keys().shard(shard).job(&job_id));
        let hash: BTreeMap<String, String> = store.query(&cmd).await?;
        if !hash.is_empty() {
            return Ok(view_with_progress(store, &job_id, shard, hash).await?);
        }
    }
    if let Some((entry_id, mut fields)) = find_unread_entry(&store.shard(0), &job_id).await? {
        fields.remove(JobField::JobId.name());
        fields.insert("status".into(), "queued".into());
        fields.insert("entry_id".into(), entry_id);
        fields.insert("note".into(), "not yet claimed by a worker".into());
        return Ok(JobView {
            results_key: store.keys().results(&job_id),
            job_id,
            shard: 0,
            job: fields,
            progress: BTreeMap::new(),
        });
    }
    Err(ClientError::NotFound(format!("no job with id {id}")))
}

async fn view_with_progress(
    store: &Store,
    job_id: &str,
    shard: u32,
    job: BTreeMap<String, String>,
) -> Result<JobView, StoreError> {
    let mut cmd = redis::cmd("HGETALL");
    cmd.arg(store.keys().progress(job_id));
    let progress: BTreeMap<String, String> = store.query(&cmd).await?;
    Ok(JobView {
        job_id: job_id.to_string(),
        shard,
        job,
        progress,
        results_key: store.keys().results(job_id),
    })
}

/// Looks for an entry still in the job stream of `store`'s shard that carries this job: by
/// its `job_id`, or, for an entry without one, by the id derived from its entry id.
async fn find_unread_entry(
    store: &Store,
    job_id: &str,
) -> Result<Option<(String, BTreeMap<String, String>)>, StoreError> {
    let tag = store.keys().tag().to_string();
    let carries = |entry_id: &str, f: &BTreeMap<String, String>| match f.get(JobField::JobId.name())
    {
        Some(given) => given == job_id,
        None => job_id_for_entry(&tag, entry_id) == job_id,
    };
    let mut start = "-".to_string();
    loop {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(store.keys().jobs())
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(500);
        let batch: Vec<(String, BTreeMap<String, String>)> = store.query(&cmd).await?;
        let Some((last, _)) = batch.last() else {
            return Ok(None);
        };
        start = format!("({last}");
        if let Some(found) = batch.into_iter().find(|(id, f)| carries(id, f)) {
            return Ok(Some(found));
        }
    }
}

/// Fields of result and alert entries that hold a number.
const NUMBER_FIELDS: &[&str] = &[
    "frame",
    "pts_ms",
    "capture_ms",
    "prompt_version",
    "latency_ms",
    "results",
    "reused_from",
    "first_frame",
    "first_capture_ms",
    "last_frame",
    "last_capture_ms",
    "peak_score",
    // The job and progress hashes' numbers (`status --json`, `jobs --json`).
    "fps",
    "max_frames",
    "max_duration_s",
    "attempts",
    "handoffs",
    "created_ms",
    "started_ms",
    "updated_ms",
    "finished_ms",
    "progress_updated_ms",
    "frames_decoded",
    "frames_sampled",
    "frames_dropped",
    "frames_failed",
    "frames_reused",
    "progress_prompt_version",
    "queue_shard",
];
/// Fields of entries and hashes that hold JSON.
const JSON_FIELDS: &[&str] = &["output", "peak_box", "alert_state", "tracker_state"];

/// A result or alert entry, or a job's hashes, as JSON for programs (`--json`): numbers as
/// numbers, `output`, `peak_box` and the saved states as the JSON they hold, everything
/// else (and a value that does not parse) as the string it is.
pub fn typed_entry(fields: &BTreeMap<String, String>) -> serde_json::Value {
    let typed = fields.iter().map(|(k, v)| {
        let parsed = if NUMBER_FIELDS.contains(&k.as_str()) {
            v.parse::<serde_json::Number>()
                .ok()
                .map(serde_json::Value::Number)
        } else if JSON_FIELDS.contains(&k.as_str()) {
            serde_json::from_str(v).ok()
        } else {
            None
        };
        (
            k.clone(),
            parsed.unwrap_or_else(|| serde_json::Value::String(v.clone())),
        )
    });
    serde_json::Value::Object(typed.collect())
}

/// One entry of a results stream.
pub type ResultRecord = (String, BTreeMap<String, String>);

/// Reads a job's results after `after` (an entry id, `0` for all). With `block_ms`, waits
/// up to that long for new ones.
pub async fn results_after(
    store: &Store,
    job_id: &str,
    after: &str,
    count: usize,
    block_ms: Option<u64>,
) -> Result<Vec<ResultRecord>, ClientError> {
    let key = store.keys().results(job_id);
    read_after(store, &key, after, count, block_ms).await
}

/// The last `count` entries of a job's results, oldest first.
pub async fn results_last(
    store: &Store,
    job_id: &str,
    count: usize,
) -> Result<Vec<ResultRecord>, ClientError> {
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(store.keys().results(job_id))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count);
    let mut entries: Vec<ResultRecord> = store.query(&cmd).await?;
    entries.reverse();
    Ok(entries)
}

/// Reads one stream's entries after `after`, waiting up to `block_ms` when given.
async fn read_after(
    store: &Store,
    key: &str,
    after: &str,
    count: usize,
    block_ms: Option<u64>,
) -> Result<Vec<ResultRecord>, ClientError> {
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT").arg(count);
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms.min(MAX_BLOCK_MS));
    }
    cmd.arg("STREAMS").arg(key).arg(after);
    let reply: Option<Vec<(String, Vec<ResultRecord>)>> = if block_ms.is_some() {
        store.query_blocking(&cmd).await?
    } else {
        store.query(&cmd).await?
    };
    Ok(reply
        .and_then(|streams| streams.into_iter().next())
        .map(|(_, entries)| entries)
        .unwrap_or_default())
}

/// Reads `{fr}:alerts` after `after` (an entry id; `0` for all, `$` for only new ones).
/// With `block_ms`, waits up to that long for new ones.
pub async fn alerts_after(
    store: &Store,
    after: &str,
    count: usize,
    block_ms: Option<u64>,
) -> Result<Vec<ResultRecord>, ClientError> {
    let key = store.keys().alerts();
    read_after(store, &key, after, count, block_ms).await
}

/// A job's latest annotated frame (a JPEG), kept while it runs and refreshed every
/// SNAPSHOT_INTERVAL_MS. `id` may be a job id or the entry id of a job pushed without one.
pub async fn latest_snapshot(store: &Store, id: &str) -> Result<Vec<u8>, ClientError> {
    let job_id = resolve_job_id(store, id).await?;
    let mut cmd = redis::cmd("GET");
    cmd.arg(store.keys().latest_snapshot(&job_id));
    store.query::<Option<Vec<u8>>>(&cmd).await?.ok_or_else(|| {
        ClientError::NotFound(format!(
            "job `{job_id}` has no latest frame (it has not run, its pictures are off \
             (SNAPSHOT_INTERVAL_MS=0), or it ended longer ago than RESULT_TTL_S)"
        ))
    })
}

/// The picture an event's `snapshot` field names (a JPEG); `None` once it has expired.
pub async fn event_snapshot(store: &Store, key: &str) -> Result<Option<Vec<u8>>, ClientError> {
    if !store.keys().owns(key) {
        return Err(ClientError::Invalid(format!(
            "`{key}` is not a key of this deployment (KEY_PREFIX)"
        )));
    }
    let mut cmd = redis::cmd("GET");
    cmd.arg(key);
    Ok(store.query::<Option<Vec<u8>>>(&cmd).await?)
}

/// How long a job's keys are kept and its streams capped, as the fleet published them in
/// `{fr}:settings` (the settings' defaults for what no worker published yet), so that an
/// end entry the CLI writes is kept as a worker's would be.
pub async fn fleet_retention(store: &Store) -> Result<Retention, ClientError> {
    let defaults = crate::config::Config::defaults().queue.retention();
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(store.keys().settings())
        .arg("result_ttl_s")
        .arg("results_maxlen")
        .arg("alerts_maxlen");
    let (ttl_s, results_maxlen, alerts_maxlen): (Option<String>, Option<String>, Option<String>) =
        store.query(&cmd).await?;
    Ok(Retention {
        ttl_s: published(ttl_s).unwrap_or(defaults.ttl_s),
        results_maxlen: published(results_maxlen).unwrap_or(defaults.results_maxlen),
        alerts_maxlen: published(alerts_maxlen).unwrap_or(defaults.alerts_maxlen),
    })
}

/// A value from `{fr}:settings`, when there and readable.
fn published<T: std::str::FromStr>(value: Option<String>) -> Option<T> {
    value.and_then(|v| v.parse().ok())
}

/// Asks a job to stop, in the shard whose job hash holds it, or, when none has one, in shard
/// 0 (an entry of the front door no worker has read yet). A queued job gets its end entry
/// at once (a worker would write it too, on reading the entry).
pub async fn cancel(
    store: &Store,
    job_id: &str,
    retention: Retention,
) -> Result<CancelOutcome, ClientError> {
    let shards = store.queue_shards().await?;
    let shard = shard_holding(store, job_id, shards).await?;
    cancel_in(store, job_id, shard, None, retention).await
}

/// [`cancel`] of the job a user means by `id` ([`find_job`]): a job id, or the entry id
/// `XADD` printed. The job id cancelled, and the outcome.
pub async fn cancel_by_id(
    store: &Store,
    id: &str,
    retention: Retention,
) -> Result<(String, CancelOutcome), ClientError> {
    let found = find_job(store, id).await?;
    // An unread entry without `job_id`: `fr_cancel` finds it by its entry id.
    let entry = (is_entry_id(id) && found.shard.is_none() && found.job_id != id).then_some(id);
    let outcome = cancel_in(store, &found.job_id, found.shard, entry, retention).await?;
    Ok((found.job_id, outcome))
}

async fn cancel_in(
    store: &Store,
    job_id: &str,
    shard: Option<u32>,
    entry: Option<&str>,
    retention: Retention,
) -> Result<CancelOutcome, ClientError> {
    match functions::cancel(&store.shard(shard.unwrap_or(0)), job_id, entry).await {
        Ok(CancelOutcome::Cancelled) => {
            let ended = crate::results::write_end(
                store,
                job_id,
                JobStatus::Cancelled,
                "",
                retention,
                crate::results::OpenAlerts::Possible,
            )
            .await;
            match ended {
                // A user that may not write job keys (the deploy's producer) leaves the end
                // entry to the first worker that reads the job's entry, as after a cancel
                // made with `fr_cancel` alone.
                Err(e) if e.is_permission_denied() => Ok(CancelOutcome::Cancelled),
                Err(e) => Err(e.into()),
                Ok(_) => Ok(CancelOutcome::Cancelled),
            }
        }
        Ok(other) => Ok(other),
        Err(e) if e.code() == Some(NO_JOB) => {
            Err(ClientError::NotFound(format!("no job with id {job_id}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Jobs newest first from the indexes of every queue shard, optionally only those with
/// `status`, each as [`JobView::flat`].
pub async fn list(
    store: &Store,
    status: Option<&str>,
    limit: usize,
) -> Result<Vec<BTreeMap<String, String>>, ClientError> {
    let shards = store.queue_shards().await?;
    let mut cursors: Vec<IndexCursor> = (0..shards).map(IndexCursor::new).collect();
    let mut out = Vec::new();
    while out.len() < limit {
        // The newest head of all shards; of equal times, the lower shard's first.
        let mut newest: Option<(usize, f64)> = None;
        for (i, cursor) in cursors.iter_mut().enumerate() {
            if let Some(score) = cursor.head(store).await?
                && newest.is_none_or(|(_, best)| score > best)
            {
                newest = Some((i, score));
            }
        }
        let Some((i, _)) = newest else { break };
        let Some(job) = cursors[i].page.pop_front() else {
            break;
        };
        if status.is_some_and(|s| job.hash.get("status").map(String::as_str) != Some(s)) {
            continue;
        }
        let view = view_with_progress(store, &job.id, cursors[i].shard, job.hash).await?;
        out.push(view.flat());
    }
    Ok(out)
}

/// A job of a shard's index with its hash.
struct IndexedJob {
    score: f64,
    id: String,
    hash: BTreeMap<String, String>,
}

/// One shard's index (`jobs:index`), read a page at a time, newest first, each page's job
/// hashes with it; ids whose hash has expired are skipped.
struct IndexCursor {
    shard: u32,
    offset: isize,
    done: bool,
    page: VecDeque<IndexedJob>,
}

impl IndexCursor {
    const PAGE: isize = 200;

    fn new(shard: u32) -> Self {
        Self {
            shard,
            offset: 0,
            done: false,
            page: VecDeque::new(),
        }
    }

    /// The score (creation time) of the shard's newest job not yet taken; `None` once the
    /// index is exhausted.
    async fn head(&mut self, store: &Store) -> Result<Option<f64>, StoreError> {
        while self.page.is_empty() && !self.done {
            self.fill(store).await?;
        }
        Ok(self.page.front().map(|j| j.score))
    }

    async fn fill(&mut self, store: &Store) -> Result<(), StoreError> {
        let keys = store.keys().shard(self.shard);
        let mut cmd = redis::cmd("ZREVRANGE");
        cmd.arg(keys.jobs_index())
            .arg(self.offset)
            .arg(self.offset + Self::PAGE - 1)
            .arg("WITHSCORES");
        let ids: Vec<(String, f64)> = store.query(&cmd).await?;
        if ids.is_empty() {
            self.done = true;
            return Ok(());
        }
        self.offset += Self::PAGE;
        // The hashes share the shard's slot and come in one pipeline; each progress hash is
        // in its job's own slot (a Cluster refuses a pipeline across slots), read for listed
        // jobs.
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.cmd("HGETALL").arg(keys.job(id));
        }
        let hashes: Vec<BTreeMap<String, String>> = store.pipe(&pipe).await?;
        self.page.extend(
            ids.into_iter()
                .zip(hashes)
                .filter(|(_, hash)| !hash.is_empty())
                .map(|((id, score), hash)| IndexedJob { score, id, hash }),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_told_from_job_ids() {
        assert!(is_entry_id("1765094462000-0"));
        assert!(!is_entry_id("lobby-1"));
        assert!(!is_entry_id("12-"));
        assert!(!is_entry_id("-3"));
    }

    #[test]
    fn typed_entries_carry_numbers_and_json() {
        let fields: BTreeMap<String, String> = [
            ("frame", "5"),
            ("latency_ms", "61.5"),
            ("model", "clip"),
            ("output", r#"{"detected": ["people"]}"#),
            ("peak_box", "not json"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let v = typed_entry(&fields);
        assert_eq!(v["frame"], 5);
        assert_eq!(v["latency_ms"], 61.5);
        assert_eq!(v["model"], "clip");
        assert_eq!(v["output"]["detected"][0], "people");
        assert_eq!(
            v["peak_box"], "not json",
            "what does not parse stays a string"
        );
    }

    #[test]
    fn a_view_shows_both_hashes_and_the_prompt_mode() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let view = JobView {
            job_id: "j".into(),
            job: map(&[("status", "running"), ("updated_ms", "1")]),
            progress: map(&[("updated_ms", "2"), ("ended", "completed")]),
            results_key: "{fr:j}:results".into(),
            shard: 2,
        };
        let flat = view.flat();
        assert_eq!(flat["updated_ms"], "1");
        assert_eq!(flat["progress_updated_ms"], "2");
        assert_eq!(flat["ended"], "completed");
        assert_eq!(flat["queue_shard"], "2");
        assert_eq!(view.prompt_mode(), PromptMode::FollowsActive);
        let own = JobView {
            job: map(&[("prompt", "cars")]),
            ..view
        };
        assert_eq!(own.prompt_mode(), PromptMode::Own);
    }
}
