//! Idempotent lifecycle jobs: a repeated `job_id` gets the first outcome and the job does not run
//! twice, also when the repeat arrives while the first run is still going.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use hearth_messages::{JobId, JobOutput, WireError};
use parking_lot::Mutex;
use tokio::sync::OnceCell;

/// A job's outcome, shared between the first run and its repeats.
pub(crate) type Outcome = Result<JobOutput, WireError>;

/// Remembers the outcome of the most recent jobs.
#[derive(Debug)]
pub(crate) struct JobCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    entries: HashMap<JobId, Arc<OnceCell<Outcome>>>,
    order: VecDeque<JobId>,
}

impl JobCache {
    /// A cache of the last `capacity` jobs.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(CacheInner::default()),
            capacity,
        }
    }

    /// The cell for `job_id`: the first caller runs the job through it (`get_or_init`), the others
    /// wait for and share that outcome.
    pub(crate) fn cell(&self, job_id: &JobId) -> Arc<OnceCell<Outcome>> {
        let mut inner = self.inner.lock();
        if let Some(cell) = inner.entries.get(job_id) {
            return cell.clone();
        }
        let cell = Arc::new(OnceCell::new());
        inner.entries.insert(job_id.clone(), cell.clone());
        inner.order.push_back(job_id.clone());
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.entries.remove(&old);
            }
        }
        cell
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_repeated_job_runs_once_even_when_concurrent() {
        let cache = Arc::new(JobCache::new(16));
        let runs = Arc::new(AtomicU32::new(0));
        let id = JobId::new("j1").unwrap();
        let mut handles = Vec::new();
        for _ in 0..8 {
            let (cache, runs, id) = (cache.clone(), runs.clone(), id.clone());
            handles.push(tokio::spawn(async move {
                cache
                    .cell(&id)
                    .get_or_init(|| async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(JobOutput::Done {})
                    })
                    .await
                    .clone()
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap(), Ok(JobOutput::Done {}));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn old_entries_are_evicted() {
        let cache = JobCache::new(2);
        for i in 0..5 {
            cache.cell(&JobId::new(format!("j{i}")).unwrap());
        }
        assert_eq!(cache.inner.lock().entries.len(), 2);
    }
}
