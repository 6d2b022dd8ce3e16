//! Failpoints: named places where tests make the snapshotter fail or crash between two steps.
//!
//! Armed either in-process with [`set`] or through the environment:
//! `CRISP_FAILPOINT=snapshotter.prepare.after_rename[=abort|error][,other...]`. The default
//! action is `abort`, which kills the process on the spot (a crash, for tests that run the
//! snapshotter in a child process and reopen the store afterwards); `error` makes the call fail.
//!
//! Names: `snapshotter.prepare.before_rename`, `snapshotter.prepare.after_rename`,
//! `snapshotter.commit.before_commit`, `snapshotter.remove.after_commit`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::error::Error;

/// What a failpoint does when hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `std::process::abort()`: a crash.
    Abort,
    /// Return [`Error::Failpoint`].
    Error,
}

fn registry() -> &'static Mutex<HashMap<String, Action>> {
    static R: OnceLock<Mutex<HashMap<String, Action>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Arms a failpoint in this process.
pub fn set(name: &str, action: Action) {
    if let Ok(mut r) = registry().lock() {
        r.insert(name.to_string(), action);
    }
}

/// Disarms a failpoint.
pub fn clear(name: &str) {
    if let Ok(mut r) = registry().lock() {
        r.remove(name);
    }
}

fn from_env(name: &str) -> Option<Action> {
    let v = std::env::var("CRISP_FAILPOINT").ok()?;
    v.split(',').find_map(|item| {
        let (n, a) = item.split_once('=').unwrap_or((item, "abort"));
        (n.trim() == name).then(|| {
            if a.trim() == "error" {
                Action::Error
            } else {
                Action::Abort
            }
        })
    })
}

/// Called at each named place.
pub(crate) fn hit(name: &str) -> Result<(), Error> {
    let armed = registry()
        .lock()
        .ok()
        .and_then(|r| r.get(name).copied())
        .or_else(|| from_env(name));
    match armed {
        None => Ok(()),
        Some(Action::Error) => {
            tracing::warn!(failpoint = name, "failpoint: error");
            Err(Error::Failpoint(name.to_string()))
        }
        Some(Action::Abort) => {
            tracing::warn!(failpoint = name, "failpoint: abort");
            std::process::abort()
        }
    }
}
