//! Single-use tokens that stand for a validated CRI request until the client dials the URL.
//!
//! As kubelet's streaming request cache: random, valid for one minute, at most 1000
//! outstanding (then the CRI call fails with ResourceExhausted), consumed on first use.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;

use super::PendingRequest;

pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Map to gRPC ResourceExhausted.
    #[error("maximum number of in-flight streaming requests ({0}) exceeded")]
    TooManyInFlight(usize),
}

pub struct TokenCache {
    entries: Mutex<HashMap<String, (Instant, PendingRequest)>>,
    ttl: Duration,
    max: usize,
}

impl TokenCache {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            ttl,
            max,
        }
    }

    /// Stores a request and returns its token, after dropping expired entries.
    pub fn insert(&self, req: PendingRequest) -> Result<String, TokenError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        entries.retain(|_, (expires, _)| *expires > now);
        if entries.len() >= self.max {
            return Err(TokenError::TooManyInFlight(self.max));
        }
        let token = loop {
            let mut raw = [0u8; 16];
            rand::rng().fill_bytes(&mut raw);
            let t = URL_SAFE_NO_PAD.encode(raw);
            if !entries.contains_key(&t) {
                break t;
            }
        };
        entries.insert(token.clone(), (now + self.ttl, req));
        Ok(token)
    }

    /// Takes the request out: a token works once, and never after it expired.
    pub fn consume(&self, token: &str) -> Option<PendingRequest> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (expires, req) = entries.remove(token)?;
        (expires > Instant::now()).then_some(req)
    }

    pub fn outstanding(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::PortForwardRequest;

    fn pf() -> PendingRequest {
        PendingRequest::PortForward(PortForwardRequest {
            pod_sandbox_id: "p".into(),
            ports: vec![],
        })
    }

    #[test]
    fn tokens_are_single_use_expire_and_are_bounded() {
        let c = TokenCache::new(Duration::from_millis(50), 3);
        let a = c.insert(pf()).expect("a");
        let b = c.insert(pf()).expect("b");
        assert_ne!(a, b);
        assert!(a.len() >= 22, "128 random bits: {a}");
        assert!(c.consume(&a).is_some());
        assert!(c.consume(&a).is_none(), "reused");
        assert!(c.consume("nope").is_none());
        c.insert(pf()).expect("c");
        c.insert(pf()).expect("d");
        assert_eq!(c.insert(pf()), Err(TokenError::TooManyInFlight(3)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.consume(&b).is_none(), "expired");
        // Expired entries no longer count against the limit.
        c.insert(pf()).expect("room again");
    }
}
