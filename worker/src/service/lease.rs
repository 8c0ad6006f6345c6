//! A job's lease in Redis: one worker runs a job at a time. Two deliveries
//! of one message (a redelivery while the first worker still runs it, a
//! duplicate publish) meet here: the second waits for the first to finish
//! or for its lease to expire, renewed while held.

use std::time::{Duration, Instant};

use common::status_store::StatusStore;
use uuid::Uuid;

use super::context::JobContext;
use super::error::JobError;
use super::retry::retry;

/// The job's lease, renewed in the background while held; given back when
/// dropped.
pub struct Lease {
    store: StatusStore,
    id: Uuid,
    holder: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
        let (store, id, holder) = (self.store.clone(), self.id, std::mem::take(&mut self.holder));
        tokio::spawn(async move {
            if let Err(e) = store.release_lease(id, &holder).await {
                tracing::debug!(error = %e, "could not release the lease (it expires by itself)");
            }
        });
    }
}

/// What became of the attempt to take a job's lease.
pub enum Taken {
    Held(Box<Lease>),
    /// The job became terminal while waiting (the other worker finished it).
    Finished,
    /// Another worker holds it, and the caller would not wait.
    Busy(String),
}

/// Takes the job's lease. `wait`: while another worker holds it, wait for
/// it to finish the job or for its lease to expire; else answer `Busy`
/// at once (a job that would join a batch does not hold the batch up).
pub async fn take_lease(ctx: &JobContext, id: Uuid, wait: bool) -> Result<Taken, JobError> {
    let (ttl, backoff) = (ctx.config.lease_ttl, ctx.backoff());
    let holder = ctx.worker_name.clone();
    let waited = Instant::now();
    let mut told = false;
    loop {
        let other = retry(backoff, "taking the job's lease", || {
            ctx.status.acquire_lease(id, &holder, ttl)
        })
        .await?;
        let Some(other) = other else {
            break;
        };
        if !wait {
            return Ok(Taken::Busy(other));
        }
        if !told {
            tracing::info!(holder = %other, "another worker holds this job: waiting for it to finish or its lease to expire");
            told = true;
        }
        if let Ok(Some(s)) = ctx.status.get(id).await {
            if s.state.is_terminal() {
                return Ok(Taken::Finished);
            }
        }
        if waited.elapsed() > ctx.config.job_deadline + ttl {
            return Err(JobError::Transient(format!(
                "{other} has held the job's lease for {:?}",
                waited.elapsed()
            )));
        }
        tokio::time::sleep((ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))).await;
    }
    let renewer = tokio::spawn({
        let (store, holder) = (ctx.status.clone(), holder.clone());
        async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match store.renew_lease(id, &holder, ttl).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!("lost the job's lease to another worker"),
                    Err(e) => tracing::warn!(error = %e, "could not renew the job's lease"),
                }
            }
        }
    });
    Ok(Taken::Held(Box::new(Lease {
        store: ctx.status.clone(),
        id,
        holder,
        renewer,
    })))
}
