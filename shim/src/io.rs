//! Process stdio: FIFOs, files and a pseudo-terminal.
//!
//! stdout/stderr FIFOs and files are handed to the OCI runtime directly, so the
//! container writes into them without a copy through the shim. stdin goes
//! through a pipe the shim feeds, because the container must see EOF when the
//! client closes stdin (CloseIO), not when a FIFO happens to have no writer.
//! With a terminal, runc sends the pty master over a console socket and the
//! shim copies between it and the FIFOs.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{
            fs::{FileTypeExt, OpenOptionsExt},
            net::UnixListener,
        },
    },
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("open {what} {path}: {err}")]
    Open {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    #[error("stdio URI scheme of {0:?} is not supported (fifo paths and file:// are)")]
    Unsupported(String),
    #[error("console socket: {0}")]
    Console(String),
}

/// What the client asked for, kept for State.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The shim's end of a process's stdio, kept until the process is deleted.
#[derive(Default)]
pub struct ProcessIo {
    stdin: Option<StdinFeed>,
    /// pty master, for ResizePty.
    pub console: Option<Arc<File>>,
    /// A read end of each output FIFO, never read: while the client (crispd, containerd) is
    /// away, e.g. restarting, the FIFO still has a reader, so the container's writes block
    /// when the pipe is full instead of killing it with SIGPIPE (containerd's shim does the
    /// same). Read-only, so the client still sees EOF when the container's writers close.
    keep_readers: Vec<File>,
}

