//! Local on-disk spool for usage-record batches that could not be written to
//! the database.
//!
//! # What this module owns
//!
//! One directory, and every file in it whose name matches
//! `usage-{seq:020}.spool` (other files are ignored and never touched). The
//! records are opaque byte strings (the caller serialises usage records as
//! JSON); this module only guarantees they come back byte-for-byte.
//!
//! # On-disk format
//!
//! * File name: `usage-{seq:020}.spool`, `seq` a zero-padded `u64` so that
//!   lexical order equals numeric order. A new segment's `seq` is strictly
//!   greater than every `seq` seen in the directory at open and than every
//!   segment this `Spool` created, and is at least the current unix time in
//!   nanoseconds, so names keep increasing across restarts even after old
//!   segments were deleted. Order is always taken from `seq`, never mtime.
//! * Header: the 8 bytes `TGSPOOL1` (magic + format version).
//! * Records, back to back: `u32 LE payload length` + `u32 LE crc32 of the
//!   payload` + payload. A payload is 1..=[`MAX_RECORD_BYTES`] bytes: a zero
//!   length is never written, so a zero-filled tail (what some filesystems
//!   leave after a power loss) reads as corruption, not as empty records.
//!
//! # Guarantees
//!
//! * [`Spool::append`] writes the whole batch with one `write` on an
//!   `O_APPEND` handle and `fdatasync`s it (plus the directory when the
//!   segment file was just created) before returning `Ok`: an acknowledged
//!   batch survives a crash, `kill -9` or power loss.
//! * If `append` fails, the batch's bytes are truncated away (best effort)
//!   and the segment is closed, so a later append never lands behind a
//!   damaged tail. If even the truncation fails, a prefix of the failed batch
//!   may be read back later: delivery is at-least-once, and consumers should
//!   insert idempotently (e.g. by a record id).
//! * Reading ([`Spool::read_segment`]) never panics on any input. It returns
//!   every record before the first bad one; a bad header, a length past EOF,
//!   a zero length or one above [`MAX_RECORD_BYTES`], or a CRC mismatch stops
//!   it there, with `torn = true` and the rest of the file counted in
//!   `skipped_bytes`. An empty (0-byte) file, which a crash right after
//!   creating it can leave, reads as clean and empty.
//! * Segments left from before a restart are never appended to: every
//!   `Spool` writes to segments it created itself.
//!
//! # Not handled here
//!
//! One `Spool` per directory: two processes sharing a directory is
//! unsupported (there is no lock file). All I/O is blocking `std::fs`; run it
//! on a blocking thread. `&mut self` methods need external synchronisation
//! (e.g. a `Mutex`) when shared.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Magic + format version at the start of every segment file.
pub const MAGIC: &[u8; 8] = b"TGSPOOL1";
/// Largest payload accepted by `append` and believed by the reader (16 MiB).
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

const HEADER_LEN: u64 = MAGIC.len() as u64;
const RECORD_OVERHEAD: usize = 8;
const NAME_PREFIX: &str = "usage-";
const NAME_SUFFIX: &str = ".spool";
const SEQ_DIGITS: usize = 20;
/// How many names to try when a freshly chosen one already exists.
const CREATE_ATTEMPTS: u32 = 16;

/// The only error of this module: an I/O failure on a path (or an argument
/// the spool refuses, reported as `ErrorKind::InvalidInput`).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The contents of one segment file as read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    /// Every intact record before the first torn/corrupt one, in append order.
    pub records: Vec<Vec<u8>>,
    /// A torn or corrupt tail was found and skipped.
    pub torn: bool,
    /// Bytes from the first bad byte to the end of the file (0 when clean).
    pub skipped_bytes: u64,
}

/// The segment currently being appended to. It always holds at least one
/// record: it is created right before its first batch is written, and
/// removed again if that write fails.
#[derive(Debug)]
struct OpenSegment {
    file: File,
    path: PathBuf,
    seq: u64,
    size: u64,
}

/// A directory of append-only segment files. See the module docs.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    current: Option<OpenSegment>,
    segment_limit: u64,
    /// Lowest `seq` the next segment may take.
    next_seq: u64,
    /// `seq` -> size of closed segments known to this spool.
    closed: BTreeMap<u64, u64>,
    /// Sum of the values of `closed`.
    closed_bytes: u64,
}

