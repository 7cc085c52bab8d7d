//! The active prompt: `{fr}:prompt` (text, version, updated_ms) and its history, changed only
//! through the `fr_prompt_*` functions. Workers follow it with a poll that feeds a watch
//! channel, so a new version reaches every running job by its next batch.

use crate::prompt::PromptRef;
use crate::store::{Backoff, Store, StoreResult};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a worker looks for a new prompt version.
pub const PROMPT_POLL: Duration = Duration::from_millis(250);

/// The active prompt as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ActivePrompt {
    pub text: String,
    pub version: u64,
    pub updated_ms: i64,
}

/// One version in the history, as `fr_prompt_set` wrote it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromptVersion {
    pub version: u64,
    pub text: String,
    pub updated_ms: i64,
}

/// Sets the active prompt; returns the new version.
pub async fn set(store: &Store, text: &str, preserve_previous: bool) -> StoreResult<u64> {
    store
        .fcall(
            "fr_prompt_set",
            &[&text, &(if preserve_previous { "1" } else { "0" })],
        )
        .await
}

/// The active prompt, or `None` when none was ever set.
pub async fn get(store: &Store) -> StoreResult<Option<ActivePrompt>> {
    let v: Option<(String, u64, i64)> = store.fcall("fr_prompt_get", &[]).await?;
    Ok(v.map(|(text, version, updated_ms)| ActivePrompt {
        text,
        version,
        updated_ms,
    }))
}

/// The history, newest first; `count` 0 means all of it.
pub async fn history(store: &Store, count: usize) -> StoreResult<Vec<PromptVersion>> {
    let raw: Vec<String> = store.fcall("fr_prompt_history", &[&count]).await?;
    Ok(raw
        .iter()
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect())
}

/// The prompt live jobs use while none was ever set: `DEFAULT_PROMPT`, as version 0.
pub fn default_ref(default_text: &str) -> PromptRef {
    PromptRef {
        text: Arc::from(default_text),
        version: Some(0),
    }
}

/// Polls the active prompt until `shutdown`, publishing each new version. Redis errors are
/// logged and retried; the last known prompt stays in force meanwhile.
pub async fn follow(
    store: Store,
    default_text: String,
    tx: watch::Sender<PromptRef>,
    shutdown: CancellationToken,
) {
    let key = store.keys().prompt();
    let mut backoff = Backoff::new(PROMPT_POLL, Duration::from_secs(5));
    loop {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key).arg("version").arg("text");
        let delay = match store.query::<(Option<u64>, Option<String>)>(&cmd).await {
            Ok((version, text)) => {
                backoff.reset();
                let next = match (version, text) {
                    (Some(v), Some(t)) => PromptRef {
                        text: Arc::from(t),
                        version: Some(v),
                    },
                    _ => default_ref(&default_text),
                };
                tx.send_if_modified(|current| {
                    if current.version != next.version || current.text != next.text {
                        tracing::info!(version = ?next.version, "active prompt changed");
                        *current = next;
                        true
                    } else {
                        false
                    }
                });
                PROMPT_POLL
            }
            Err(e) => {
                tracing::debug!(error = %e, "prompt poll failed");
                backoff.next_delay()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
