//! A failpoint for tests: a slow disk under the store's commits.
//!
//! `CRISP_FAILPOINT_SLOW_COMMIT=<ms>/<n>` makes every n-th commit wait `<ms>` milliseconds
//! after its writes and before its fsync, holding the write lock as a slow disk would. The
//! soak sets it to prove that a slow disk delays only the calls that write, never the ones
//! answered from memory, and that no deadline is missed because of it. Unset, nothing is
//! slowed; a value that does not parse stops crispd at start-up (a failpoint silently off
//! would make a test prove nothing).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const ENV: &str = "CRISP_FAILPOINT_SLOW_COMMIT";

#[derive(Debug)]
pub struct SlowDisk {
    delay: Duration,
    every: u64,
    commits: AtomicU64,
    slowed: AtomicU64,
}

impl SlowDisk {
    /// From [`ENV`]: `None` when unset; an error naming the variable and value when malformed.
    pub fn from_env() -> Result<Option<SlowDisk>, String> {
        match std::env::var(ENV) {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(format!("{ENV}: {e}")),
            Ok(v) => SlowDisk::parse(&v).map(Some),
        }
    }

    pub fn parse(v: &str) -> Result<SlowDisk, String> {
        let bad = || format!("{ENV}={v:?}: want <milliseconds>/<every n-th commit>, e.g. 250/20");
        let (ms, every) = v.trim().split_once('/').ok_or_else(bad)?;
        let ms: u64 = ms.trim().parse().map_err(|_| bad())?;
        let every: u64 = every.trim().parse().map_err(|_| bad())?;
        if every == 0 || ms == 0 || ms > 60_000 {
            return Err(bad());
        }
        Ok(SlowDisk {
            delay: Duration::from_millis(ms),
            every,
            commits: AtomicU64::new(0),
            slowed: AtomicU64::new(0),
        })
    }

    /// Called by each commit before it makes its writes durable.
    pub fn before_sync(&self) {
        let n = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(self.every) {
            let slowed = self.slowed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(
                commit = n,
                slowed,
                delay_ms = self.delay.as_millis() as u64,
                "failpoint: slow store commit"
            );
            std::thread::sleep(self.delay);
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "every {}th store commit waits {:?} before its fsync",
            self.every, self.delay
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_delay_and_period_and_refuses_the_rest() {
        let s = SlowDisk::parse("250/20").expect("parse");
        assert_eq!((s.delay, s.every), (Duration::from_millis(250), 20));
        for bad in ["", "250", "x/2", "250/0", "0/3", "250/-1", "999999/1"] {
            let e = SlowDisk::parse(bad).expect_err(bad);
            assert!(e.contains(ENV) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn slows_exactly_every_nth_commit() {
        let s = SlowDisk::parse("1/3").expect("parse");
        let t = std::time::Instant::now();
        for _ in 0..9 {
            s.before_sync();
        }
        assert_eq!(s.slowed.load(Ordering::Relaxed), 3);
        assert!(t.elapsed() >= Duration::from_millis(3));
    }
}
