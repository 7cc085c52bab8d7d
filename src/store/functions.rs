//! The Rust side of the `freeroam` function library (`functions.lua`): one typed call per
//! function, and every reply parsed here, once, into an enum. Errors the functions raise on
//! purpose carry their own codes ([`JOB_EXISTS`], [`NO_JOB`]); callers match the code, never
//! the text.

use crate::job::JobStatus;
use crate::store::{Store, StoreError, StoreResult, ToRedisArgsDyn};
use redis::Value;

/// The error code of `fr_submit` for a job_id that is already known.
pub const JOB_EXISTS: &str = "JOBEXISTS";
/// The error code of `fr_cancel` for a job id no hash and no entry knows.
pub const NO_JOB: &str = "NOJOB";

/// Why a job is final in the queue's slot while its entry is still pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalWhy {
    /// It had ended before this delivery.
    Finished,
    Cancelled,
    Dead,
    /// A malformed entry (`fr_job_reject`).
    Failed,
}

/// What `fr_job_claim` and `fr_job_reject` decided.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimVerdict {
    Run {
        attempt: u32,
    },
    /// Final in the queue's slot: the end entry and the ack are still to do.
    Final {
        why: FinalWhy,
        status: JobStatus,
        error: String,
        /// Deliveries counted, for a dead-lettered job.
        attempts: Option<u32>,
    },
    /// The job_id belongs to another entry; this one was dropped.
    Duplicate,
    /// Another worker owns the entry now.
    Lost,
    /// The entry is no longer pending.
    Gone,
    /// A reply this version does not know (a newer library on the server?).
    Unknown(Vec<String>),
}

/// What the functions that act on an entry this worker owns answer (`fr_job_finish`,
/// `fr_job_ack`, `fr_job_handback`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Done (or found already done by this worker: each of them is safe to repeat).
    Done,
    /// Another worker owns the entry now; nothing was changed.
    Lost,
}

/// What `fr_job_heartbeat` says about one running job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    Renewed,
    /// Someone else owns the entry: stop, do not steal it back.
    Lost,
    /// `fr_cancel` asked for the job to stop.
    Cancel,
}

/// What `fr_cancel` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// A queued job, cancelled at once; its end entry is still to write.
    Cancelled,
    /// A running job, flagged; its worker stops it within a second.
    Cancelling,
    /// The job had ended already, with this status.
    Already(JobStatus),
}

impl std::fmt::Display for CancelOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelOutcome::Cancelled => f.write_str("cancelled"),
            CancelOutcome::Cancelling => f.write_str("cancelling"),
            CancelOutcome::Already(s) => write!(f, "already {}", s.as_str()),
        }
    }
}

/// A job's end entry as recorded by `fr_job_end` (perhaps by an earlier call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndRecord {
    pub status: JobStatus,
    pub results: u64,
}

/// A reply that does not have the shape the contract gives it.
fn unexpected(function: &str, reply: &Value) -> StoreError {
    StoreError::Reply(format!("{function}: unexpected reply {reply:?}"))
}

/// The strings of a reply: an array's items, or a lone status as one item.
fn words(reply: Value) -> Vec<String> {
    match reply {
        Value::Array(_) => redis::from_redis_value(reply).unwrap_or_default(),
        other => redis::from_redis_value::<String>(other)
            .map(|s| vec![s])
            .unwrap_or_default(),
    }
}

impl ClaimVerdict {
    /// Reads a reply of `fr_job_claim` or `fr_job_reject`.
    pub fn from_reply(reply: Value) -> Self {
        let parts = words(reply);
        let field = |i: usize| parts.get(i).cloned().unwrap_or_default();
        let why = match parts.first().map(String::as_str) {
            Some("run") => {
                return match field(1).parse() {
                    Ok(attempt) => ClaimVerdict::Run { attempt },
                    Err(_) => ClaimVerdict::Unknown(parts),
                };
            }
            Some("duplicate") => return ClaimVerdict::Duplicate,
            Some("lost") => return ClaimVerdict::Lost,
            Some("gone") => return ClaimVerdict::Gone,
            Some("finished") => FinalWhy::Finished,
            Some("cancelled") => FinalWhy::Cancelled,
            Some("dead") => FinalWhy::Dead,
            Some("failed") => FinalWhy::Failed,
            _ => return ClaimVerdict::Unknown(parts),
        };
        match JobStatus::parse(&field(1)) {
            Some(status) if status.is_terminal() => ClaimVerdict::Final {
                why,
                status,
                error: field(2),
                attempts: field(3).parse().ok(),
            },
            _ => ClaimVerdict::Unknown(parts),
        }
    }
}

