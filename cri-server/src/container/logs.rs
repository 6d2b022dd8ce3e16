//! Container logs in the CRI format kubelet reads:
//! `<RFC3339Nano timestamp> <stdout|stderr> <P|F> <text>\n`, one record per line; a line longer
//! than the maximum is cut into partial (`P`) records followed by a final (`F`) one.
//!
//! As in containerd's CRI plugin, the daemon (not the shim) writes these: it reads the
//! container's stdout/stderr FIFOs and appends to the log file. kubelet rotates by renaming the
//! file and calling ReopenContainerLog, which is [`CriLog::reopen`]. Writing never blocks the
//! container: if the file cannot be written (directory gone, disk full), the pipe is still
//! drained and the records are dropped with one warning.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One container's log file, shared by its stdout and stderr copiers. The mutex makes each
/// record a single write, so records from the two streams never interleave mid-line.
#[derive(Debug)]
pub struct CriLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
    max_line: usize,
    warned: AtomicBool,
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // 0640, as containerd creates them: kubelet (root) reads, the world does not.
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl CriLog {
    pub fn open(path: &Path, max_line: usize) -> io::Result<Self> {
        let f = open_append(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(Some(f)),
            max_line: max_line.max(1),
            warned: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Open the path again (kubelet renamed the old file away). Records already written stay
    /// in the old file; new ones go to the new one.
    pub fn reopen(&self) -> io::Result<()> {
        let f = open_append(&self.path)?;
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(f);
        self.warned.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Stop writing (container removed); later records are dropped.
    pub fn close(&self) {
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        *g = None;
    }

    /// Write one record, stamped now.
    pub fn write_record(&self, stream: Stream, partial: bool, text: &[u8]) -> io::Result<()> {
        self.write_record_at(SystemTime::now(), stream, partial, text)
    }

    pub fn write_record_at(
        &self,
        at: SystemTime,
        stream: Stream,
        partial: bool,
        text: &[u8],
    ) -> io::Result<()> {
        let mut rec = Vec::with_capacity(text.len() + 48);
        rec.extend_from_slice(format_timestamp(at).as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(stream.as_str().as_bytes());
        rec.extend_from_slice(if partial { b" P " } else { b" F " });
        rec.extend_from_slice(text);
        rec.push(b'\n');
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(f) => f.write_all(&rec),
            None => Ok(()),
        }
    }

    fn warn_once(&self, e: &io::Error) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot write container log; dropping records until reopened");
        }
    }
}

/// Who else reads a container's output as it is copied (its attach hub,
/// `crate::container::attach`). `publish` must never block the copy.
pub trait OutputTap: Send + Sync {
    fn publish(&self, stream: Stream, data: &[u8]);
}

/// The log copier's first read size, and the most it grows to for a chatty stream.
const CHUNK_MIN: usize = 1024;
const CHUNK_MAX: usize = 32 * 1024;

/// How much the copier reads at once: doubles while reads fill it (a chatty stream) and
/// halves when a read uses less than a quarter of it (the stream went quiet again), so one
/// burst does not hold 32 KiB for the rest of the container's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadSize(usize);

impl ReadSize {
    const FIRST: ReadSize = ReadSize(CHUNK_MIN);

    fn after(self, n: usize) -> ReadSize {
        if n >= self.0 {
            ReadSize((self.0 * 2).min(CHUNK_MAX))
        } else if n < self.0 / 4 {
            ReadSize((self.0 / 2).max(CHUNK_MIN))
        } else {
            self
        }
    }
}

/// Copy one stream into the log until EOF, splitting into records. Returns the number of
/// records written (or attempted).
pub async fn copy_stream<R: AsyncRead + Unpin>(
    r: R,
    stream: Stream,
    log: &CriLog,
) -> io::Result<u64> {
    copy_stream_tapped(r, stream, log, None).await
}

/// [`copy_stream`], also offering each chunk read to the container's attach sessions
/// ([`OutputTap`]; never blocks the copy).
pub async fn copy_stream_tapped<R: AsyncRead + Unpin>(
    mut r: R,
    stream: Stream,
    log: &CriLog,
    tap: Option<&dyn OutputTap>,
) -> io::Result<u64> {
    let max = log.max_line;
    // Every container holds two copiers for its whole life and most streams are quiet, so
    // both buffers start small and shrink back: `buf` grows only as far as an unfinished line
    // needs, and the read chunk follows `ReadSize`. Allocated up front, they were 48 KiB per
    // stream, about 190 KiB of crispd's heap per pod of two containers.
    let mut buf: Vec<u8> = Vec::new();
    let mut size = ReadSize::FIRST;
    let mut chunk = vec![0u8; size.0];
    let mut records = 0u64;
    let emit = |partial: bool, text: &[u8], records: &mut u64| {
        *records += 1;
        if let Err(e) = log.write_record(stream, partial, text) {
            log.warn_once(&e);
        }
    };
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        if let Some(t) = tap {
            t.publish(stream, &chunk[..n]);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        loop {
            let rest = &buf[start..];
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) if i <= max => {
                    emit(false, &rest[..i], &mut records);
                    start += i + 1;
                }
                _ if rest.len() >= max => {
                    // No newline within the limit: a partial record of exactly `max` bytes.
                    emit(true, &rest[..max], &mut records);
                    start += max;
                }
                _ => break,
            }
        }
        buf.drain(..start);
        let next = size.after(n);
        if next != size {
            size = next;
            chunk.resize(size.0, 0);
            chunk.shrink_to_fit();
        }
        if buf.is_empty() && buf.capacity() > 2 * size.0 {
            // What a long line or a burst left behind; a chatty stream keeps its buffer.
            buf = Vec::new();
        }
    }
    if !buf.is_empty() {
        // The stream ended without a newline: the last line is still complete.
        emit(false, &buf, &mut records);
    }
    Ok(records)
}

