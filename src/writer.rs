//! The usage writer: the request path hands each [`UsageRecord`] to a bounded queue and one
//! background task writes them in batches.
//!
//! # Guarantees and their bounds
//!
//! - **The request path never waits.** [`UsageSink::submit`] is a non-blocking `try_send`. If the
//!   queue is full (`queue_capacity`, only possible when even the spool cannot keep up), the record
//!   is *lost visibly*: counted in `rows_lost` and logged at error with its request id.
//! - **Batches**: a flush happens when `batch_size` records are queued or `flush_interval_ms`
//!   after the first one arrived. One flush = one transaction ([`Store::insert_usage`]) whose
//!   inserts skip request ids already present, so a batch written twice counts once.
//! - **Database down or slow** (an error, or no answer within `flush_timeout_ms`): the batch is
//!   appended to the local spool (fsync'd) and the writer goes *degraded*: later batches go
//!   straight to the spool, and the database is probed with capped exponential backoff (100 ms
//!   doubling to `max_backoff_ms`) by replaying the spool, oldest segment first. A segment is
//!   deleted only after all its records committed. When the queue depth passes `high_water`,
//!   batches are spooled even while the database is up, so the queue drains at disk speed.
//! - **Start-up**: whatever is in the spool (from a crash or an outage) is replayed first.
//! - **Shutdown** ([`WriterHandle::shutdown`]): everything queued is flushed (to the database, or
//!   the spool if it is down); nothing queued is lost.
//! - **SIGKILL** loses at most the records not yet flushed: those queued within the last flush
//!   interval (≤ `flush_interval_ms`, or `batch_size` records) plus a batch in the middle of its
//!   database write (≤ `flush_timeout_ms` before it would have been spooled).
//! - **Spool unwritable** (disk full): the batch is counted in `rows_lost` and its request ids
//!   are logged at error. A loss is never silent.
//!
//! - **Wake-ups**: the writer task is woken by the first record of a batch, then sleeps until the
//!   flush interval ends or a submit sees `batch_size` records queued. At load that is one
//!   cross-thread wake-up per batch, not one per request (measured: one per request cost the proxy
//!   ~12% of its CPU).
//!
//! - **A loss is never silent**: a record that cannot be encoded for the spool, a spooled record
//!   that no longer decodes, and a batch the spool cannot take are counted in `rows_lost` and
//!   logged at error with their request ids. A failed replay loses nothing (the segment stays);
//!   it is counted in `flush_failures` and logged.
//!
//! Spool I/O is synchronous on the writer task, which runs on the background runtime, never on
//! a proxy thread: appends while degraded or above `high_water`, reads and deletes when
//! replaying (at start-up, and while a spool is left to drain).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep_until, timeout, Instant};

use crate::record::UsageRecord;
use crate::spool::Spool;
use crate::store::Store;

/// Where batches go when the database is reachable. [`Store`] in production; a fake in tests.
#[async_trait]
pub trait BatchSink: Send + Sync + 'static {
    /// Writes the batch in one transaction; returns rows actually inserted.
    async fn write(&self, batch: &[UsageRecord]) -> Result<u64, String>;
}

#[async_trait]
impl BatchSink for Store {
    async fn write(&self, batch: &[UsageRecord]) -> Result<u64, String> {
        self.insert_usage(batch).await.map_err(|e| e.to_string())
    }
}

/// Counters the writer exposes (exported as metrics by `metrics.rs`).
#[derive(Debug, Default)]
pub struct WriterStats {
    pub rows_written: AtomicU64,
    pub rows_duplicate: AtomicU64,
    pub rows_spooled: AtomicU64,
    pub rows_replayed: AtomicU64,
    pub rows_lost: AtomicU64,
    pub flush_failures: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub torn_segments: AtomicU64,
    /// 1 while the database is considered down.
    pub degraded: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Rows per flush, and flush durations (no-op handles unless metrics are installed).
    pub batch_rows: metrics::Histogram,
    pub flush_seconds: metrics::Histogram,
    pub batch_size: NonZeroUsize,
    pub flush_interval: Duration,
    pub queue_capacity: NonZeroUsize,
    pub high_water: usize,
    pub flush_timeout: Duration,
    pub max_backoff: Duration,
    /// How a record is written into the spool ([`encode_json`]); tests replace it to make
    /// encoding fail.
    pub encode: Encode,
}