pub(crate) fn ownership(function: &str, reply: Value) -> StoreResult<Ownership> {
    match &reply {
        Value::SimpleString(s) if s == "ok" => Ok(Ownership::Done),
        Value::SimpleString(s) if s == "lost" => Ok(Ownership::Lost),
        Value::BulkString(b) if b == b"ok" => Ok(Ownership::Done),
        Value::BulkString(b) if b == b"lost" => Ok(Ownership::Lost),
        _ => Err(unexpected(function, &reply)),
    }
}

fn lease(word: &str) -> Option<Lease> {
    match word {
        "ok" => Some(Lease::Renewed),
        "lost" => Some(Lease::Lost),
        "cancel" => Some(Lease::Cancel),
        _ => None,
    }
}

fn cancel_outcome(word: &str) -> Option<CancelOutcome> {
    match word {
        "cancelled" => Some(CancelOutcome::Cancelled),
        "cancelling" => Some(CancelOutcome::Cancelling),
        other => other
            .strip_prefix("already ")
            .and_then(JobStatus::parse)
            .map(CancelOutcome::Already),
    }
}

pub(crate) fn end_record(reply: Value) -> StoreResult<EndRecord> {
    let parsed: Option<(String, u64)> = redis::from_redis_value(reply.clone()).ok();
    match parsed {
        Some((status, results)) => match JobStatus::parse(&status) {
            Some(status) if status.is_terminal() => Ok(EndRecord { status, results }),
            _ => Err(unexpected("fr_job_end", &reply)),
        },
        None => Err(unexpected("fr_job_end", &reply)),
    }
}

/// One entry for [`claim`]: `fields` are the hash fields of the spec as this worker read it.
#[derive(Clone, Copy, Debug)]
pub struct ClaimEntry<'a> {
    pub entry_id: &'a str,
    pub job_id: &'a str,
    pub fields: &'a [(&'static str, String)],
}

/// `fr_job_claim`: asks whether this worker runs the entries it received, in the order it
/// read them, in one call; one verdict per entry, in order.
pub async fn claim(
    store: &Store,
    worker: &str,
    max_attempts: u32,
    entries: &[ClaimEntry<'_>],
) -> StoreResult<Vec<ClaimVerdict>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let counts: Vec<usize> = entries.iter().map(|e| e.fields.len() * 2).collect();
    let mut args: Vec<&dyn ToRedisArgsDyn> = vec![&worker, &max_attempts];
    for (e, n) in entries.iter().zip(&counts) {
        args.push(&e.entry_id);
        args.push(&e.job_id);
        args.push(n);
        for (k, v) in e.fields {
            args.push(k);
            args.push(v);
        }
    }
    let reply: Value = store.fcall("fr_job_claim", &args).await?;
    match reply {
        Value::Array(items) if items.len() == entries.len() => {
            Ok(items.into_iter().map(ClaimVerdict::from_reply).collect())
        }
        other => Err(unexpected("fr_job_claim", &other)),
    }
}

/// `fr_job_reject`: ends a malformed entry's job as failed with `error`.
pub async fn reject(
    store: &Store,
    entry_id: &str,
    worker: &str,
    job_id: &str,
    error: &str,
    fields: &[(String, String)],
) -> StoreResult<ClaimVerdict> {
    let mut args: Vec<&dyn ToRedisArgsDyn> = vec![&entry_id, &worker, &job_id, &error];
    for (k, v) in fields {
        args.push(k);
        args.push(v);
    }
    let reply: Value = store.fcall("fr_job_reject", &args).await?;
    Ok(ClaimVerdict::from_reply(reply))
}

/// How a worker calls in to the fleet's clock (`fleet_call_in` in functions.lua): after a
/// gap longer than `quiet_ms` in which no worker called in (a server outage, or no worker
/// running), for `lease_ms` only entries idle for longer than the gap plus a lease are
/// reclaimed.
#[derive(Clone, Copy, Debug)]
pub struct CallIn {
    pub quiet_ms: u64,
    pub lease_ms: u64,
}

