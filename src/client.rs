//! The user's operations on the contract, as the CLI performs them: submit, status, results,
//! cancel and listing. They do exactly what `redis-cli` would, so either can be used.

use crate::job::{JobField, JobSpec, JobStatus, SpecError};
use crate::store::functions::{self, CancelOutcome, JOB_EXISTS, NO_JOB, Retention};
use crate::store::{MAX_BLOCK_MS, Store, StoreError};
use std::collections::BTreeMap;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SpecError> for ClientError {
    fn from(e: SpecError) -> Self {
        ClientError::Invalid(e.to_string())
    }
}

/// A job to submit; unset fields are left out of the entry.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    pub stream_ref: String,
    pub prompt: Option<String>,
    pub fps: Option<f64>,
    pub job_id: Option<String>,
    pub max_frames: Option<u64>,
    pub max_duration_s: Option<f64>,
    pub source: Option<String>,
}

/// Validates and queues a job; returns its id. A job_id already known is refused.
pub async fn submit(store: &Store, sub: &Submission) -> Result<String, ClientError> {
    let job_id = sub
        .job_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let fields: Vec<(&str, String)> = [
        (JobField::StreamRef, Some(sub.stream_ref.clone())),
        (JobField::Prompt, sub.prompt.clone()),
        (JobField::Fps, sub.fps.map(|f| f.to_string())),
        (JobField::MaxFrames, sub.max_frames.map(|n| n.to_string())),
        (
            JobField::MaxDurationS,
            sub.max_duration_s.map(|s| s.to_string()),
        ),
        (JobField::Source, sub.source.clone()),
    ]
    .into_iter()
    .filter_map(|(field, value)| Some((field.name(), value?)))
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

    match functions::submit(store, &job_id, &fields).await {
        Ok(_) => Ok(job_id),
        Err(e) if e.code() == Some(JOB_EXISTS) => Err(ClientError::Invalid(
            e.server_message().unwrap_or_else(|| e.to_string()),
        )),
        Err(e) => Err(e.into()),
    }
}

/// A job's hash with its progress (counters, results written) and the key of its result
/// stream, or, for an entry no worker has read yet, what the entry says.
pub async fn status(store: &Store, job_id: &str) -> Result<BTreeMap<String, String>, ClientError> {
    let mut cmd = redis::cmd("HGETALL");
    cmd.arg(store.keys().job(job_id));
    let hash: BTreeMap<String, String> = store.query(&cmd).await?;
    if !hash.is_empty() {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(store.keys().progress(job_id));
        let progress: BTreeMap<String, String> = store.query(&cmd).await?;
        return Ok(with_progress(store, job_id, hash, progress));
    }
    if let Some((entry_id, mut fields)) = find_unread_entry(store, job_id).await? {
        fields.insert("status".into(), "queued".into());
        fields.insert("entry_id".into(), entry_id);
        fields.insert("note".into(), "not yet claimed by a worker".into());
        fields.insert("results_key".into(), store.keys().results(job_id));
        return Ok(fields);
    }
    Err(ClientError::NotFound(format!("no job with id {job_id}")))
}

/// The job hash (queue slot) and the progress hash (job slot) as one view. The hash's
/// status and times win; `ended` is the end entry's status, shown only through `status`.
fn with_progress(
    store: &Store,
    job_id: &str,
    mut hash: BTreeMap<String, String>,
    progress: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    for (k, v) in progress {
        if k != "ended" && k != "updated_ms" {
            hash.entry(k).or_insert(v);
        }
    }
    hash.insert("results_key".into(), store.keys().results(job_id));
    hash
}

/// Looks for an entry with this job_id still in the queue.
async fn find_unread_entry(
    store: &Store,
    job_id: &str,
) -> Result<Option<(String, BTreeMap<String, String>)>, StoreError> {
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
        if let Some(found) = batch
            .into_iter()
            .find(|(_, f)| f.get(JobField::JobId.name()).map(String::as_str) == Some(job_id))
        {
            return Ok(Some(found));
        }
    }
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

/// Asks a job to stop. A queued job gets its end entry at once (a worker would write it too,
/// on reading the entry).
pub async fn cancel(
    store: &Store,
    job_id: &str,
    retention: Retention,
) -> Result<CancelOutcome, ClientError> {
    match functions::cancel(store, job_id).await {
        Ok(CancelOutcome::Cancelled) => {
            crate::results::write_end(
                store,
                job_id,
                JobStatus::Cancelled,
                "",
                retention,
                crate::results::OpenAlerts::Possible,
            )
            .await?;
            Ok(CancelOutcome::Cancelled)
        }
        Ok(other) => Ok(other),
        Err(e) if e.code() == Some(NO_JOB) => {
            Err(ClientError::NotFound(format!("no job with id {job_id}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Jobs newest first from the index, optionally only those with `status`.
pub async fn list(
    store: &Store,
    status: Option<&str>,
    limit: usize,
) -> Result<Vec<BTreeMap<String, String>>, ClientError> {
    let mut out = Vec::new();
    let mut offset = 0isize;
    const PAGE: isize = 200;
    while out.len() < limit {
        let mut cmd = redis::cmd("ZREVRANGE");
        cmd.arg(store.keys().jobs_index())
            .arg(offset)
            .arg(offset + PAGE - 1);
        let ids: Vec<String> = store.query(&cmd).await?;
        if ids.is_empty() {
            break;
        }
        offset += PAGE;
        // The hashes share one slot and come in one pipeline; each progress hash is in its
        // job's own slot (a Cluster refuses a pipeline across slots), read for listed jobs.
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(store.keys().job(id));
        }
        let hashes: Vec<BTreeMap<String, String>> = store.pipe(&pipe).await?;
        for (id, h) in ids.into_iter().zip(hashes) {
            if h.is_empty() {
                continue;
            }
            if status.is_some_and(|s| h.get("status").map(String::as_str) != Some(s)) {
                continue;
            }
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(store.keys().progress(&id));
            let progress: BTreeMap<String, String> = store.query(&cmd).await?;
            let mut h = with_progress(store, &id, h, progress);
            h.insert("job_id".into(), id);
            out.push(h);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}