/// Serialises a record for the spool.
pub type Encode = fn(&UsageRecord) -> Result<Vec<u8>, String>;

/// The spool's record format: the record as JSON.
pub fn encode_json(r: &UsageRecord) -> Result<Vec<u8>, String> {
    serde_json::to_vec(r).map_err(|e| e.to_string())
}

/// The request id of a spooled record that no longer decodes as a whole, for the loss log.
fn request_id_of(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Id {
        request_id: String,
    }
    serde_json::from_slice::<Id>(bytes).map_or_else(|_| "unknown".into(), |i| i.request_id)
}

impl WriterOptions {
    pub fn new(w: &crate::settings::Writer) -> WriterOptions {
        WriterOptions {
            batch_rows: metrics::Histogram::noop(),
            flush_seconds: metrics::Histogram::noop(),
            batch_size: w.batch_size,
            flush_interval: w.flush_interval,
            queue_capacity: w.queue_capacity,
            high_water: w.high_water.get(),
            flush_timeout: w.flush_timeout,
            max_backoff: w.max_backoff,
            encode: encode_json,
        }
    }
}

/// The request path's end of the queue. Cheap to clone.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageRecord>,
    stats: Arc<WriterStats>,
    /// Wakes the writer when a full batch is waiting (it does not watch the queue mid-batch).
    batch_full: Arc<BatchFull>,
}

/// How the request path tells the writer a batch is full: the writer publishes how many records
/// it already holds; a submit that brings held + queued to `batch_size` wakes it.
struct BatchFull {
    notify: Notify,
    held: AtomicUsize,
    batch_size: usize,
}

impl UsageSink {
    /// Queues a record without waiting. A full queue is a counted, logged loss.
    pub fn submit(&self, record: UsageRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {
                let full = &self.batch_full;
                if self.depth() + full.held.load(Ordering::Relaxed) >= full.batch_size {
                    full.notify.notify_one();
                }
            }
            Err(e) => self.lost(e),
        }
    }

    #[cold]
    fn lost(&self, e: mpsc::error::TrySendError<UsageRecord>) {
        let record = match e {
            mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
        };
        self.stats.rows_lost.fetch_add(1, Ordering::Relaxed);
        tracing::error!(request_id = %record.request_id, "usage record LOST: the writer queue is full or closed");
    }

    /// Records waiting in the queue.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }
}

/// Owns the writer task; [`shutdown`](Self::shutdown) drains it.
pub struct WriterHandle {
    stop: Option<oneshot::Sender<()>>,
    flush: mpsc::Sender<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl WriterHandle {
    /// Writes everything queued so far (database or spool) and returns when done.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.flush.send(tx).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the writer after flushing everything queued.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "usage writer task failed");
            }
        }
    }
}