/// What `fr_worker_tick` answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// The worker was not registered: its first tick, or it had been declared dead (its
    /// entries orphaned). Each job it runs must then be checked with [`heartbeat`].
    pub registered: bool,
    /// Jobs `fr_cancel` asked this worker to stop.
    pub cancelled: Vec<String>,
    /// A reclaim pass would find something now (an overdue worker, an orphan, the fleet's
    /// sweep or consumer prune due); otherwise the worker skips its pass.
    pub reclaim_due: bool,
    /// This tick created the registry hash (it had expired or was lost): a tick that sent
    /// only the fields that changed must send them all next.
    pub hash_created: bool,
    /// This worker holds the fleet's sweeper role: it ticks every heartbeat, so that overdue
    /// workers are found within a second of their deadline; the others tick less often.
    pub sweeper: bool,
}

/// `fr_worker_tick`: renews this worker's one lease, whatever it runs, and writes its
/// registry hash (`registry`: the fields to write and their values; the function adds
/// `updated_ms`, and renews the hash's expiry when given fields or when it creates it).
/// `sweeper_hold_ms`: how long the sweeper role stays this worker's after this tick, if it
/// gets or keeps it (the role goes to whoever ticks first after it lapsed).
pub async fn tick(
    store: &Store,
    worker: &str,
    call_in: CallIn,
    sweeper_hold_ms: u64,
    registry: &[(&str, String)],
) -> StoreResult<Tick> {
    let mut args: Vec<&dyn ToRedisArgsDyn> = vec![
        &worker,
        &call_in.quiet_ms,
        &call_in.lease_ms,
        &"sweep",
        &sweeper_hold_ms,
    ];
    for (k, v) in registry {
        args.push(k);
        args.push(v);
    }
    let reply: Value = store.fcall("fr_worker_tick", &args).await?;
    tick_reply(reply)
}

/// Reads `fr_worker_tick`'s reply to a tick that asks `sweep`:
/// `{0 or 1, {job_id, ...}, 0 or 1, 0 or 1, 0 or 1}`.
pub(crate) fn tick_reply(reply: Value) -> StoreResult<Tick> {
    let parsed: Option<(i64, Vec<String>, i64, i64, i64)> =
        redis::from_redis_value(reply.clone()).ok();
    let flag = |v: i64| matches!(v, 0 | 1).then_some(v == 1);
    let Some((added, cancelled, due, created, sweeper)) = parsed else {
        return Err(unexpected("fr_worker_tick", &reply));
    };
    match (flag(added), flag(due), flag(created), flag(sweeper)) {
        (Some(registered), Some(reclaim_due), Some(hash_created), Some(sweeper)) => Ok(Tick {
            registered,
            cancelled,
            reclaim_due,
            hash_created,
            sweeper,
        }),
        _ => Err(unexpected("fr_worker_tick", &reply)),
    }
}

/// `fr_job_heartbeat`: checks each of `jobs` (entry id, job id) entry by entry and renews
/// its idle time, one answer each. [`tick`] is the lease; this is its rare audit.
pub async fn heartbeat(
    store: &Store,
    worker: &str,
    call_in: CallIn,
    jobs: &[(&str, &str)],
) -> StoreResult<Vec<Lease>> {
    let mut args: Vec<&dyn ToRedisArgsDyn> = vec![&worker, &call_in.quiet_ms, &call_in.lease_ms];
    for (entry_id, job_id) in jobs {
        args.push(entry_id);
        args.push(job_id);
    }
    let reply: Value = store.fcall("fr_job_heartbeat", &args).await?;
    leases(reply, jobs.len())
}

/// `fr_job_reclaim`: takes over up to `count` entries whose owner is gone (declared dead
/// when its tick is a lease overdue, handed back, or never registered; later just after a
/// silence of the fleet: see [`CallIn`]), as XCLAIM returns them.
pub async fn reclaim(
    store: &Store,
    worker: &str,
    call_in: CallIn,
    count: usize,
) -> StoreResult<Value> {
    store
        .fcall(
            "fr_job_reclaim",
            &[&worker, &call_in.quiet_ms, &call_in.lease_ms, &count],
        )
        .await
}

/// Reads `fr_job_heartbeat`'s reply: exactly one lease word per job asked about.
pub(crate) fn leases(reply: Value, jobs: usize) -> StoreResult<Vec<Lease>> {
    let answers = words(reply.clone());
    let leases: Option<Vec<Lease>> = answers.iter().map(|w| lease(w)).collect();
    match leases {
        Some(l) if l.len() == jobs => Ok(l),
        _ => Err(unexpected("fr_job_heartbeat", &reply)),
    }
}

