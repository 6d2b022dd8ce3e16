//! What the CRI calls share: the configuration, the store and the small services that own
//! their own state. Deliberately not a god object: each field is a service with its own
//! locking, and CRI call modules take only what they use.

use std::sync::{Arc, RwLock};

use crate::cni::CniManager;
use crate::config::Config;
use crate::store::Store;

/// Something found missing during start-up that is not fatal (promise 4): reported by Status
/// and named by the calls that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The setting involved, e.g. `runtime_handlers.kata.binary`.
    pub key: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Conditions {
    inner: RwLock<Vec<Condition>>,
}

impl Conditions {
    pub fn set(&self, list: Vec<Condition>) {
        match self.inner.write() {
            Ok(mut g) => *g = list,
            Err(p) => *p.into_inner() = list,
        }
    }

    pub fn list(&self) -> Vec<Condition> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The problem recorded for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Condition> {
        self.list().into_iter().find(|c| c.key == key)
    }
}

#[derive(Debug)]
pub struct Daemon {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub cni: Arc<CniManager>,
    pub conditions: Conditions,
}

impl Daemon {
    pub fn new(cfg: Arc<Config>, store: Store, cni: Arc<CniManager>) -> Self {
        Self {
            cfg,
            store,
            cni,
            conditions: Conditions::default(),
        }
    }
}