/// Starts the writer task on the current runtime.
pub fn start(
    sink: Arc<dyn BatchSink>,
    spool: Spool,
    opts: WriterOptions,
) -> (UsageSink, WriterHandle) {
    let (tx, rx) = mpsc::channel(opts.queue_capacity.get());
    let (stop_tx, stop_rx) = oneshot::channel();
    let (flush_tx, flush_rx) = mpsc::channel(16);
    let stats = Arc::new(WriterStats::default());
    let batch_full = Arc::new(BatchFull {
        notify: Notify::new(),
        held: AtomicUsize::new(0),
        batch_size: opts.batch_size.get(),
    });
    stats.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
    let writer = Writer {
        sink,
        spool,
        stats: stats.clone(),
        probe: Probe::new(opts.max_backoff),
        batch_full: batch_full.clone(),
        opts,
        depth: {
            let tx = tx.clone();
            Box::new(move || tx.max_capacity() - tx.capacity())
        },
    };
    // The one writer task ("usage-writer"); owned by the handle and drained by `shutdown`.
    let task = tokio::spawn(writer.run(rx, stop_rx, flush_rx));
    (
        UsageSink {
            tx,
            stats,
            batch_full,
        },
        WriterHandle {
            stop: Some(stop_tx),
            flush: flush_tx,
            task: Some(task),
        },
    )
}