/// One job for [`finish`].
#[derive(Clone, Debug)]
pub struct FinishEntry {
    pub entry_id: String,
    pub job_id: String,
    pub status: JobStatus,
    pub error: String,
}

/// `fr_job_finish`: the final status, the event, the ack and delete of jobs this worker
/// owns, in one call; one answer per job, in order.
pub async fn finish(
    store: &Store,
    worker: &str,
    jobs: &[FinishEntry],
) -> StoreResult<Vec<Ownership>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let statuses: Vec<&str> = jobs.iter().map(|j| j.status.as_str()).collect();
    let mut args: Vec<&dyn ToRedisArgsDyn> = vec![&worker];
    for (j, status) in jobs.iter().zip(&statuses) {
        args.push(&j.entry_id);
        args.push(&j.job_id);
        args.push(status);
        args.push(&j.error);
    }
    let reply: Value = store.fcall("fr_job_finish", &args).await?;
    match reply {
        Value::Array(items) if items.len() == jobs.len() => items
            .into_iter()
            .map(|v| ownership("fr_job_finish", v))
            .collect(),
        other => Err(unexpected("fr_job_finish", &other)),
    }
}

/// `fr_job_ack`: drops the entry of a job that is final.
pub async fn ack(store: &Store, entry_id: &str, worker: &str) -> StoreResult<Ownership> {
    let args: [&dyn ToRedisArgsDyn; 2] = [&entry_id, &worker];
    ownership("fr_job_ack", store.fcall("fr_job_ack", &args).await?)
}

/// `fr_job_handback`: gives a running job back for another worker to take at once; an
/// empty `job_id` gives back an entry read but never claimed.
pub async fn handback(
    store: &Store,
    entry_id: &str,
    worker: &str,
    job_id: &str,
    idle_ms: u64,
) -> StoreResult<Ownership> {
    let args: [&dyn ToRedisArgsDyn; 4] = [&entry_id, &worker, &job_id, &idle_ms];
    ownership(
        "fr_job_handback",
        store.fcall("fr_job_handback", &args).await?,
    )
}

/// How long a finished job's keys are kept, and how long its result stream may grow.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub results_maxlen: usize,
    pub ttl_s: u64,
    /// ALERTS_MAXLEN, for the `end` events of the alerts a job's end closes
    /// ([`crate::results::write_end`]).
    pub alerts_maxlen: usize,
}

/// `fr_job_end`, in the job's own slot: writes the end entry unless one is there, and
/// returns what is recorded, which may be an earlier call's.
pub async fn end(
    store: &Store,
    job_id: &str,
    status: JobStatus,
    error: &str,
    retention: Retention,
) -> StoreResult<EndRecord> {
    let tag = store.keys().job_tag(job_id);
    let args: [&dyn ToRedisArgsDyn; 4] = [
        &status.as_str(),
        &error,
        &retention.results_maxlen,
        &retention.ttl_s,
    ];
    end_record(store.fcall_on(&tag, "fr_job_end", &args).await?)
}

/// `fr_submit`: queues a job under `job_id` with the entry's `fields`; returns the entry id.
/// A known job_id fails with the code [`JOB_EXISTS`].
pub async fn submit(store: &Store, job_id: &str, fields: &[(&str, String)]) -> StoreResult<String> {
    let mut args: Vec<&dyn ToRedisArgsDyn> = vec![&job_id];
    for (k, v) in fields {
        args.push(k);
        args.push(v);
    }
    store.fcall("fr_submit", &args).await
}

/// `fr_cancel`; `entry`, the id of an unread entry without `job_id` that is the job (its id
/// derived as workers derive it). An unknown job fails with the code [`NO_JOB`].
pub async fn cancel(
    store: &Store,
    job_id: &str,
    entry: Option<&str>,
) -> StoreResult<CancelOutcome> {
    let reply = match entry {
        Some(entry) => store.fcall("fr_cancel", &[&job_id, &entry]).await?,
        None => store.fcall("fr_cancel", &[&job_id]).await?,
    };
    cancel_reply(reply)
}

/// Reads `fr_cancel`'s reply: one word.
pub(crate) fn cancel_reply(reply: Value) -> StoreResult<CancelOutcome> {
    let word: Option<String> = redis::from_redis_value(reply.clone()).ok();
    word.as_deref()
        .and_then(cancel_outcome)
        .ok_or_else(|| unexpected("fr_cancel", &reply))
}

