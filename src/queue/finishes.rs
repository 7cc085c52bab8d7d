//! Coalesces the `fr_job_finish` calls of jobs that end at about the same moment into one
//! function call. A job that ends alone is sent at once; jobs that end while a call is in
//! flight go together in the next one, so a burst of ends costs one request and one
//! call's overhead instead of one each.

use crate::store::functions::{self, FinishEntry, Ownership};
use crate::store::{Store, StoreResult};
use tokio::sync::{mpsc, oneshot};

/// Most jobs one call ends: bounds the call's run time on the server.
const MAX_BATCH: usize = 64;

type Request = (FinishEntry, oneshot::Sender<StoreResult<Ownership>>);

pub(crate) struct Finisher {
    store: Store,
    worker: String,
    /// To the loop that sends the queued ends; `None` when made outside a Tokio runtime.
    tx: Option<mpsc::UnboundedSender<Request>>,
}

impl Finisher {
    /// Starts the sending loop on the current Tokio runtime, if there is one.
    pub(crate) fn new(store: Store, worker: String) -> Self {
        let tx = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(send_loop(rx, store.clone(), worker.clone()));
            tx
        });
        Self { store, worker, tx }
    }

    /// Ends one job, in the next call that goes out. Safe to repeat, as `fr_job_finish` is.
    pub(crate) async fn finish(&self, job: FinishEntry) -> StoreResult<Ownership> {
        if let Some(tx) = &self.tx {
            let (reply, answer) = oneshot::channel();
            if tx.send((job.clone(), reply)).is_ok()
                && let Ok(result) = answer.await
            {
                return result;
            }
        }
        // No loop (made outside a runtime, or its runtime is going away): alone.
        let answers =
            functions::finish(&self.store, &self.worker, std::slice::from_ref(&job)).await?;
        Ok(answers[0])
    }
}

/// Sends what is queued, up to [`MAX_BATCH`] ends a call, until every sender is gone.
async fn send_loop(mut rx: mpsc::UnboundedReceiver<Request>, store: Store, worker: String) {
    let mut batch: Vec<Request> = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (jobs, replies): (Vec<FinishEntry>, Vec<_>) = batch.drain(..).unzip();
        match functions::finish(&store, &worker, &jobs).await {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