/// Moves queued records into `batch` until it holds `max`, without waiting.
fn take_ready(rx: &mut mpsc::Receiver<UsageRecord>, batch: &mut Vec<UsageRecord>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

/// When to next try the database while degraded.
struct Probe {
    degraded: bool,
    backoff: Duration,
    next: Instant,
    max: Duration,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);

impl Probe {
    fn new(max: Duration) -> Probe {
        Probe {
            degraded: false,
            backoff: MIN_BACKOFF,
            next: Instant::now(),
            max,
        }
    }

    fn failed(&mut self) {
        if self.degraded {
            self.backoff = (self.backoff * 2).min(self.max);
        } else {
            self.degraded = true;
            self.backoff = MIN_BACKOFF.min(self.max);
        }
        self.next = Instant::now() + self.backoff;
    }

    fn recovered(&mut self) {
        self.degraded = false;
        self.backoff = MIN_BACKOFF;
    }
}

struct Writer {
    sink: Arc<dyn BatchSink>,
    spool: Spool,
    stats: Arc<WriterStats>,
    probe: Probe,
    batch_full: Arc<BatchFull>,
    opts: WriterOptions,
    depth: Box<dyn Fn() -> usize + Send>,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<UsageRecord>,
        mut stop: oneshot::Receiver<()>,
        mut flush: mpsc::Receiver<oneshot::Sender<()>>,
    ) {
        // Whatever a crash or an outage left behind goes first.
        self.replay().await;
        let mut batch: Vec<UsageRecord> = Vec::with_capacity(self.opts.batch_size.get());
        let mut deadline: Option<Instant> = None;
        loop {
            let probe_due = self.probe.degraded || !self.spool.is_empty();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some(ack) = flush.recv() => {
                    take_ready(&mut rx, &mut batch, usize::MAX);
                    self.flush_all(&mut batch).await;
                    deadline = None;
                    let _ = ack.send(());
                }
                // Idle: the first record of the next batch wakes the writer.
                n = rx.recv_many(&mut batch, self.opts.batch_size.get()), if deadline.is_none() => {
                    if n == 0 {
                        break; // every sender is gone
                    }
                    deadline = Some(Instant::now() + self.opts.flush_interval);
                }
                // Mid-batch: the queue is not watched; a submit that sees a full batch wakes us.
                _ = self.batch_full.notify.notified(), if deadline.is_some() => {
                    take_ready(&mut rx, &mut batch, self.opts.batch_size.get());
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let began = Instant::now();
                    take_ready(&mut rx, &mut batch, self.opts.batch_size.get());
                    self.flush_all(&mut batch).await;
                    deadline = self.next_deadline(&rx, began);
                }
                _ = sleep_until(self.probe.next), if probe_due && batch.is_empty() => {
                    self.replay().await;
                }
            }
            if batch.len() >= self.opts.batch_size.get() {
                let began = Instant::now();
                self.flush_all(&mut batch).await;
                deadline = self.next_deadline(&rx, began);
            }
            self.batch_full.held.store(batch.len(), Ordering::Relaxed);
        }
        // Shutdown: nothing queued is lost.
        rx.close();
        while let Some(r) = rx.recv().await {
            batch.push(r);
        }
        self.flush_all(&mut batch).await;
        if self.probe.degraded || !self.spool.is_empty() {
            self.replay().await;
        }
        if let Err(e) = self.spool.roll() {
            tracing::warn!(error = %e, "closing the spool segment");
        }
        tracing::info!(
            rows_written = self.stats.rows_written.load(Ordering::Relaxed),
            rows_spooled = self.stats.rows_spooled.load(Ordering::Relaxed),
            rows_lost = self.stats.rows_lost.load(Ordering::Relaxed),
            "usage writer stopped"
        );
    }

    /// After a flush that began at `began`: records queued while it was written start the next
    /// batch, whose interval runs from `began` — so a record never waits for a write, then a whole
    /// interval, then its own write (the SIGKILL bound stays `flush_interval_ms` +
    /// `flush_timeout_ms`). `None` (idle) when nothing is waiting.
    fn next_deadline(&self, rx: &mpsc::Receiver<UsageRecord>, began: Instant) -> Option<Instant> {
        (!rx.is_empty()).then(|| began + self.opts.flush_interval)
    }

    /// Writes `batch` (emptying it) in chunks of `batch_size`.
    async fn flush_all(&mut self, batch: &mut Vec<UsageRecord>) {
        let all = std::mem::take(batch);
        for chunk in all.chunks(self.opts.batch_size.get()) {
            self.flush(chunk).await;
        }
        *batch = Vec::with_capacity(self.opts.batch_size.get());
    }

    async fn flush(&mut self, batch: &[UsageRecord]) {
        if batch.is_empty() {
            return;
        }
        if self.probe.degraded || (self.depth)() > self.opts.high_water {
            self.spool_batch(batch);
            return;
        }
        let started = std::time::Instant::now();
        match timeout(self.opts.flush_timeout, self.sink.write(batch)).await {
            Ok(Ok(inserted)) => {
                self.opts
                    .flush_seconds
                    .record(started.elapsed().as_secs_f64());
                self.opts.batch_rows.record(batch.len() as f64);
                self.stats
                    .rows_written
                    .fetch_add(inserted, Ordering::Relaxed);
                self.stats.rows_duplicate.fetch_add(
                    batch.len() as u64 - inserted.min(batch.len() as u64),
                    Ordering::Relaxed,
                );
            }
            failure => {
                let reason = match failure {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {:?}", self.opts.flush_timeout),
                };
                self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %reason, rows = batch.len(), "usage flush failed; spooling and retrying with backoff");
                self.set_degraded();
                self.spool_batch(batch);
            }
        }
    }

    fn set_degraded(&mut self) {
        self.probe.failed();
        self.stats.degraded.store(1, Ordering::Relaxed);
    }

    /// Appends `batch` to the spool. A record that cannot be encoded, or a batch the spool
    /// cannot take, is a loss: counted in `rows_lost` and logged with its request ids.
    fn spool_batch(&mut self, batch: &[UsageRecord]) {
        let mut encoded = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        for r in batch {
            match (self.opts.encode)(r) {
                Ok(bytes) => {
                    encoded.push(bytes);
                    ids.push(r.request_id.as_str());
                }
                Err(e) => {
                    self.stats.rows_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(request_id = %r.request_id, error = %e, "usage record LOST: it cannot be encoded for the spool");
                }
            }
        }
        if encoded.is_empty() {
            return;
        }
        let refs: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        match self.spool.append(&refs) {
            Ok(()) => {
                self.stats
                    .rows_spooled
                    .fetch_add(refs.len() as u64, Ordering::Relaxed);
                self.stats
                    .spool_bytes
                    .store(self.spool.bytes(), Ordering::Relaxed);
            }
            Err(e) => {
                self.stats
                    .rows_lost
                    .fetch_add(refs.len() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, request_ids = ?ids, "usage records LOST: the spool cannot be written");
            }
        }
    }

    /// Replays closed spool segments, oldest first; stops at the first failure (degraded, with
    /// backoff). A segment is deleted only after all its records committed.
    async fn replay(&mut self) {
        if let Err(e) = self.spool.roll() {
            tracing::warn!(error = %e, "closing the spool segment before replay");
        }
        let segments = match self.spool.closed_segments() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "listing spool segments");
                return;
            }
        };
        for path in segments {
            let segment = match Spool::read_segment(&path) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "reading a spool segment");
                    self.set_degraded();
                    return;
                }
            };
            if segment.torn {
                self.stats.torn_segments.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), skipped_bytes = segment.skipped_bytes, "spool segment has a torn tail; replaying the records before it");
            }
            let mut records: Vec<UsageRecord> = Vec::with_capacity(segment.records.len());
            for bytes in &segment.records {
                match serde_json::from_slice(bytes) {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        // Its checksum held, so the bytes are what was written: it will never
                        // decode. Counted and named, then the segment goes on without it.
                        self.stats.rows_lost.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(request_id = %request_id_of(bytes), path = %path.display(), error = %e, "usage record LOST: a spooled record does not decode");
                    }
                }
            }
            for chunk in records.chunks(self.opts.batch_size.get()) {
                match timeout(self.opts.flush_timeout, self.sink.write(chunk)).await {
                    Ok(Ok(inserted)) => {
                        self.stats
                            .rows_written
                            .fetch_add(inserted, Ordering::Relaxed);
                        self.stats
                            .rows_replayed
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    failure => {
                        // Nothing is lost: the segment stays and is replayed after the backoff.
                        let reason = match failure {
                            Ok(Err(e)) => e,
                            _ => format!("no answer within {:?}", self.opts.flush_timeout),
                        };
                        self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
                        if !self.probe.degraded {
                            tracing::warn!(error = %reason, path = %path.display(), "spool replay failed; retrying with backoff");
                        } else {
                            tracing::debug!(error = %reason, path = %path.display(), "spool replay failed; retrying with backoff");
                        }
                        self.set_degraded();
                        return;
                    }
                }
            }
            if let Err(e) = self.spool.remove(&path) {
                tracing::error!(error = %e, "removing a replayed spool segment (it will be replayed again, harmlessly)");
            }
            self.stats
                .spool_bytes
                .store(self.spool.bytes(), Ordering::Relaxed);
        }
        if self.probe.degraded {
            tracing::info!("database reachable again; spool replayed");
        }
        self.probe.recovered();
        self.stats.degraded.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    /// A sink that records what it committed and can be switched down.
    #[derive(Default)]
    struct FakeSink {
        committed: Mutex<Vec<String>>,
        down: AtomicBool,
        writes: AtomicU64,
    }

    #[async_trait]
    impl BatchSink for FakeSink {
        async fn write(&self, batch: &[UsageRecord]) -> Result<u64, String> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err("database down".into());
            }
            let mut c = self.committed.lock().unwrap();
            let mut n = 0;
            for r in batch {
                if !c.contains(&r.request_id) {
                    c.push(r.request_id.clone());
                    n += 1;
                }
            }
            Ok(n)
        }
    }

    fn record(i: usize) -> UsageRecord {
        UsageRecord {
            created_at: chrono::Utc::now(),
            ..UsageRecord::sample(&format!("req-{i:05}"))
        }
    }

    fn opts(batch_size: usize) -> WriterOptions {
        WriterOptions {
            batch_rows: metrics::Histogram::noop(),
            flush_seconds: metrics::Histogram::noop(),
            batch_size: NonZeroUsize::new(batch_size).unwrap(),
            flush_interval: Duration::from_millis(200),
            queue_capacity: NonZeroUsize::new(10_000).unwrap(),
            high_water: 5_000,
            flush_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(2),
            encode: encode_json,
        }
    }

    fn setup(batch_size: usize) -> (Arc<FakeSink>, UsageSink, WriterHandle, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let sink = Arc::new(FakeSink::default());
        let (usage, handle) = start(sink.clone(), spool, opts(batch_size));
        (sink, usage, handle, dir)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_at_batch_size_without_waiting() {
        let (sink, usage, handle, _dir) = setup(10);
        for i in 0..10 {
            usage.submit(record(i));
        }
        settle().await;
        assert_eq!(
            sink.committed.lock().unwrap().len(),
            10,
            "a full batch is written at once"
        );
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_filled_one_record_at_a_time_flushes_when_full() {
        // The writer does not watch the queue mid-batch: the submit that completes the batch
        // must wake it.
        let (sink, usage, handle, _dir) = setup(10);
        for i in 0..10 {
            usage.submit(record(i));
            settle().await;
        }
        assert_eq!(sink.committed.lock().unwrap().len(), 10);
        assert_eq!(
            sink.writes.load(Ordering::SeqCst),
            1,
            "one batch, one write"
        );
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn records_arriving_mid_interval_join_the_batch() {
        let (sink, usage, handle, _dir) = setup(1000);
        usage.submit(record(0));
        settle().await;
        tokio::time::advance(Duration::from_millis(100)).await;
        for i in 1..6 {
            usage.submit(record(i));
        }
        settle().await;
        assert_eq!(sink.committed.lock().unwrap().len(), 0);
        tokio::time::advance(Duration::from_millis(101)).await;
        settle().await;
        assert_eq!(sink.committed.lock().unwrap().len(), 6);
        assert_eq!(
            sink.writes.load(Ordering::SeqCst),
            1,
            "one batch, one write"
        );
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_after_the_interval() {
        let (sink, usage, handle, _dir) = setup(1000);
        usage.submit(record(1));
        settle().await;
        assert_eq!(
            sink.committed.lock().unwrap().len(),
            0,
            "not before the interval"
        );
        tokio::time::advance(Duration::from_millis(199)).await;
        settle().await;
        assert_eq!(sink.committed.lock().unwrap().len(), 0);
        tokio::time::advance(Duration::from_millis(2)).await;
        settle().await;
        assert_eq!(
            sink.committed.lock().unwrap().len(),
            1,
            "flushed once the interval passed"
        );
        assert_eq!(sink.writes.load(Ordering::SeqCst), 1);
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_flushes_everything_queued() {
        let (sink, usage, handle, _dir) = setup(1000);
        for i in 0..2500 {
            usage.submit(record(i));
        }
        handle.shutdown().await;
        assert_eq!(sink.committed.lock().unwrap().len(), 2500);
        assert_eq!(usage.stats().rows_lost.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn outage_spools_then_replays_each_record_once() {
        let (sink, usage, handle, dir) = setup(100);
        sink.down.store(true, Ordering::SeqCst);
        for i in 0..250 {
            usage.submit(record(i));
        }
        handle.flush().await;
        let stats = usage.stats().clone();
        assert_eq!(
            stats.rows_spooled.load(Ordering::Relaxed),
            250,
            "every batch went to the spool"
        );
        assert_eq!(stats.degraded.load(Ordering::Relaxed), 1);
        assert!(sink.committed.lock().unwrap().is_empty());
        // Probes back off while the database stays down.
        let before = sink.writes.load(Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        let probes = sink.writes.load(Ordering::SeqCst) - before;
        assert!(
            (1..=8).contains(&probes),
            "backoff caps the probing: {probes} probes in 10s"
        );
        // Back up: the spool is replayed, every record exactly once, and the spool emptied.
        sink.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(3)).await;
        settle().await;
        handle.flush().await;
        let committed = sink.committed.lock().unwrap().clone();
        assert_eq!(committed.len(), 250);
        assert_eq!(stats.degraded.load(Ordering::Relaxed), 0);
        handle.shutdown().await;
        let spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        assert!(
            spool.closed_segments().unwrap().is_empty(),
            "replayed segments are deleted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_during_an_outage_keeps_records_in_the_spool() {
        let (sink, usage, handle, dir) = setup(100);
        sink.down.store(true, Ordering::SeqCst);
        for i in 0..42 {
            usage.submit(record(i));
        }
        handle.shutdown().await;
        let spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let records: usize = spool
            .closed_segments()
            .unwrap()
            .iter()
            .map(|p| Spool::read_segment(p).unwrap().records.len())
            .sum();
        assert_eq!(
            records, 42,
            "nothing queued is lost at shutdown, even with the database down"
        );
        // The next start replays them.
        sink.down.store(false, Ordering::SeqCst);
        let (_usage, handle) = start(sink.clone(), spool, opts(100));
        handle.flush().await;
        assert_eq!(sink.committed.lock().unwrap().len(), 42);
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_a_counted_loss_not_a_wait() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let sink = Arc::new(FakeSink::default());
        let mut o = opts(10);
        o.queue_capacity = NonZeroUsize::new(5).unwrap();
        o.high_water = 5;
        let (usage, handle) = start(sink.clone(), spool, o);
        // No await between submits: the writer cannot drain, so the 6th onwards are lost.
        for i in 0..8 {
            usage.submit(record(i));
        }
        assert_eq!(usage.stats().rows_lost.load(Ordering::Relaxed), 3);
        handle.shutdown().await;
        assert_eq!(sink.committed.lock().unwrap().len(), 5);
    }

    fn lost(usage: &UsageSink) -> u64 {
        usage.stats().rows_lost.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_cannot_be_encoded_is_a_counted_loss() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let sink = Arc::new(FakeSink::default());
        sink.down.store(true, Ordering::SeqCst);
        let mut o = opts(3);
        o.encode = |r| match r.request_id.as_str() {
            "req-00001" => Err("cannot encode".into()),
            _ => encode_json(r),
        };
        let (usage, handle) = start(sink.clone(), spool, o);
        for i in 0..3 {
            usage.submit(record(i));
        }
        settle().await;
        assert_eq!(lost(&usage), 1, "the unencodable record is lost, visibly");
        assert_eq!(usage.stats().rows_spooled.load(Ordering::SeqCst), 2);
        sink.down.store(false, Ordering::SeqCst);
        handle.shutdown().await;
        assert_eq!(*sink.committed.lock().unwrap(), ["req-00000", "req-00002"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spooled_record_that_does_not_decode_is_a_counted_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let good = serde_json::to_vec(&record(1)).unwrap();
        let bad = br#"{"request_id":"req-broken","user_id":"not a number"}"#.to_vec();
        spool.append(&[&good, &bad]).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let sink = Arc::new(FakeSink::default());
        let (usage, handle) = start(sink.clone(), spool, opts(10));
        settle().await;
        assert_eq!(lost(&usage), 1);
        assert_eq!(*sink.committed.lock().unwrap(), ["req-00001"]);
        handle.shutdown().await;
        assert_eq!(request_id_of(&bad), "req-broken");
        assert_eq!(request_id_of(b"garbage"), "unknown");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_replay_is_counted_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let good = serde_json::to_vec(&record(7)).unwrap();
        spool.append(&[&good]).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path().join("spool"), 1 << 20).unwrap();
        let sink = Arc::new(FakeSink::default());
        sink.down.store(true, Ordering::SeqCst);
        let (usage, handle) = start(sink.clone(), spool, opts(10));
        settle().await;
        let stats = usage.stats().clone();
        assert!(
            stats.flush_failures.load(Ordering::SeqCst) >= 1,
            "the failed replay is counted"
        );
        assert_eq!(lost(&usage), 0);
        // The database comes back: the next probe replays the record.
        sink.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        settle().await;
        assert_eq!(*sink.committed.lock().unwrap(), ["req-00007"]);
        handle.shutdown().await;
    }
}