/// Make a FIFO at `path` (mode 0600) for a container's stdout or stderr, as containerd's CRI
/// plugin does before creating the task; the shim opens its write end.
pub fn mkfifo(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Copy a FIFO into the log until every writer has closed it (the container's stdio is gone).
///
/// The read end is opened blocking, on a blocking thread, so the copy starts when the shim
/// opens the write end: a non-blocking open would read EOF before any writer connected. If
/// the container is never started, [`unblock_fifo`] releases the waiting open.
pub async fn copy_fifo(
    path: PathBuf,
    stream: Stream,
    log: std::sync::Arc<CriLog>,
) -> io::Result<u64> {
    let file = tokio::task::spawn_blocking(move || std::fs::File::open(&path))
        .await
        .map_err(io::Error::other)??;
    let rx = tokio::net::unix::pipe::Receiver::from_file(file)?;
    copy_stream(rx, stream, &log).await
}

/// Open a FIFO's read end at once, without waiting for a writer (O_NONBLOCK). Held from
/// before the task is created, it guarantees the container never writes to a FIFO without a
/// reader (which would kill it with SIGPIPE) however late the copy starts.
pub fn open_fifo_reader(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Copy from a FIFO read end opened by [`open_fifo_reader`] until every writer has closed it.
/// Start it only once a writer exists (the task is created): with none it reads EOF at once.
/// `tap`: the container's attach hub, held until the copy ends.
pub async fn copy_from_fifo(
    file: File,
    stream: Stream,
    log: std::sync::Arc<CriLog>,
    tap: Option<std::sync::Arc<dyn OutputTap>>,
) -> io::Result<u64> {
    let rx = tokio::net::unix::pipe::Receiver::from_file(file)?;
    copy_stream_tapped(rx, stream, &log, tap.as_deref()).await
}

/// Open and close the write end once, so a [`copy_fifo`] still waiting in open returns (and
/// then reads EOF). Harmless when the copy is already running: other writers keep it open.
/// Returns false when no reader is waiting yet (the open has not started): call again.
pub fn unblock_fifo(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: fails with ENXIO instead of blocking when there is no reader at all.
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `2006-01-02T15:04:05.000000000Z`: RFC 3339 with nanoseconds, UTC, fixed width (the format
/// containerd writes; kubelet parses it with RFC3339Nano).
pub fn format_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A parsed record: (timestamp, stream, partial, text). For tests and log readers.
pub fn parse_record(line: &str) -> Option<(&str, &str, bool, &str)> {
    let mut it = line.splitn(4, ' ');
    let ts = it.next()?;
    let stream = it.next()?;
    let tag = it.next()?;
    let text = it.next().unwrap_or("");
    let partial = match tag {
        "P" => true,
        "F" => false,
        _ => return None,
    };
    Some((ts, stream, partial, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn records(path: &Path) -> Vec<(String, bool, String)> {
        std::fs::read_to_string(path)
            .expect("read log")
            .lines()
            .map(|l| {
                let (_, s, p, t) = parse_record(l).expect("well-formed record");
                (s.to_string(), p, t.to_string())
            })
            .collect()
    }

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        assert_eq!(
            format_timestamp(UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(format_timestamp(t), "2023-11-14T22:13:20.123456789Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_timestamp(t), "2000-02-29T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(4_102_444_799, 5);
        assert_eq!(format_timestamp(t), "2099-12-31T23:59:59.000000005Z");
    }

    #[tokio::test]
    async fn lines_become_full_records() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = CriLog::open(&d.path().join("pod/ctr/0.log"), 16 * 1024).expect("open");
        let n = copy_stream(
            &b"hello\nworld\n\nlast without newline"[..],
            Stream::Stdout,
            &log,
        )
        .await
        .expect("copy");
        assert_eq!(n, 4);
        assert_eq!(
            records(log.path()),
            vec![
                ("stdout".into(), false, "hello".into()),
                ("stdout".into(), false, "world".into()),
                ("stdout".into(), false, "".into()),
                ("stdout".into(), false, "last without newline".into()),
            ]
        );
    }

    #[tokio::test]
    async fn long_lines_split_into_partials() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = CriLog::open(&d.path().join("0.log"), 10).expect("open");
        let input = b"0123456789abcdefghijXYZ\nshort\n0123456789\n";
        copy_stream(&input[..], Stream::Stderr, &log)
            .await
            .expect("copy");
        assert_eq!(
            records(log.path()),
            vec![
                ("stderr".into(), true, "0123456789".into()),
                ("stderr".into(), true, "abcdefghij".into()),
                ("stderr".into(), false, "XYZ".into()),
                ("stderr".into(), false, "short".into()),
                ("stderr".into(), false, "0123456789".into()),
            ]
        );
    }

    #[tokio::test]
    async fn sixteen_kib_default_and_reassembly() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = CriLog::open(&d.path().join("0.log"), 16 * 1024).expect("open");
        let line = "x".repeat(40_000);
        copy_stream(format!("{line}\n").as_bytes(), Stream::Stdout, &log)
            .await
            .expect("copy");
        let recs = records(log.path());
        assert_eq!(recs.len(), 3);
        assert!(recs[0].1 && recs[1].1 && !recs[2].1);
        assert_eq!(recs[0].2.len(), 16 * 1024);
        let joined: String = recs.iter().map(|r| r.2.as_str()).collect();
        assert_eq!(joined, line);
    }

    /// A chatty stream is read with a growing chunk; lines cut at every chunk boundary
    /// (1 KiB, 2 KiB, … 32 KiB) come out whole and in order.
    #[tokio::test]
    async fn lines_across_growing_reads_stay_whole() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = CriLog::open(&d.path().join("0.log"), 16 * 1024).expect("open");
        let input: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let n = copy_stream(input.as_bytes(), Stream::Stdout, &log)
            .await
            .expect("copy");
        assert_eq!(n, 20_000);
        let recs = records(log.path());
        assert!(recs.iter().all(|r| !r.1), "no partial records");
        let got: Vec<&str> = recs.iter().map(|r| r.2.as_str()).collect();
        let want: Vec<String> = (0..20_000).map(|i| format!("line {i}")).collect();
        assert_eq!(got, want);
    }

    /// Full reads double the chunk up to 32 KiB; reads using under a quarter of it halve it
    /// back to 1 KiB, so a stream that went quiet holds no more than one that never spoke.
    #[test]
    fn read_size_grows_with_full_reads_and_shrinks_when_quiet() {
        let mut s = ReadSize::FIRST;
        let mut seen = vec![s.0];
        for _ in 0..7 {
            s = s.after(s.0);
            seen.push(s.0);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 32, 32].map(|k| k * 1024));
        assert_eq!(s.after(s.0 / 2), s, "a half-full read keeps the size");
        for _ in 0..7 {
            s = s.after(10);
        }
        assert_eq!(s, ReadSize::FIRST);
    }

    /// Input arriving in small pieces (as from a pipe) gives the same records.
    #[tokio::test]
    async fn chunked_input() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = CriLog::open(&d.path().join("0.log"), 8).expect("open");
        let (mut w, r) = tokio::io::duplex(3);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in [&b"ab"[..], b"c\nde", b"fghijkl", b"m\n", b"tail"] {
                w.write_all(piece).await.expect("write");
            }
        });
        copy_stream(r, Stream::Stdout, &log).await.expect("copy");
        writer.await.expect("writer");
        assert_eq!(
            records(log.path()),
            vec![
                ("stdout".into(), false, "abc".into()),
                ("stdout".into(), true, "defghijk".into()),
                ("stdout".into(), false, "lm".into()),
                ("stdout".into(), false, "tail".into()),
            ]
        );
    }

    #[tokio::test]
    async fn reopen_after_rotation_and_close() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("0.log");
        let log = CriLog::open(&path, 1024).expect("open");
        log.write_record(Stream::Stdout, false, b"before")
            .expect("write");
        std::fs::rename(&path, d.path().join("0.log.1")).expect("rotate");
        log.write_record(Stream::Stdout, false, b"still old file")
            .expect("write");
        log.reopen().expect("reopen");
        log.write_record(Stream::Stderr, false, b"after")
            .expect("write");
        assert_eq!(
            records(&path),
            vec![("stderr".into(), false, "after".into())]
        );
        assert_eq!(records(&d.path().join("0.log.1")).len(), 2);
        log.close();
        log.write_record(Stream::Stdout, false, b"dropped")
            .expect("no error after close");
        assert_eq!(records(&path).len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifo_copy_waits_for_the_writer_and_ends_at_its_close() {
        let d = tempfile::tempdir().expect("tempdir");
        let fifo = d.path().join("io/c1-stdout");
        mkfifo(&fifo).expect("mkfifo");
        mkfifo(&fifo).expect("mkfifo is idempotent");
        let log = std::sync::Arc::new(CriLog::open(&d.path().join("0.log"), 1024).expect("open"));
        let copy = tokio::spawn(copy_fifo(
            fifo.clone(),
            Stream::Stdout,
            std::sync::Arc::clone(&log),
        ));
        // The writer (the shim, in life) connects a little later.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let w = fifo.clone();
        std::thread::spawn(move || {
            let mut f = OpenOptions::new()
                .write(true)
                .open(&w)
                .expect("open writer");
            f.write_all(b"one\ntwo\n").expect("write");
        })
        .join()
        .expect("writer");
        let n = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy ends when the writer closes")
            .expect("task")
            .expect("copy");
        assert_eq!(n, 2);
        assert_eq!(records(log.path()).len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unblock_releases_a_copy_whose_writer_never_came() {
        let d = tempfile::tempdir().expect("tempdir");
        let fifo = d.path().join("c1-stderr");
        mkfifo(&fifo).expect("mkfifo");
        assert!(
            !unblock_fifo(&fifo).expect("no reader yet"),
            "nothing to unblock yet"
        );
        let log = std::sync::Arc::new(CriLog::open(&d.path().join("0.log"), 1024).expect("open"));
        let copy = tokio::spawn(copy_fifo(fifo.clone(), Stream::Stderr, log));
        // The copy's open may not have started yet: retry until a reader is there.
        while !unblock_fifo(&fifo).expect("unblock") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("released")
            .expect("task")
            .expect("copy");
        assert_eq!(n, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reader_opened_first_copies_once_a_writer_exists() {
        let d = tempfile::tempdir().expect("tempdir");
        let fifo = d.path().join("c1-stdout");
        mkfifo(&fifo).expect("mkfifo");
        let r = open_fifo_reader(&fifo).expect("opens without a writer");
        // The writer (the container) can open and write before any copy runs: no SIGPIPE.
        let mut w = OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("writer opens: a reader exists");
        w.write_all(b"early\n").expect("write");
        let log = std::sync::Arc::new(CriLog::open(&d.path().join("0.log"), 1024).expect("open"));
        let copy = tokio::spawn(copy_from_fifo(
            r,
            Stream::Stdout,
            std::sync::Arc::clone(&log),
            None,
        ));
        w.write_all(b"late\n").expect("write");
        drop(w);
        let n = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("ends at the writer's close")
            .expect("task")
            .expect("copy");
        assert_eq!(n, 2);
        assert_eq!(
            records(log.path()),
            vec![
                ("stdout".into(), false, "early".into()),
                ("stdout".into(), false, "late".into())
            ]
        );
    }

    #[test]
    fn parse_rejects_bad_tags() {
        assert!(parse_record("2023-01-01T00:00:00.000000000Z stdout X hi").is_none());
        assert_eq!(
            parse_record("2023-01-01T00:00:00.000000000Z stdout F hi there"),
            Some((
                "2023-01-01T00:00:00.000000000Z",
                "stdout",
                false,
                "hi there"
            ))
        );
    }
}
