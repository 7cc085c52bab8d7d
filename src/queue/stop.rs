//! How the queue tells a running job to stop at its next frame boundary, and why.

use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Why a running job was told to stop before it finished on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A user called `fr_cancel`: the job ends `cancelled`.
    Cancelled,
    /// The worker is shutting down: the job is handed back to the queue.
    Shutdown,
    /// Another worker now owns the entry: this one leaves it alone.
    LeaseLost,
}

/// Tells a job body to stop at the next frame boundary, and why.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the body to stop. The first reason given wins.
    pub fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(reason);
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once a stop was asked for: select on it around every wait.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signal_keeps_the_first_reason() {
        let s = StopSignal::new();
        assert!(!s.is_stopped());
        s.stop(StopReason::Cancelled);
        s.stop(StopReason::Shutdown);
        assert!(s.is_stopped());
        assert_eq!(s.reason(), Some(StopReason::Cancelled));
    }
}