impl Spool {
    /// Opens (creating) the directory. Existing segments are left for
    /// `closed_segments` to return (they are from before a crash or
    /// restart); new appends go to a NEW segment file.
    ///
    /// `segment_limit_bytes` counts the whole file (header included); see
    /// [`Spool::append`] for how it is applied.
    pub fn open(dir: impl Into<PathBuf>, segment_limit_bytes: u64) -> Result<Spool, SpoolError> {
        let dir = dir.into();
        let existed = dir.is_dir();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        if !existed {
            // Make the new directory's own entry durable.
            sync_dir(&parent_dir(&dir))?;
        }
        let mut closed = BTreeMap::new();
        let mut closed_bytes = 0u64;
        for (seq, path) in scan(&dir)? {
            let len = fs::metadata(&path).map_err(|e| io_err(&path, e))?.len();
            closed.insert(seq, len);
            closed_bytes = closed_bytes.saturating_add(len);
        }
        let next_seq = closed
            .keys()
            .next_back()
            .map_or(0, |max| max.saturating_add(1));
        if !closed.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                segments = closed.len(),
                bytes = closed_bytes,
                "spool opened with segments left from a previous run"
            );
        }
        Ok(Spool {
            dir,
            current: None,
            segment_limit: segment_limit_bytes,
            next_seq,
            closed,
            closed_bytes,
        })
    }

    /// Appends a batch of records to the current segment and fsyncs (file
    /// data; and the directory when the segment file was just created) before
    /// returning: when Ok, the batch survives a crash / kill -9 / power loss.
    /// Rolls to a new segment file when the current one exceeds the limit. An
    /// empty batch is a no-op.
    ///
    /// A batch never straddles two files. Before writing, if the batch would
    /// push a segment that already has records past the limit, that segment
    /// is closed first; after writing, a segment at or past the limit is
    /// closed at once. So a segment only exceeds the limit when a single
    /// batch does.
    ///
    /// Every record must be 1..=[`MAX_RECORD_BYTES`] bytes, otherwise the
    /// whole batch is refused (`InvalidInput`) and nothing is written.
    pub fn append(&mut self, records: &[&[u8]]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch_len = 0usize;
        for (i, record) in records.iter().enumerate() {
            if record.is_empty() || record.len() > MAX_RECORD_BYTES {
                let msg = format!(
                    "record {i} of the batch is {} bytes; records must be 1..={MAX_RECORD_BYTES} bytes",
                    record.len()
                );
                return Err(io_err(&self.dir, invalid_input(msg)));
            }
            batch_len = batch_len.saturating_add(RECORD_OVERHEAD + record.len());
        }
        let mut buf = Vec::with_capacity(batch_len);
        for record in records {
            encode_record(&mut buf, record);
        }
        let batch_len = buf.len() as u64;

        if let Some(cur) = &self.current {
            if cur.size.saturating_add(batch_len) > self.segment_limit {
                self.roll()?;
            }
        }
        let (mut cur, fresh) = match self.current.take() {
            Some(cur) => (cur, false),
            None => (self.create_segment()?, true),
        };
        let prev_size = cur.size;
        let written = cur.file.write_all(&buf).and_then(|()| cur.file.sync_data());
        let result = match written {
            Ok(()) if fresh => sync_dir(&self.dir),
            Ok(()) => Ok(()),
            Err(e) => Err(io_err(&cur.path, e)),
        };
        if let Err(err) = result {
            self.abandon(cur, prev_size, &err);
            return Err(err);
        }
        cur.size = prev_size.saturating_add(batch_len);
        let full = cur.size >= self.segment_limit;
        self.current = Some(cur);
        if full {
            self.roll()?;
        }
        Ok(())
    }

    /// Closes the current segment (if it has data) so that it is returned by
    /// `closed_segments`; the next append starts a new file.
    ///
    /// Every batch was already fsynced by `append`, so this does no I/O.
    pub fn roll(&mut self) -> Result<(), SpoolError> {
        if let Some(cur) = self.current.take() {
            tracing::debug!(path = %cur.path.display(), bytes = cur.size, "spool segment closed");
            self.close(cur.seq, cur.size);
        }
        Ok(())
    }

    /// Paths of closed segments, oldest first (by the sequence in the file
    /// name, never by mtime). Excludes the open segment.
    ///
    /// This lists the directory, so it also returns segments of a previous
    /// run and ignores files whose names do not match the segment pattern.
    pub fn closed_segments(&self) -> Result<Vec<PathBuf>, SpoolError> {
        let open_seq = self.current.as_ref().map(|c| c.seq);
        Ok(scan(&self.dir)?
            .into_iter()
            .filter(|(seq, _)| Some(*seq) != open_seq)
            .map(|(_, path)| path)
            .collect())
    }

    /// Reads a segment; a torn/corrupt record stops reading there (torn =
    /// true, skipped_bytes = rest of file) — everything before it is
    /// returned.
    pub fn read_segment(path: &Path) -> Result<Segment, SpoolError> {
        let data = fs::read(path).map_err(|e| io_err(path, e))?;
        let (records, bad_at) = decode(&data);
        let skipped_bytes = bad_at.map_or(0, |at| (data.len() - at) as u64);
        if let Some(at) = bad_at {
            tracing::warn!(
                path = %path.display(),
                offset = at,
                skipped_bytes,
                recovered = records.len(),
                "spool segment has a torn or corrupt tail; skipping it"
            );
        }
        Ok(Segment {
            path: path.to_path_buf(),
            records,
            torn: bad_at.is_some(),
            skipped_bytes,
        })
    }

    /// Deletes a segment after its records were committed elsewhere (and
    /// fsyncs the directory).
    ///
    /// Removing a segment that is already gone is not an error. The path must
    /// have a segment file name (else `InvalidInput`) and must not be the
    /// open segment (`InvalidInput`: it can never come from
    /// `closed_segments`, and deleting it would lose later appends).
    pub fn remove(&mut self, path: &Path) -> Result<(), SpoolError> {
        let Some(seq) = path.file_name().and_then(parse_segment_name) else {
            return Err(io_err(path, invalid_input("not a spool segment file name")));
        };
        if self.current.as_ref().is_some_and(|c| c.seq == seq) {
            return Err(io_err(
                path,
                invalid_input("segment is still open for appends; roll() first"),
            ));
        }
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, e)),
        }
        if let Some(size) = self.closed.remove(&seq) {
            self.closed_bytes = self.closed_bytes.saturating_sub(size);
        }
        sync_dir(&self.dir)
    }

    /// Bytes currently on disk in all segments (open one included) — kept as
    /// a running counter, not a directory scan.
    pub fn bytes(&self) -> u64 {
        self.closed_bytes
            .saturating_add(self.current.as_ref().map_or(0, |c| c.size))
    }

    /// True when no records are spooled (no closed segments and the open one
    /// is empty).
    ///
    /// Answered from this spool's bookkeeping (segments found at open, plus
    /// those it closed, minus those removed through it), not a directory
    /// scan. A closed segment counts even if it holds no intact record.
    pub fn is_empty(&self) -> bool {
        self.closed.is_empty() && self.current.is_none()
    }

    fn close(&mut self, seq: u64, size: u64) {
        if let Some(old) = self.closed.insert(seq, size) {
            self.closed_bytes = self.closed_bytes.saturating_sub(old);
        }
        self.closed_bytes = self.closed_bytes.saturating_add(size);
    }

    /// Creates a new segment file holding just the header (not yet synced:
    /// the first batch's `fdatasync` covers it).
    fn create_segment(&mut self) -> Result<OpenSegment, SpoolError> {
        let mut last_err = None;
        for _ in 0..CREATE_ATTEMPTS {
            let seq = self.next_seq.max(now_nanos());
            self.next_seq = seq.saturating_add(1);
            let path = self.dir.join(segment_name(seq));
            let mut file = match OpenOptions::new().append(true).create_new(true).open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    last_err = Some(io_err(&path, e));
                    continue;
                }
                Err(e) => return Err(io_err(&path, e)),
            };
            if let Err(e) = file.write_all(MAGIC) {
                remove_quietly(&path);
                return Err(io_err(&path, e));
            }
            tracing::debug!(path = %path.display(), "spool segment created");
            return Ok(OpenSegment {
                file,
                path,
                seq,
                size: HEADER_LEN,
            });
        }
        Err(last_err.unwrap_or_else(|| {
            io_err(
                &self.dir,
                io::Error::other("could not pick a new segment name"),
            )
        }))
    }

    /// Called when a batch write/sync to `cur` failed: drops the batch's
    /// bytes (best effort) and closes the segment, or deletes it when it held
    /// no earlier record.
    fn abandon(&mut self, cur: OpenSegment, prev_size: u64, err: &SpoolError) {
        tracing::error!(path = %cur.path.display(), error = %err, "spool append failed; abandoning segment");
        if prev_size <= HEADER_LEN {
            drop(cur.file);
            remove_quietly(&cur.path);
            return;
        }
        let size = match cur
            .file
            .set_len(prev_size)
            .and_then(|()| cur.file.sync_data())
        {
            Ok(()) => prev_size,
            Err(e) => {
                tracing::error!(path = %cur.path.display(), error = %e, "could not truncate failed batch; it may be replayed");
                fs::metadata(&cur.path).map_or(prev_size, |m| m.len())
            }
        };
        self.close(cur.seq, size);
    }
}

