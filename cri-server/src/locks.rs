//! Per-object async locks (one per pod, one per container), so unrelated objects never wait
//! for each other.

use std::sync::Arc;

/// Per-object async locks, created on demand and dropped when no one holds them, so
/// unrelated pods never wait for each other and the map does not grow without bound.
#[derive(Debug, Default)]
pub struct ObjectLocks {
    map: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ObjectLocks {
    pub async fn lock(&self, id: &str) -> ObjectGuard<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(id.to_string()).or_default())
        };
        let guard = Arc::clone(&m).lock_owned().await;
        ObjectGuard {
            locks: self,
            id: id.to_string(),
            guard: Some(guard),
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct ObjectGuard<'a> {
    locks: &'a ObjectLocks,
    id: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ObjectGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it now: nobody waits, so the entry can go.
        if map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.id);
        }
    }
}
