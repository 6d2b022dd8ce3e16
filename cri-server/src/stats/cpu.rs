//! CPU rates: the difference between two samples of a cumulative CPU counter, and the last
//! sample of each container and pod the stats calls keep for it.

use std::collections::HashMap;
use std::sync::Mutex;

/// CPU rate between two samples `(timestamp ns, cumulative cpu ns)`, in nano-cores
/// (1e9 = one full core). The first sample, a clock going backwards or a counter reset gives 0.
pub fn nano_cores(prev: Option<(i64, u64)>, now: (i64, u64)) -> u64 {
    let Some((t0, c0)) = prev else { return 0 };
    let dt = now.0 - t0;
    if dt <= 0 || now.1 < c0 {
        return 0;
    }
    ((now.1 - c0) as f64 / dt as f64 * 1e9) as u64
}

/// The previous CPU sample `(timestamp ns, cumulative cpu ns)` of each container or pod, for
/// [`nano_cores`] (a rate needs two samples). A cache of the last answer that nothing else
/// reads; the daemon owns one for containers and one for pods, so two daemons in one
/// process keep their own. Pruned to what still exists on every List call.
#[derive(Debug, Default)]
pub struct CpuSamples {
    map: Mutex<HashMap<String, (i64, u64)>>,
}

impl CpuSamples {
    /// Record `now` as `id`'s sample and return the one it replaces.
    pub fn record(&self, id: &str, now: (i64, u64)) -> Option<(i64, u64)> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(id.to_string(), now)
    }

    /// Forget the samples of ids `live` says no longer exist, so the map does not grow with
    /// every container or pod ever seen.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|id, _| live(id));
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nano_cores_from_two_samples() {
        assert_eq!(nano_cores(None, (1_000, 5)), 0, "first sample");
        // Half a core: 0.5 s of CPU over 1 s.
        assert_eq!(
            nano_cores(Some((0, 1_000_000_000)), (1_000_000_000, 1_500_000_000)),
            500_000_000
        );
        // Two full cores.
        assert_eq!(
            nano_cores(Some((0, 0)), (500_000_000, 1_000_000_000)),
            2_000_000_000
        );
        assert_eq!(nano_cores(Some((10, 0)), (10, 100)), 0, "no time passed");
        assert_eq!(nano_cores(Some((10, 100)), (20, 50)), 0, "counter reset");
    }
}