fn io_err(path: &Path, source: io::Error) -> SpoolError {
    SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid_input(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn segment_name(seq: u64) -> String {
    format!(
        "{NAME_PREFIX}{seq:0width$}{NAME_SUFFIX}",
        width = SEQ_DIGITS
    )
}

/// `Some(seq)` for exactly `usage-` + 20 ASCII digits (fitting a `u64`) +
/// `.spool`.
fn parse_segment_name(name: &OsStr) -> Option<u64> {
    let digits = name
        .to_str()?
        .strip_prefix(NAME_PREFIX)?
        .strip_suffix(NAME_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files in `dir`, sorted by `seq`.
fn scan(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let Some(seq) = parse_segment_name(&entry.file_name()) else {
            continue;
        };
        let file_type = entry.file_type().map_err(|e| io_err(&entry.path(), e))?;
        if file_type.is_file() {
            found.push((seq, entry.path()));
        }
    }
    found.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(found)
}

fn parent_dir(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes directory entry changes (create/unlink) in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), SpoolError> {
    Ok(())
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove spool segment");
    }
}

fn encode_record(buf: &mut Vec<u8>, payload: &[u8]) {
    // Callers guarantee payload.len() <= MAX_RECORD_BYTES < u32::MAX.
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Parses a whole segment file. Returns the intact records and, if the data
/// is not clean, the offset where the bad part starts.
fn decode(data: &[u8]) -> (Vec<Vec<u8>>, Option<usize>) {
    let mut records = Vec::new();
    if data.is_empty() {
        return (records, None);
    }
    if data.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
        return (records, Some(0));
    }
    let mut pos = MAGIC.len();
    while pos < data.len() {
        let Some(&[l0, l1, l2, l3, c0, c1, c2, c3]) = data.get(pos..pos.saturating_add(8)) else {
            return (records, Some(pos));
        };
        let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if len == 0 || len > MAX_RECORD_BYTES {
            return (records, Some(pos));
        }
        let start = pos + RECORD_OVERHEAD;
        let Some(payload) = data.get(start..start.saturating_add(len)) else {
            return (records, Some(pos));
        };
        if crc32fast::hash(payload) != crc {
            return (records, Some(pos));
        }
        records.push(payload.to_vec());
        pos = start + len;
    }
    (records, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spool(dir: &Path, limit: u64) -> Spool {
        Spool::open(dir, limit).expect("open spool")
    }

    /// Every record of every closed segment, oldest first; asserts none is torn.
    fn drain_records(s: &Spool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for path in s.closed_segments().expect("list") {
            let seg = Spool::read_segment(&path).expect("read");
            assert!(!seg.torn, "{} is torn", path.display());
            out.extend(seg.records);
        }
        out
    }

    fn owned(records: &[&[u8]]) -> Vec<Vec<u8>> {
        records.iter().map(|r| r.to_vec()).collect()
    }

    fn encode_all(records: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = MAGIC.to_vec();
        for r in records {
            encode_record(&mut buf, r);
        }
        buf
    }

    fn raw_record(len: u32, crc: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = len.to_le_bytes().to_vec();
        v.extend_from_slice(&crc.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn file_size(path: &Path) -> u64 {
        fs::metadata(path).expect("metadata").len()
    }

    fn seq_of(path: &Path) -> u64 {
        path.file_name()
            .and_then(parse_segment_name)
            .expect("segment name")
    }

    #[test]
    fn round_trip_across_roll_and_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("spool");
        let batches: [&[&[u8]]; 4] = [
            &[b"{\"a\":1}", b"{\"a\":2}"],
            &[b"{\"a\":3}"],
            &[b"{\"a\":4}", b"{\"a\":5}", b"{\"a\":6}"],
            &[b"{\"a\":7}"],
        ];
        let want: Vec<Vec<u8>> = batches.iter().flat_map(|b| owned(b)).collect();

        let bytes_before_drop;
        {
            let mut s = spool(&dir, 1 << 20);
            s.append(batches[0]).expect("append");
            s.append(batches[1]).expect("append");
            s.roll().expect("roll");
            assert_eq!(s.closed_segments().expect("list").len(), 1);
            s.append(batches[2]).expect("append");
            // The open segment is not listed.
            assert_eq!(s.closed_segments().expect("list").len(), 1);
            bytes_before_drop = s.bytes();
            // Dropped without roll: simulates a crash/restart.
        }

        let mut s = spool(&dir, 1 << 20);
        let closed = s.closed_segments().expect("list");
        assert_eq!(closed.len(), 2);
        assert!(seq_of(&closed[0]) < seq_of(&closed[1]));
        assert_eq!(s.bytes(), bytes_before_drop);
        assert_eq!(s.bytes(), closed.iter().map(|p| file_size(p)).sum::<u64>());
        assert_eq!(drain_records(&s), want[..6].to_vec());

        // New appends go to a new, later segment.
        s.append(batches[3]).expect("append");
        assert_eq!(s.closed_segments().expect("list"), closed);
        s.roll().expect("roll");
        let after = s.closed_segments().expect("list");
        assert_eq!(after.len(), 3);
        assert_eq!(after[..2], closed[..]);
        assert_eq!(drain_records(&s), want);
    }

    #[test]
    fn truncation_at_every_offset() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = spool(tmp.path(), 1 << 20);
        let records: [&[u8]; 3] = [b"alpha", b"bravo-2", b"c"];
        s.append(&records).expect("append");
        s.roll().expect("roll");
        let path = s.closed_segments().expect("list").remove(0);
        let full = fs::read(&path).expect("read");
        // Offsets where each record ends.
        let ends: Vec<usize> = records
            .iter()
            .scan(MAGIC.len(), |end, r| {
                *end += RECORD_OVERHEAD + r.len();
                Some(*end)
            })
            .collect();
        assert_eq!(ends, [21, 36, 45]);
        assert_eq!(full.len(), 45);

        let cut_path = tmp.path().join("cut.bin");
        let check = |cut: usize| {
            fs::write(&cut_path, &full[..cut]).expect("write");
            let seg = Spool::read_segment(&cut_path).expect("read");
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            let last_boundary = match whole {
                0 if cut >= MAGIC.len() => MAGIC.len(),
                0 => 0,
                n => ends[n - 1],
            };
            let clean = cut == 0 || cut == last_boundary;
            assert_eq!(seg.records, owned(&records[..whole]), "cut at {cut}");
            assert_eq!(seg.torn, !clean, "cut at {cut}");
            assert_eq!(
                seg.skipped_bytes,
                (cut - last_boundary) as u64,
                "cut at {cut}"
            );
        };
        for cut in 0..=full.len() {
            check(cut);
        }
    }

    #[test]
    fn flipped_byte_in_second_payload_returns_first_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = spool(tmp.path(), 1 << 20);
        s.append(&[b"alpha", b"bravo-2", b"c"]).expect("append");
        s.roll().expect("roll");
        let path = s.closed_segments().expect("list").remove(0);
        let mut data = fs::read(&path).expect("read");
        let second_start = 21;
        data[second_start + RECORD_OVERHEAD + 2] ^= 0x40;
        fs::write(&path, &data).expect("write");

        let seg = Spool::read_segment(&path).expect("read");
        assert_eq!(seg.records, vec![b"alpha".to_vec()]);
        assert!(seg.torn);
        assert_eq!(seg.skipped_bytes, (data.len() - second_start) as u64);
    }

    #[test]
    fn read_cases() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("case.bin");
        let check = |name: &str, bytes: Vec<u8>, want: &[&[u8]], torn: bool, skipped: u64| {
            fs::write(&path, &bytes).expect("write");
            let seg = Spool::read_segment(&path).expect("read");
            assert_eq!(seg.records, owned(want), "{name}: records");
            assert_eq!(seg.torn, torn, "{name}: torn");
            assert_eq!(seg.skipped_bytes, skipped, "{name}: skipped_bytes");
        };
        let good = |p: &[u8]| raw_record(p.len() as u32, crc32fast::hash(p), p);
        let cat = |parts: &[&[u8]]| parts.concat();

        check("empty file", vec![], &[], false, 0);
        check("header only", MAGIC.to_vec(), &[], false, 0);
        check("partial header", b"TGSP".to_vec(), &[], true, 4);
        check(
            "wrong magic",
            cat(&[b"TGSPOOL2", &good(b"x")]),
            &[],
            true,
            17,
        );
        check(
            "garbage",
            b"hello world, not a spool".to_vec(),
            &[],
            true,
            24,
        );
        check(
            "two good",
            cat(&[MAGIC, &good(b"a"), &good(b"bc")]),
            &[b"a", b"bc"],
            false,
            0,
        );
        check(
            "short record header",
            cat(&[MAGIC, &good(b"a"), &[5, 0, 0]]),
            &[b"a"],
            true,
            3,
        );
        check(
            "length past eof",
            cat(&[MAGIC, &good(b"a"), &raw_record(100, 0, b"short")]),
            &[b"a"],
            true,
            13,
        );
        check(
            "crc mismatch",
            cat(&[MAGIC, &good(b"a"), &raw_record(2, 7, b"bc"), &good(b"d")]),
            &[b"a"],
            true,
            19,
        );
        check(
            "length above cap",
            cat(&[MAGIC, &raw_record(MAX_RECORD_BYTES as u32 + 1, 0, b"xx")]),
            &[],
            true,
            10,
        );
        check(
            "zero-filled tail",
            cat(&[MAGIC, &good(b"a"), &[0; 32]]),
            &[b"a"],
            true,
            32,
        );
        check("all ones length", cat(&[MAGIC, &[0xff; 12]]), &[], true, 12);
    }

    #[test]
    fn missing_segment_is_an_io_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("nope.spool");
        let err = Spool::read_segment(&path).expect_err("must fail");
        let SpoolError::Io { path: p, source } = &err;
        assert_eq!(p, &path);
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().starts_with("spool "), "{err}");
    }

    #[test]
    fn segments_roll_by_size() {
        let ten: &[u8] = b"0123456789"; // 18 bytes on disk
        let fifty = [b'x'; 50]; // 58 bytes on disk
        let check = |name: &str, limit: u64, batches: &[&[&[u8]]], want_counts: &[usize]| {
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut s = spool(tmp.path(), limit);
            let mut max_batch = 0u64;
            for b in batches {
                s.append(b).expect("append");
                let len: u64 = b.iter().map(|r| (RECORD_OVERHEAD + r.len()) as u64).sum();
                max_batch = max_batch.max(HEADER_LEN + len);
            }
            s.roll().expect("roll");
            let segs = s.closed_segments().expect("list");
            let counts: Vec<usize> = segs
                .iter()
                .map(|p| Spool::read_segment(p).expect("read").records.len())
                .collect();
            assert_eq!(counts, want_counts, "{name}");
            for p in &segs {
                assert!(
                    file_size(p) <= limit.max(max_batch),
                    "{name}: {} too big",
                    p.display()
                );
            }
            assert_eq!(
                s.bytes(),
                segs.iter().map(|p| file_size(p)).sum::<u64>(),
                "{name}"
            );
            let want: Vec<Vec<u8>> = batches.iter().flat_map(|b| owned(b)).collect();
            assert_eq!(drain_records(&s), want, "{name}");
        };
        let one_ten: &[&[u8]] = &[ten];
        check("five per segment", 100, &[one_ten; 12], &[5, 5, 2]);
        check("exactly full closes", 44, &[one_ten; 5], &[2, 2, 1]);
        check(
            "limit zero: one batch per file",
            0,
            &[&[ten, ten], &[ten], &[ten]],
            &[2, 1, 1],
        );
        check(
            "big limit: one file",
            1 << 20,
            &[&[ten, ten, ten], &[ten]],
            &[4],
        );
        check(
            "oversized batch gets its own file",
            30,
            &[&[ten], &[&fifty], &[ten]],
            &[1, 1, 1],
        );
        check(
            "batch never split",
            50,
            &[&[ten], &[ten, ten, ten]],
            &[1, 3],
        );
    }

    #[test]
    fn remove_deletes_and_bytes_decrease() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = spool(tmp.path(), 1 << 20);
        s.append(&[b"one", b"two"]).expect("append");
        s.roll().expect("roll");
        s.append(&[b"three"]).expect("append");
        s.roll().expect("roll");
        s.append(&[b"four"]).expect("append"); // stays open
        let closed = s.closed_segments().expect("list");
        assert_eq!(closed.len(), 2);
        let total = s.bytes();
        let first_size = file_size(&closed[0]);

        s.remove(&closed[0]).expect("remove");
        assert!(!closed[0].exists());
        assert_eq!(s.bytes(), total - first_size);
        assert_eq!(s.closed_segments().expect("list"), closed[1..].to_vec());

        // Idempotent: a second remove is fine and does not double count.
        s.remove(&closed[0]).expect("remove again");
        assert_eq!(s.bytes(), total - first_size);

        s.remove(&closed[1]).expect("remove");
        assert_eq!(s.bytes(), HEADER_LEN + (RECORD_OVERHEAD + 4) as u64);
        assert!(s.closed_segments().expect("list").is_empty());
    }

    #[test]
    fn remove_refuses_open_segment_and_foreign_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = spool(tmp.path(), 1 << 20);
        s.append(&[b"open"]).expect("append");
        let open_path = scan(tmp.path()).expect("scan").remove(0).1;
        let other = tmp.path().join("notes.txt");
        fs::write(&other, b"keep me").expect("write");

        for path in [&open_path, &other] {
            match s.remove(path) {
                Err(SpoolError::Io { source, .. }) => {
                    assert_eq!(source.kind(), io::ErrorKind::InvalidInput)
                }
                Ok(()) => panic!("removed {}", path.display()),
            }
            assert!(path.exists());
        }
        s.roll().expect("roll");
        s.remove(&open_path).expect("remove after roll");
        assert!(s.is_empty());
    }

    #[test]
    fn is_empty_semantics() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = spool(tmp.path(), 1 << 20);
        assert!(s.is_empty(), "fresh");
        assert_eq!(s.bytes(), 0);
        s.append(&[]).expect("empty batch");
        assert!(s.is_empty(), "after empty batch");
        assert!(
            scan(tmp.path()).expect("scan").is_empty(),
            "no file created"
        );
        s.roll().expect("roll of nothing");
        assert!(s.is_empty(), "after rolling nothing");
        assert!(s.closed_segments().expect("list").is_empty());

        s.append(&[b"x"]).expect("append");
        assert!(!s.is_empty(), "open segment has data");
        s.roll().expect("roll");
        assert!(!s.is_empty(), "closed segment");
        drop(s);

        let mut s = spool(tmp.path(), 1 << 20);
        assert!(!s.is_empty(), "segment left from before restart");
        for p in s.closed_segments().expect("list") {
            s.remove(&p).expect("remove");
        }
        assert!(s.is_empty(), "all removed");
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn bad_records_are_refused_without_writing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = spool(tmp.path(), 1 << 20);
        let huge = vec![0u8; MAX_RECORD_BYTES + 1];
        let check = |s: &mut Spool, batch: &[&[u8]]| {
            match s.append(batch) {
                Err(SpoolError::Io { source, .. }) => {
                    assert_eq!(source.kind(), io::ErrorKind::InvalidInput)
                }
                Ok(()) => panic!("accepted a bad batch"),
            }
            assert!(s.is_empty());
            assert_eq!(s.bytes(), 0);
        };
        check(&mut s, &[b"ok", b""]);
        check(&mut s, &[&huge]);
        assert!(scan(tmp.path()).expect("scan").is_empty());
        // The largest allowed record round-trips.
        let max = vec![7u8; MAX_RECORD_BYTES];
        s.append(&[&max]).expect("append max");
        s.roll().expect("roll");
        assert_eq!(drain_records(&s), vec![max]);
    }

    #[test]
    fn names_order_by_seq_and_ignore_strangers() {
        assert_eq!(segment_name(42), "usage-00000000000000000042.spool");
        assert_eq!(segment_name(u64::MAX), "usage-18446744073709551615.spool");
        let check_name = |name: &str, want: Option<u64>| {
            assert_eq!(parse_segment_name(OsStr::new(name)), want, "{name}");
        };
        check_name("usage-00000000000000000042.spool", Some(42));
        check_name("usage-18446744073709551615.spool", Some(u64::MAX));
        check_name("usage-18446744073709551616.spool", None); // overflows u64
        check_name("usage-42.spool", None);
        check_name("usage-000000000000000000042.spool", None); // 21 digits
        check_name("usage-0000000000000000004x.spool", None);
        check_name("usage-+0000000000000000042.spool", None);
        check_name("usage-00000000000000000042.spool.tmp", None);
        check_name("Usage-00000000000000000042.spool", None);

        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let future = now_nanos() + 1_000_000_000_000_000; // ~11 days ahead
                                                          // Written in an order that differs from seq order; 9 < 10 < 100
                                                          // numerically even though "9" > "10" as bare strings.
        for seq in [100, 9, future, 10] {
            let body = encode_all(&[seq.to_string().into_bytes()]);
            fs::write(dir.join(segment_name(seq)), body).expect("write");
        }
        fs::write(dir.join("usage-9.spool"), b"junk").expect("write");
        fs::write(dir.join("README"), b"junk").expect("write");
        fs::create_dir(dir.join(segment_name(5))).expect("mkdir");

        let mut s = spool(dir, 1 << 20);
        let seqs: Vec<u64> = s
            .closed_segments()
            .expect("list")
            .iter()
            .map(|p| seq_of(p))
            .collect();
        assert_eq!(seqs, [9, 10, 100, future]);

        // A new segment sorts after everything, even a seq ahead of the clock.
        s.append(&[b"new"]).expect("append");
        s.roll().expect("roll");
        let s = spool(dir, 1 << 20); // and after a restart too
        let segs = s.closed_segments().expect("list");
        assert_eq!(seq_of(&segs[4]), future + 1);
        let recs = drain_records(&s);
        assert_eq!(recs.last(), Some(&b"new".to_vec()));

        // With nothing on disk, seq starts at the clock.
        let tmp2 = tempfile::tempdir().expect("tempdir");
        let before = now_nanos();
        let mut s = spool(tmp2.path(), 1 << 20);
        s.append(&[b"a"]).expect("append");
        s.roll().expect("roll");
        s.append(&[b"b"]).expect("append");
        s.roll().expect("roll");
        let segs = s.closed_segments().expect("list");
        assert!(seq_of(&segs[0]) >= before);
        assert!(seq_of(&segs[1]) > seq_of(&segs[0]));
    }

    #[test]
    fn open_creates_nested_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a").join("b");
        let mut s = spool(&dir, 1 << 20);
        assert!(dir.is_dir());
        s.append(&[b"x"]).expect("append");
        assert_eq!(s.bytes(), HEADER_LEN + RECORD_OVERHEAD as u64 + 1);
    }

    fn records_strategy() -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6)
    }

    /// End offset of each record in `encode_all(records)`.
    fn record_ends(records: &[Vec<u8>]) -> Vec<usize> {
        records
            .iter()
            .scan(MAGIC.len(), |end, r| {
                *end += RECORD_OVERHEAD + r.len();
                Some(*end)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn prop_random_bytes_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            with_magic in any::<bool>(),
        ) {
            let data = if with_magic { [MAGIC.as_slice(), &data].concat() } else { data };
            let (records, bad_at) = decode(&data);
            if let Some(at) = bad_at {
                prop_assert!(at <= data.len());
            }
            let decoded: usize = records.iter().map(|r| r.len() + RECORD_OVERHEAD).sum();
            prop_assert!(decoded <= data.len());
        }

        #[test]
        fn prop_truncation_recovers_whole_records(records in records_strategy(), cut in any::<prop::sample::Index>()) {
            let data = encode_all(&records);
            let cut = cut.index(data.len() + 1);
            let ends = record_ends(&records);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            let (got, bad_at) = decode(&data[..cut]);
            prop_assert_eq!(&got[..], &records[..whole]);
            let at_boundary = cut == 0 || cut == MAGIC.len() || ends.contains(&cut);
            prop_assert_eq!(bad_at.is_none(), at_boundary);
        }

        #[test]
        fn prop_appended_garbage_keeps_all_records(
            records in records_strategy(),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut data = encode_all(&records);
            data.extend_from_slice(&garbage);
            let (got, _) = decode(&data);
            prop_assert!(got.len() >= records.len());
            prop_assert_eq!(&got[..records.len()], &records[..]);
        }

        #[test]
        fn prop_flipped_byte_keeps_records_before_it(
            records in records_strategy(),
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let mut data = encode_all(&records);
            let at = at.index(data.len());
            data[at] ^= mask;
            // Index of the record holding the flipped byte (or 0 for the header).
            let hit = record_ends(&records).iter().filter(|&&e| e <= at).count();
            let (got, bad_at) = decode(&data);
            // A CRC-32 collision could in theory let a corrupted record through;
            // at 2^-32 per case it does not happen here.
            prop_assert_eq!(&got[..], &records[..hit]);
            prop_assert!(bad_at.is_some());
        }
    }
}