/// `fr_index_prune`: drops up to `limit` index members whose job hash has expired.
pub async fn prune_index(store: &Store, limit: usize) -> StoreResult<u64> {
    store.fcall("fr_index_prune", &[&limit]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(parts: &[&str]) -> Value {
        Value::Array(
            parts
                .iter()
                .map(|p| Value::BulkString(p.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn claim_replies_become_verdicts() {
        assert_eq!(
            ClaimVerdict::from_reply(Value::Array(vec![
                Value::BulkString(b"run".to_vec()),
                Value::Int(2)
            ])),
            ClaimVerdict::Run { attempt: 2 }
        );
        assert_eq!(
            ClaimVerdict::from_reply(reply(&["dead", "dead", "too often", "3"])),
            ClaimVerdict::Final {
                why: FinalWhy::Dead,
                status: JobStatus::Dead,
                error: "too often".into(),
                attempts: Some(3),
            }
        );
        assert_eq!(
            ClaimVerdict::from_reply(reply(&["finished", "completed", "", ""])),
            ClaimVerdict::Final {
                why: FinalWhy::Finished,
                status: JobStatus::Completed,
                error: String::new(),
                attempts: None,
            }
        );
        assert_eq!(
            ClaimVerdict::from_reply(Value::SimpleString("duplicate".into())),
            ClaimVerdict::Duplicate
        );
        assert_eq!(
            ClaimVerdict::from_reply(reply(&["gone"])),
            ClaimVerdict::Gone
        );
        // A final verdict must carry a final status; anything else is not understood.
        assert!(matches!(
            ClaimVerdict::from_reply(reply(&["finished", "running", "", ""])),
            ClaimVerdict::Unknown(_)
        ));
        assert!(matches!(
            ClaimVerdict::from_reply(reply(&["run", "x"])),
            ClaimVerdict::Unknown(_)
        ));
    }

    #[test]
    fn short_replies_become_enums_and_anything_else_an_error() {
        assert_eq!(
            ownership("f", Value::BulkString(b"ok".to_vec())).unwrap(),
            Ownership::Done
        );
        assert_eq!(
            ownership("f", Value::SimpleString("lost".into())).unwrap(),
            Ownership::Lost
        );
        assert!(ownership("f", Value::SimpleString("maybe".into())).is_err());
        assert_eq!(lease("cancel"), Some(Lease::Cancel));
        assert_eq!(lease("?"), None);
        assert_eq!(
            cancel_outcome("already completed"),
            Some(CancelOutcome::Already(JobStatus::Completed))
        );
        assert_eq!(cancel_outcome("already nothing"), None);
        assert_eq!(
            CancelOutcome::Already(JobStatus::Dead).to_string(),
            "already dead"
        );
        assert_eq!(
            end_record(Value::Array(vec![
                Value::BulkString(b"failed".to_vec()),
                Value::BulkString(b"7".to_vec())
            ]))
            .unwrap(),
            EndRecord {
                status: JobStatus::Failed,
                results: 7
            }
        );
        assert!(end_record(reply(&["running", "1"])).is_err());
        let tick = |added, ids: &[&str], due, created, sweeper| {
            Value::Array(vec![
                Value::Int(added),
                reply(ids),
                Value::Int(due),
                Value::Int(created),
                Value::Int(sweeper),
            ])
        };
        assert_eq!(
            tick_reply(tick(1, &["a", "b"], 0, 1, 1)).unwrap(),
            Tick {
                registered: true,
                cancelled: vec!["a".into(), "b".into()],
                reclaim_due: false,
                hash_created: true,
                sweeper: true,
            }
        );
        let quiet = tick_reply(tick(0, &[], 1, 0, 0)).unwrap();
        assert!(!quiet.registered && quiet.reclaim_due && !quiet.hash_created && !quiet.sweeper);
        // The shorter replies are ticks that did not ask `sweep`: not this worker's.
        assert!(tick_reply(Value::Array(vec![Value::Int(0), reply(&[])])).is_err());
        let due_only = Value::Array(vec![
            Value::Int(0),
            reply(&[]),
            Value::Int(1),
            Value::Int(0),
        ]);
        assert!(tick_reply(due_only).is_err());
        assert!(tick_reply(tick(0, &[], 2, 0, 0)).is_err());
        assert!(tick_reply(tick(0, &[], 0, 0, 2)).is_err());
        assert!(tick_reply(tick(2, &[], 0, 0, 0)).is_err());
    }
}
