//! Single flight for slow, retried calls (CRI-O's `resourcestore`, in spirit): when kubelet
//! times out on RunPodSandbox and retries with the same pod, the retry waits for and gets the
//! first call's result instead of "name is reserved". The work runs in its own task, so a
//! caller that gives up (its gRPC call cancelled) does not abort it half-way.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::error::CriError;

type SharedResult<T> = Shared<BoxFuture<'static, Result<T, CriError>>>;

pub struct InFlight<T> {
    map: Arc<Mutex<HashMap<String, SharedResult<T>>>>,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        Self {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T> std::fmt::Debug for InFlight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("InFlight").field("in_flight", &n).finish()
    }
}

/// Whether this caller started the work or joined one already running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Started,
    Joined,
}

impl<T: Clone + Send + Sync + 'static> InFlight<T> {
    /// Run `work` under `key`, or wait for the run already in flight under it.
    pub async fn run<F>(&self, key: &str, work: F) -> (Result<T, CriError>, Role)
    where
        F: Future<Output = Result<T, CriError>> + Send + 'static,
    {
        let (fut, role) = {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = m.get(key) {
                (f.clone(), Role::Joined)
            } else {
                let map = Arc::clone(&self.map);
                let k = key.to_string();
                // The entry is removed by the task itself, after the insert below (it needs the
                // lock we hold), so a finished run never lingers and never vanishes early.
                let handle = tokio::spawn(async move {
                    let r = work.await;
                    map.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
                    r
                });
                let f = async move {
                    handle.await.unwrap_or_else(|e| {
                        Err(CriError::internal(format!("in-flight call failed: {e}")))
                    })
                }
                .boxed()
                .shared();
                m.insert(key.to_string(), f.clone());
                (f, Role::Started)
            }
        };
        (fut.await, role)
    }

    pub fn is_in_flight(&self, key: &str) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn retry_gets_the_first_result() {
        let f: Arc<InFlight<String>> = Arc::new(InFlight::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let work = |runs: Arc<AtomicUsize>| async move {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, CriError>(format!("pod-{n}"))
        };
        let (a, b) = tokio::join!(f.run("ns/web/uid/0", work(Arc::clone(&runs))), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            f.run("ns/web/uid/0", work(Arc::clone(&runs))).await
        });
        assert_eq!(a.0.expect("a"), "pod-0");
        assert_eq!(b.0.expect("b"), "pod-0");
        assert_eq!((a.1, b.1), (Role::Started, Role::Joined));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(!f.is_in_flight("ns/web/uid/0"));
        // Once finished, the key is free: a new call runs again.
        let (c, role) = f.run("ns/web/uid/0", work(Arc::clone(&runs))).await;
        assert_eq!((c.expect("c"), role), ("pod-1".to_string(), Role::Started));
    }

    #[tokio::test]
    async fn a_cancelled_caller_does_not_abort_the_work() {
        let f: Arc<InFlight<u32>> = Arc::new(InFlight::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = Arc::clone(&runs);
        let slow = async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            r2.fetch_add(1, Ordering::SeqCst);
            Ok::<_, CriError>(7)
        };
        // kubelet's deadline passes: the first call is dropped mid-flight.
        let first = tokio::time::timeout(Duration::from_millis(20), f.run("k", slow)).await;
        assert!(first.is_err());
        assert!(f.is_in_flight("k"));
        let (r, role) = f.run("k", async { Ok::<_, CriError>(99) }).await;
        assert_eq!((r.expect("joined"), role), (7, Role::Joined));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn errors_are_shared_too_and_keys_are_independent() {
        let f: InFlight<u32> = InFlight::default();
        let (r, _) = f
            .run("a", async { Err(CriError::precondition("no CNI config")) })
            .await;
        let e = r.expect_err("err");
        assert!(e.message.contains("no CNI config"));
        let (x, y) = tokio::join!(f.run("x", async { Ok(1) }), f.run("y", async { Ok(2) }));
        assert_eq!((x.0.expect("x"), y.0.expect("y")), (1, 2));
        assert_eq!((x.1, y.1), (Role::Started, Role::Started));
    }
}
