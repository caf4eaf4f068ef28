//! Start and stop: the in-flight request count, and graceful shutdown on SIGTERM
//! or Ctrl-C (stop accepting, let in-flight requests finish within the grace period, then run the
//! shutdown steps once and exit 0).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};

type Step = Box<dyn FnOnce() + Send>;

/// In-flight requests and the one-time shutdown sequence.
#[derive(Default)]
pub struct Drain {
    in_flight: AtomicUsize,
    stopping: AtomicBool,
    finish: Mutex<Option<Step>>,
}

/// Held by a request's context; the request counts as in flight until it is dropped.
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drain {
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// What to run once when the process stops (flushing, closing the database).
    pub fn on_finish(&self, step: impl FnOnce() + Send + 'static) {
        if let Ok(mut f) = self.finish.lock() {
            *f = Some(Box::new(step));
        }
    }

    /// Runs the shutdown steps if nobody has yet. A second caller (the drain watcher and the main
    /// thread can both get here) waits until the first has finished, so the process never exits
    /// in the middle of the final flush.
    pub fn finish(&self) {
        let Ok(mut slot) = self.finish.lock() else {
            return;
        };
        if let Some(step) = slot.take() {
            step();
        }
    }

    /// After the stop signal: exit as soon as no request is in flight, rather than always sitting
    /// out pingora's whole grace period. pingora itself stops the runtimes when the grace ends.
    fn start_draining(self: &Arc<Self>, grace: Duration) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let drain = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tollgate-drain".into())
            .spawn(move || {
                let deadline = Instant::now() + grace;
                // Give the listeners a moment to close so nothing new slips in after the count hits 0.
                std::thread::sleep(Duration::from_millis(100));
                while drain.in_flight() > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if drain.in_flight() == 0 {
                    tracing::info!("all in-flight requests finished; shutting down");
                    drain.finish();
                    crate::logging::flush_logs();
                    std::process::exit(0);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the drain watcher; waiting out the grace period");
        }
    }
}

/// SIGTERM and SIGINT both shut down gracefully; SIGQUIT keeps pingora's fd-passing upgrade.
pub struct Signals {
    pub drain: Arc<Drain>,
    pub grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return std::future::pending().await;
        };
        let sig = tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::GracefulTerminate,
            _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
        };
        tracing::info!(
            in_flight = self.drain.in_flight(),
            "stop signal received; draining"
        );
        self.drain.start_draining(self.grace);
        sig
    }
}