impl ProcessIo {
    /// CloseIO: the container sees EOF on stdin.
    pub fn close_stdin(&mut self) {
        if let Some(feed) = self.stdin.take() {
            feed.close();
        }
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<(), std::io::Error> {
        let Some(console) = &self.console else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "process has no terminal",
            ));
        };
        let ws = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(console.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Copies a stdin FIFO into the pipe the container reads.
struct StdinFeed {
    path: PathBuf,
    closed: Arc<AtomicBool>,
    /// The pipe's write end; dropping it gives the container EOF.
    writer: Arc<Mutex<Option<File>>>,
}

impl StdinFeed {
    fn close(self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        // The copier may still sit in open(2) waiting for a writer: be that
        // writer for an instant so it wakes up, sees `closed` and stops.
        if let Ok(f) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
        {
            drop(f);
        }
    }
}

/// Opens the process's stdio. Returns what the runtime gets as stdin/stdout/stderr
/// and the shim's side. With `terminal`, the runtime gets /dev/null and the
/// caller must pass [`Console::path`] as `--console-socket`.
pub fn open(paths: &StdioPaths) -> Result<([Stdio; 3], ProcessIo), IoError> {
    let mut io = ProcessIo::default();
    if paths.terminal {
        return Ok(([Stdio::null(), Stdio::null(), Stdio::null()], io));
    }
    let stdin = if paths.stdin.is_empty() {
        Stdio::null()
    } else {
        let (r, feed) = stdin_feed(&paths.stdin)?;
        io.stdin = Some(feed);
        Stdio::from(r)
    };
    let stdout = open_output("stdout", &paths.stdout)?;
    let stderr = if !paths.stderr.is_empty() && paths.stderr == paths.stdout {
        match &stdout {
            Some(f) => Some(f.try_clone().map_err(|err| IoError::Open {
                what: "stderr",
                path: paths.stderr.clone(),
                err,
            })?),
            None => None,
        }
    } else {
        open_output("stderr", &paths.stderr)?
    };
    for uri in [&paths.stdout, &paths.stderr] {
        if !uri.is_empty() && std::fs::metadata(uri).is_ok_and(|m| m.file_type().is_fifo()) {
            let keep = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(uri);
            io.keep_readers.push(keep.map_err(|err| IoError::Open {
                what: "fifo keeper",
                path: uri.clone(),
                err,
            })?);
        }
    }
    let to_stdio = |f: Option<File>| f.map(Stdio::from).unwrap_or_else(Stdio::null);
    Ok(([stdin, to_stdio(stdout), to_stdio(stderr)], io))
}

fn open_output(what: &'static str, uri: &str) -> Result<Option<File>, IoError> {
    if uri.is_empty() {
        return Ok(None);
    }
    let err = |err| IoError::Open {
        what,
        path: uri.to_string(),
        err,
    };
    if let Some(path) = uri.strip_prefix("file://") {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(err)?;
        return Ok(Some(f));
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    let is_fifo = std::fs::metadata(uri)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if !is_fifo {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(uri)
            .map_err(err)?;
        return Ok(Some(f));
    }
    // Opening a FIFO write-only blocks until a reader exists. Open it read-write
    // first (never blocks), which makes the write-only open below succeed at
    // once, then drop the read-write one: the container keeps a plain writer and
    // the client's reader sees EOF once the container is gone.
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(uri)
        .map_err(err)?;
    let w = OpenOptions::new().write(true).open(uri).map_err(err)?;
    drop(rw);
    Ok(Some(w))
}

fn stdin_feed(uri: &str) -> Result<(OwnedFd, StdinFeed), IoError> {
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    let (r, w) = nix::unistd::pipe().map_err(|e| IoError::Open {
        what: "stdin pipe",
        path: uri.to_string(),
        err: e.into(),
    })?;
    let writer = Arc::new(Mutex::new(Some(File::from(w))));
    let closed = Arc::new(AtomicBool::new(false));
    let feed = StdinFeed {
        path: PathBuf::from(uri),
        closed: closed.clone(),
        writer: writer.clone(),
    };
    let path = PathBuf::from(uri);
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            // Blocks until the client opens its end.
            let Ok(mut fifo) = File::open(&path) else {
                return;
            };
            let mut buf = [0u8; 32 * 1024];
            loop {
                if closed.load(Ordering::SeqCst) {
                    break;
                }
                let n = match fifo.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let Ok(mut guard) = writer.lock() else { break };
                let Some(w) = guard.as_mut() else { break };
                if w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            if let Ok(mut g) = writer.lock() {
                g.take();
            }
        });
    if let Err(e) = spawned {
        return Err(IoError::Open {
            what: "stdin copier",
            path: uri.to_string(),
            err: e,
        });
    }
    Ok((r, feed))
}

/// A console socket: runc connects and sends the pty master.
pub struct Console {
    dir: PathBuf,
    listener: UnixListener,
}

impl Console {
    pub fn new() -> Result<Console, IoError> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("crisp-pty-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| IoError::Console(e.to_string()))?;
        let listener = UnixListener::bind(dir.join("pty.sock"))
            .map_err(|e| IoError::Console(e.to_string()))?;
        Ok(Console { dir, listener })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("pty.sock")
    }

    /// Receives the master after the runtime's create/exec returned (runc has
    /// connected and sent it by then; the kernel buffers it until we accept).
    pub fn receive(self) -> Result<File, IoError> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        self.listener
            .set_nonblocking(true)
            .map_err(|e| IoError::Console(e.to_string()))?;
        let (stream, _) = self
            .listener
            .accept()
            .map_err(|e| IoError::Console(format!("runtime sent no terminal: {e}")))?;
        stream
            .set_nonblocking(false)
            .map_err(|e| IoError::Console(e.to_string()))?;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(|e| IoError::Console(e.to_string()))?;
        for c in msg.cmsgs().map_err(|e| IoError::Console(e.to_string()))? {
            if let ControlMessageOwned::ScmRights(fds) = c
                && let Some(&fd) = fds.first()
            {
                // SAFETY: SCM_RIGHTS just installed `fd` in our table; we own it.
                return Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
        Err(IoError::Console(
            "no file descriptor in the console message".into(),
        ))
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Wires a pty master to the process's FIFOs: master → stdout, stdin → master.
pub fn attach_console(master: File, paths: &StdioPaths, io: &mut ProcessIo) -> Result<(), IoError> {
    let master = Arc::new(master);
    if let Some(out) = open_output("stdout", &paths.stdout)? {
        let m = master.clone();
        let _ = std::thread::Builder::new()
            .name("pty-out".into())
            .spawn(move || {
                let mut out = out;
                let mut buf = [0u8; 32 * 1024];
                let mut reader: &File = &m;
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
    }
    if !paths.stdin.is_empty() {
        let m = master.clone();
        let path = PathBuf::from(&paths.stdin);
        let closed = Arc::new(AtomicBool::new(false));
        let writer: Arc<Mutex<Option<File>>> = Arc::new(Mutex::new(None));
        io.stdin = Some(StdinFeed {
            path: path.clone(),
            closed: closed.clone(),
            writer,
        });
        let _ = std::thread::Builder::new()
            .name("pty-in".into())
            .spawn(move || {
                let Ok(mut fifo) = File::open(&path) else {
                    return;
                };
                let mut buf = [0u8; 32 * 1024];
                let mut w: &File = &m;
                while !closed.load(Ordering::SeqCst) {
                    match fifo.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
    }
    io.console = Some(master);
    Ok(())
}

/// Whether `path` names something the shim can open as stdio at all.
pub fn is_supported(uri: &str) -> bool {
    uri.is_empty() || uri.starts_with("file://") || !uri.contains("://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_output_opens_without_a_reader_and_file_uris_append() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("reader");
        let w = open_output("stdout", fifo.to_str().expect("utf8"))
            .expect("open")
            .expect("some");
        (&w).write_all(b"hello").expect("write");
        let mut got = [0u8; 5];
        (&reader).read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");

        let file = dir.path().join("log");
        let uri = format!("file://{}", file.display());
        let f = open_output("stdout", &uri).expect("open").expect("some");
        (&f).write_all(b"a\n").expect("write");
        assert_eq!(std::fs::read(&file).expect("read"), b"a\n");
        assert!(open_output("stdout", "binary:///bin/logger").is_err());
    }

    #[test]
    fn output_fifo_keeps_a_reader_so_a_gone_client_is_no_sigpipe() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let client = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("reader");
        let paths = StdioPaths {
            stdout: fifo.display().to_string(),
            ..Default::default()
        };
        let ([_, out, _], pio) = open(&paths).expect("open");
        drop(client); // the client goes away (crispd killed)
        // The writer the container gets still has a reader: no EPIPE.
        let w = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("writer");
        (&w).write_all(b"still fine")
            .expect("no EPIPE while the shim keeps a reader");
        drop((out, w, pio));
    }

    #[test]
    fn stdin_eof_on_close() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("in");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let (r, feed) = stdin_feed(fifo.to_str().expect("utf8")).expect("feed");
        // Nobody ever opened the FIFO for writing: close must still give EOF.
        feed.close();
        let mut r = File::from(r);
        let mut s = String::new();
        r.read_to_string(&mut s).expect("eof");
        assert_eq!(s, "");
    }
}
