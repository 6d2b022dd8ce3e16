//! The decoded records of each table, in memory, so that what kubelet polls every second
//! (ListPodSandbox, ListContainers, ContainerStatus) and crispd's own pod watch are answered
//! without a read transaction and a JSON decode per record per call. The store stays the
//! truth: every commit through [`super::Store`] updates this cache after it is durable, and a
//! table is loaded from the store the first time it is read (or after a write this cache
//! cannot follow record by record, which empties it).

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

/// One table's records by key. `complete` once the whole table was loaded: only then is a
/// missing key a missing record.
#[derive(Default)]
struct TableCache {
    complete: bool,
    rows: BTreeMap<String, Arc<dyn Any + Send + Sync>>,
}

#[derive(Default)]
pub struct Cache {
    tables: RwLock<HashMap<String, TableCache>>,
}

/// What the cache knows about one key.
pub enum Lookup<T> {
    Hit(T),
    /// The table is complete and has no such key.
    Absent,
    /// Not known: read the store.
    Unknown,
}

impl Cache {
    pub fn get<T: Clone + 'static>(&self, table: &str, key: &str) -> Lookup<T> {
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let Some(tc) = t.get(table) else {
            return Lookup::Unknown;
        };
        match tc.rows.get(key).and_then(|r| r.downcast_ref::<T>()) {
            Some(r) => Lookup::Hit(r.clone()),
            None if tc.complete => Lookup::Absent,
            None => Lookup::Unknown,
        }
    }

    /// Every record of a complete table, in key order; `None` if the table is not loaded.
    pub fn list<T: Clone + 'static>(&self, table: &str) -> Option<Vec<(String, T)>> {
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let tc = t.get(table).filter(|tc| tc.complete)?;
        Some(
            tc.rows
                .iter()
                .filter_map(|(k, r)| Some((k.clone(), r.downcast_ref::<T>()?.clone())))
                .collect(),
        )
    }

    /// The whole table as just read from the store (the caller holds the store's write lock,
    /// so no commit can slip in between its read and this).
    pub fn load<T: Send + Sync + Clone + 'static>(&self, table: &str, rows: &[(String, T)]) {
        let mut t = self.tables.write().unwrap_or_else(|p| p.into_inner());
        let tc = t.entry(table.to_string()).or_default();
        tc.rows = rows
            .iter()
            .map(|(k, r)| (k.clone(), Arc::new(r.clone()) as Arc<dyn Any + Send + Sync>))
            .collect();
        tc.complete = true;
    }

    pub fn put<T: Send + Sync + Clone + 'static>(&self, table: &str, key: &str, rec: &T) {
        let mut t = self.tables.write().unwrap_or_else(|p| p.into_inner());
        t.entry(table.to_string())
            .or_default()
            .rows
            .insert(key.to_string(), Arc::new(rec.clone()));
    }

    pub fn remove(&self, table: &str, key: &str) {
        let mut t = self.tables.write().unwrap_or_else(|p| p.into_inner());
        if let Some(tc) = t.get_mut(table) {
            tc.rows.remove(key);
        }
    }

    /// Forget everything: the next read of each table loads it again.
    pub fn clear(&self) {
        self.tables
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_follow_loads_puts_and_removes() {
        let c = Cache::default();
        assert!(matches!(c.get::<u32>("t", "a"), Lookup::Unknown));
        assert!(c.list::<u32>("t").is_none());
        c.put("t", "a", &1u32);
        assert!(matches!(c.get::<u32>("t", "a"), Lookup::Hit(1)));
        // Not loaded yet: a missing key is not known to be absent.
        assert!(matches!(c.get::<u32>("t", "b"), Lookup::Unknown));
        c.load("t", &[("a".to_string(), 1u32), ("c".to_string(), 3u32)]);
        assert!(matches!(c.get::<u32>("t", "b"), Lookup::Absent));
        c.remove("t", "a");
        assert_eq!(c.list::<u32>("t"), Some(vec![("c".to_string(), 3)]));
        c.clear();
        assert!(c.list::<u32>("t").is_none());
    }
}
