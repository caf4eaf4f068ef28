//! The background tasks of `tollgate serve`: each one named, spawned on the background runtime
//! through [`Tasks`], told to stop by one watch channel and awaited on shutdown, so none is left
//! running (or silently dead) when the process exits. `server.rs` lists them.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long shutdown waits for one task to return after the stop signal.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Owns the running background tasks.
pub struct Tasks {
    runtime: tokio::runtime::Handle,
    stop: watch::Sender<bool>,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    pub fn new(runtime: tokio::runtime::Handle) -> Tasks {
        Tasks {
            runtime,
            stop: watch::channel(false).0,
            running: Vec::new(),
        }
    }

    /// Starts `task(stop)` under `name`; the task returns when `stop` changes.
    pub fn spawn<F>(&mut self, name: &'static str, task: impl FnOnce(watch::Receiver<bool>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.runtime.spawn(task(self.stop.subscribe()));
        self.running.push((name, handle));
    }

    /// The names of the running tasks, in start order.
    pub fn names(&self) -> Vec<&'static str> {
        self.running.iter().map(|(n, _)| *n).collect()
    }

    /// Signals every task to stop and waits for each (up to 5 s apiece); a task that panicked
    /// or does not stop is logged by name.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for (name, handle) in self.running {
            match tokio::time::timeout(STOP_WAIT, handle).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "background task failed"),
                Err(_) => tracing::warn!(
                    task = name,
                    "background task did not stop in time; abandoned"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn every_task_is_stopped_and_awaited() {
        let stopped = Arc::new(AtomicUsize::new(0));
        let mut tasks = Tasks::new(tokio::runtime::Handle::current());
        for name in ["a", "b"] {
            let stopped = stopped.clone();
            tasks.spawn(name, |mut stop| async move {
                let _ = stop.changed().await;
                stopped.fetch_add(1, Ordering::SeqCst);
            });
        }
        // One task ignores the signal: shutdown gives up on it after the wait, without hanging.
        tasks.spawn("stuck", |_stop| std::future::pending());
        assert_eq!(tasks.names(), ["a", "b", "stuck"]);
        tasks.shutdown().await;
        assert_eq!(stopped.load(Ordering::SeqCst), 2);
    }
}
