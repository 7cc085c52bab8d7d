//! Whether the server a remote model calls is answering (pure): the model records each
//! frame's final outcome, the queue stops claiming while it is down, and `/health/ready`
//! reports it. Its own module, so that the queue and the health endpoint need not import
//! the model.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether the server a remote model calls is answering: the model records each frame's
/// final outcome, `/health/ready` reads it.
#[derive(Debug, Default)]
pub struct BackendHealth {
    consecutive_failures: AtomicU32,
    last_error: Mutex<Option<String>>,
}

impl BackendHealth {
    /// Frames that must fail in a row (after their retries) for the backend to count as down.
    pub const DOWN_AFTER_FAILURES: u32 = 3;

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    pub fn record_failure(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// `None` while the backend answers; the last error once `DOWN_AFTER_FAILURES` frames in
    /// a row have failed, until one succeeds.
    pub fn down(&self) -> Option<String> {
        if self.consecutive_failures.load(Ordering::Relaxed) < Self::DOWN_AFTER_FAILURES {
            return None;
        }
        Some(
            self.last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default(),
        )
    }
}
