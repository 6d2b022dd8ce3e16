//! Pod user-namespace ID maps (promise 1: ID ranges never overlap).
//!
//! When a pod asks for a user namespace without mappings, crispd gives it 65536 contiguous
//! host uids and gids from the configured user's /etc/subuid and /etc/subgid ranges. The
//! allocation reads every live range and writes the new one in ONE store write transaction;
//! redb serialises write transactions, so two concurrent RunPodSandbox calls cannot pick the
//! same range (Incus's "uid range not allowed" incident was two launches racing on a file).
//! Ranges are keyed by pod id, released on RemovePodSandbox, and survive restarts because they
//! live in the store. Mappings that kubelet passes are validated and used as given.

use std::path::{Path, PathBuf};

use crisp_proto::cri::v1::{IdMapping, NamespaceMode, UserNamespace};

use crate::error::{ErrorKind, HasKind};
use crate::store::records::IdRangeRecord;
use crate::store::{self, ID_RANGES, Record, Store, StoreError};

/// IDs per pod: the full 16-bit space a container image expects.
pub const POD_RANGE: u32 = 65536;

#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error("reading {path} (setting `userns.{key}`): {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no subordinate {what} range for user `{user}` in {path} (setting `userns.user`); add a line like `{user}:1000000:65536000`"
    )]
    NoRanges {
        what: &'static str,
        user: String,
        path: PathBuf,
    },
    #[error(
        "subordinate {what} IDs exhausted: {in_use} ranges of {POD_RANGE} are in use and no free {POD_RANGE} contiguous IDs remain in {path}"
    )]
    Exhausted {
        what: &'static str,
        in_use: usize,
        path: PathBuf,
    },
    #[error("invalid user namespace mapping: {0}")]
    InvalidMapping(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl HasKind for IdMapError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Read { .. } | Self::NoRanges { .. } => ErrorKind::FailedPrecondition,
            Self::Exhausted { .. } => ErrorKind::ResourceExhausted,
            Self::InvalidMapping(_) => ErrorKind::InvalidArgument,
            Self::Store(e) => e.kind(),
        }
    }
}

/// One `start:count` range of a subordinate ID file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubRange {
    pub start: u32,
    pub count: u32,
}

impl SubRange {
    fn end(self) -> u64 {
        u64::from(self.start) + u64::from(self.count)
    }
}

/// Parse /etc/subuid or /etc/subgid content: `name-or-uid:start:count` per line; `#` comments
/// and malformed lines are skipped (they belong to other tools, not to us to reject).
pub fn parse_subid(text: &str, user: &str, uid: Option<u32>) -> Vec<SubRange> {
    let uid_s = uid.map(|u| u.to_string());
    let mut out: Vec<SubRange> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split(':');
            let (name, start, count) = (it.next()?, it.next()?, it.next()?);
            if name != user && Some(name) != uid_s.as_deref() {
                return None;
            }
            let r = SubRange {
                start: start.trim().parse().ok()?,
                count: count.trim().parse().ok()?,
            };
            (r.count > 0 && r.end() <= u64::from(u32::MAX) + 1).then_some(r)
        })
        .collect();
    out.sort();
    out
}

/// The lowest `len`-sized window inside one of `ranges` that overlaps none of `taken`
/// (half-open `(start, len)` pairs).
pub fn first_fit(ranges: &[SubRange], taken: &[(u32, u32)], len: u32) -> Option<u32> {
    let mut taken: Vec<(u64, u64)> = taken
        .iter()
        .map(|&(s, l)| (u64::from(s), u64::from(s) + u64::from(l)))
        .collect();
    taken.sort();
    for r in ranges {
        let mut cand = u64::from(r.start);
        // Walk the taken intervals in order, jumping past each one that overlaps the window.
        for &(ts, te) in &taken {
            if te <= cand {
                continue;
            }
            if ts >= cand + u64::from(len) {
                break;
            }
            cand = te;
        }
        if cand + u64::from(len) <= r.end() {
            return u32::try_from(cand).ok();
        }
    }
    None
}

/// The maps a pod's user namespace gets: what goes into the OCI spec's uidMappings/gidMappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdMap {
    pub uids: Vec<IdMapping>,
    pub gids: Vec<IdMapping>,
    /// Whether crispd allocated it (and so must release it).
    pub allocated: bool,
}

#[derive(Debug, Clone)]
pub struct Allocator {
    store: Store,
    user: String,
    subuid: PathBuf,
    subgid: PathBuf,
}

impl Allocator {
    pub fn new(store: Store, user: String, subuid: PathBuf, subgid: PathBuf) -> Self {
        Self {
            store,
            user,
            subuid,
            subgid,
        }
    }

    fn ranges(
        &self,
        key: &'static str,
        what: &'static str,
        path: &Path,
    ) -> Result<Vec<SubRange>, IdMapError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdMapError::Read {
            key,
            path: path.to_path_buf(),
            source,
        })?;
        let uid = nix::unistd::User::from_name(&self.user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw());
        let r = parse_subid(&text, &self.user, uid);
        if r.is_empty() {
            return Err(IdMapError::NoRanges {
                what,
                user: self.user.clone(),
                path: path.to_path_buf(),
            });
        }
        Ok(r)
    }

    /// Allocate (or return the already allocated) range for `pod_id`, in one transaction.
    pub fn allocate(&self, pod_id: &str) -> Result<IdRangeRecord, IdMapError> {
        // The files are read outside the transaction: they are configuration, not our state.
        let uranges = self.ranges("subuid_file", "uid", &self.subuid)?;
        let granges = self.ranges("subgid_file", "gid", &self.subgid)?;
        self.store.write(|txn| {
            let live = store::list_raw_in(txn, ID_RANGES)?;
            let mut taken_u = Vec::with_capacity(live.len());
            let mut taken_g = Vec::with_capacity(live.len());
            for (key, bytes) in &live {
                match store::decode::<IdRangeRecord>(bytes) {
                    Ok(r) if key == pod_id => return Ok(r), // idempotent retry
                    Ok(r) => {
                        taken_u.push((r.host_uid, r.len));
                        taken_g.push((r.host_gid, r.len));
                    }
                    Err(why) => {
                        // An unreadable range record may still be somebody's live range; we
                        // cannot know which IDs it covers, so refuse rather than risk overlap.
                        return Err(IdMapError::Store(StoreError::Encode {
                            table: "id_ranges".into(),
                            key: key.clone(),
                            source: serde_json::Error::io(std::io::Error::other(why)),
                        }));
                    }
                }
            }
            let in_use = live.len();
            let host_uid =
                first_fit(&uranges, &taken_u, POD_RANGE).ok_or_else(|| IdMapError::Exhausted {
                    what: "uid",
                    in_use,
                    path: self.subuid.clone(),
                })?;
            let host_gid =
                first_fit(&granges, &taken_g, POD_RANGE).ok_or_else(|| IdMapError::Exhausted {
                    what: "gid",
                    in_use,
                    path: self.subgid.clone(),
                })?;
            let rec = IdRangeRecord {
                host_uid,
                host_gid,
                len: POD_RANGE,
            };
            store::put_in(txn, pod_id, &rec)?;
            Ok(rec)
        })
    }

    /// Release a pod's range; idempotent.
    pub fn release(&self, pod_id: &str) -> Result<bool, IdMapError> {
        Ok(self.store.delete::<IdRangeRecord>(pod_id)?)
    }

    pub fn get(&self, pod_id: &str) -> Result<Option<IdRangeRecord>, IdMapError> {
        Ok(self.store.get::<IdRangeRecord>(pod_id)?)
    }

    pub fn in_use(&self) -> Result<u64, IdMapError> {
        Ok(self.store.count(<IdRangeRecord as Record>::TABLE)?)
    }

    /// Decide a pod's ID map from its `userns_options`: `None` when it shares the host's user
    /// namespace; kubelet's mappings validated and used as given; otherwise allocated here.
    pub fn for_pod(
        &self,
        pod_id: &str,
        opts: Option<&UserNamespace>,
    ) -> Result<Option<PodIdMap>, IdMapError> {
        let Some(opts) = opts else { return Ok(None) };
        match NamespaceMode::try_from(opts.mode) {
            Ok(NamespaceMode::Node) => Ok(None),
            Ok(NamespaceMode::Pod) => {
                if opts.uids.is_empty() && opts.gids.is_empty() {
                    let r = self.allocate(pod_id)?;
                    Ok(Some(PodIdMap {
                        uids: vec![IdMapping {
                            host_id: r.host_uid,
                            container_id: 0,
                            length: r.len,
                        }],
                        gids: vec![IdMapping {
                            host_id: r.host_gid,
                            container_id: 0,
                            length: r.len,
                        }],
                        allocated: true,
                    }))
                } else {
                    validate_mappings("uids", &opts.uids)?;
                    validate_mappings("gids", &opts.gids)?;
                    Ok(Some(PodIdMap {
                        uids: opts.uids.clone(),
                        gids: opts.gids.clone(),
                        allocated: false,
                    }))
                }
            }
            Ok(other) => Err(IdMapError::InvalidMapping(format!(
                "userns_options.mode {} is not supported for a pod (use POD or NODE)",
                other.as_str_name()
            ))),
            Err(_) => Err(IdMapError::InvalidMapping(format!(
                "unknown userns_options.mode {}",
                opts.mode
            ))),
        }
    }
}

/// Check kubelet-provided mappings: present, non-empty, no overflow, no overlap on either side,
/// container ID 0 mapped (a pod needs a root inside).
pub fn validate_mappings(field: &str, maps: &[IdMapping]) -> Result<(), IdMapError> {
    let bad = |m: String| IdMapError::InvalidMapping(format!("userns_options.{field}: {m}"));
    if maps.is_empty() {
        return Err(bad(
            "empty while the other list is not; give both or neither".into(),
        ));
    }
    if maps.len() > 340 {
        // The kernel's limit on lines in uid_map/gid_map.
        return Err(bad(format!(
            "{} mappings; the kernel allows 340",
            maps.len()
        )));
    }
    for (i, m) in maps.iter().enumerate() {
        if m.length == 0 {
            return Err(bad(format!("[{i}] has length 0")));
        }
        for (side, start) in [("host_id", m.host_id), ("container_id", m.container_id)] {
            if u64::from(start) + u64::from(m.length) > u64::from(u32::MAX) {
                return Err(bad(format!(
                    "[{i}] {side} {start} + length {} overflows",
                    m.length
                )));
            }
        }
    }
    let overlaps = |key: fn(&IdMapping) -> u32| {
        let mut v: Vec<(u64, u64)> = maps
            .iter()
            .map(|m| (u64::from(key(m)), u64::from(key(m)) + u64::from(m.length)))
            .collect();
        v.sort();
        v.windows(2).any(|w| w[1].0 < w[0].1)
    };
    if overlaps(|m| m.host_id) {
        return Err(bad("host ID ranges overlap".into()));
    }
    if overlaps(|m| m.container_id) {
        return Err(bad("container ID ranges overlap".into()));
    }
    if !maps.iter().any(|m| m.container_id == 0) {
        return Err(bad("container ID 0 is not mapped".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    fn setup(subuid: &str, subgid: &str) -> (tempfile::TempDir, Allocator) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("subuid"), subuid).expect("write");
        std::fs::write(dir.path().join("subgid"), subgid).expect("write");
        let store = Store::open(&dir.path().join("crisp.db")).expect("store");
        let a = Allocator::new(
            store,
            "crisp".into(),
            dir.path().join("subuid"),
            dir.path().join("subgid"),
        );
        (dir, a)
    }

    #[test]
    fn parses_only_the_users_ranges() {
        let text = "# comment\nalice:100000:65536\ncrisp:200000:131072\nbroken line\ncrisp:x:1\n1234:500000:65536\ncrisp:0:0\n";
        assert_eq!(
            parse_subid(text, "crisp", None),
            vec![SubRange {
                start: 200000,
                count: 131072
            }]
        );
        assert_eq!(
            parse_subid(text, "crisp", Some(1234)),
            vec![
                SubRange {
                    start: 200000,
                    count: 131072
                },
                SubRange {
                    start: 500000,
                    count: 65536
                }
            ]
        );
    }

    #[test]
    fn first_fit_skips_taken_and_respects_range_ends() {
        let r = [
            SubRange {
                start: 100,
                count: 30,
            },
            SubRange {
                start: 1000,
                count: 10,
            },
        ];
        assert_eq!(first_fit(&r, &[], 10), Some(100));
        assert_eq!(first_fit(&r, &[(100, 10)], 10), Some(110));
        assert_eq!(first_fit(&r, &[(105, 10)], 10), Some(115));
        assert_eq!(first_fit(&r, &[(100, 10), (120, 10)], 10), Some(110));
        assert_eq!(
            first_fit(&r, &[(100, 10), (110, 10), (120, 10)], 10),
            Some(1000)
        );
        assert_eq!(first_fit(&r, &[(100, 30), (1000, 10)], 10), None);
        assert_eq!(
            first_fit(&r, &[], 31),
            None,
            "a window never spans two ranges"
        );
    }

    #[test]
    fn allocate_release_reuse_and_survive_reopen() {
        let (dir, a) = setup("crisp:100000:196608\n", "crisp:300000:196608\n");
        let r1 = a.allocate("p1").expect("p1");
        assert_eq!(
            (r1.host_uid, r1.host_gid, r1.len),
            (100000, 300000, POD_RANGE)
        );
        assert_eq!(
            a.allocate("p1").expect("retry"),
            r1,
            "retry returns the same range"
        );
        let r2 = a.allocate("p2").expect("p2");
        assert_eq!(r2.host_uid, 100000 + POD_RANGE);
        assert!(a.release("p1").expect("release"));
        assert!(!a.release("p1").expect("release twice"));
        let r3 = a.allocate("p3").expect("p3");
        assert_eq!(r3.host_uid, 100000, "released range is reused");
        drop(a);
        let store = Store::open(&dir.path().join("crisp.db")).expect("reopen");
        let a = Allocator::new(
            store,
            "crisp".into(),
            dir.path().join("subuid"),
            dir.path().join("subgid"),
        );
        assert_eq!(a.get("p2").expect("get"), Some(r2));
        assert_eq!(a.in_use().expect("count"), 2);
        let r4 = a.allocate("p4").expect("p4");
        assert_eq!(r4.host_uid, 100000 + 2 * POD_RANGE);
    }

    #[test]
    fn exhaustion_says_how_many_are_in_use() {
        let (_d, a) = setup("crisp:100000:131072\n", "crisp:100000:131072\n");
        a.allocate("a").expect("a");
        a.allocate("b").expect("b");
        let e = a.allocate("c").expect_err("full");
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(e.to_string().contains("2 ranges"), "{e}");
    }

    #[test]
    fn missing_user_is_a_precondition_naming_the_setting() {
        let (_d, a) = setup("alice:100000:65536\n", "alice:100000:65536\n");
        let e = a.allocate("p").expect_err("no ranges");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(
            e.to_string().contains("userns.user") && e.to_string().contains("crisp"),
            "{e}"
        );
    }

    /// Promise 1: many threads allocating at once never get overlapping ranges.
    #[test]
    fn concurrent_allocations_never_overlap() {
        // Room for exactly 128 pods, and 128 allocations racing for it.
        let (_d, a) = setup("crisp:100000:8388608\n", "crisp:100000:8388608\n");
        let a = Arc::new(a);
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let a = Arc::clone(&a);
                std::thread::spawn(move || {
                    (0..8)
                        .map(|i| a.allocate(&format!("pod-{t}-{i}")).expect("allocate"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<IdRangeRecord> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        assert_eq!(all.len(), 128);
        assert!(all.iter().all(|r| r.host_uid + r.len <= 100000 + 8388608));
        all.sort_by_key(|r| r.host_uid);
        for w in all.windows(2) {
            assert!(
                w[0].host_uid + w[0].len <= w[1].host_uid,
                "uid overlap {w:?}"
            );
        }
        let gids: HashSet<u32> = all.iter().map(|r| r.host_gid).collect();
        assert_eq!(gids.len(), all.len(), "gid starts unique");
        let e = a.allocate("one-too-many").expect_err("full");
        assert!(e.to_string().contains("128 ranges"), "{e}");
    }

    #[test]
    fn kubelet_mappings_are_validated_and_used_as_given() {
        let (_d, a) = setup("crisp:100000:65536\n", "crisp:100000:65536\n");
        let m = |h, c, l| IdMapping {
            host_id: h,
            container_id: c,
            length: l,
        };
        let ok = UserNamespace {
            mode: NamespaceMode::Pod as i32,
            uids: vec![m(2_000_000, 0, 65536)],
            gids: vec![m(2_000_000, 0, 65536)],
        };
        let got = a.for_pod("p", Some(&ok)).expect("ok").expect("userns");
        assert!(!got.allocated);
        assert_eq!(got.uids, ok.uids);
        assert_eq!(
            a.in_use().expect("count"),
            0,
            "kubelet's maps are not allocated by us"
        );

        for (uids, gids, needle) in [
            (vec![m(1, 0, 0)], vec![m(1, 0, 1)], "length 0"),
            (
                vec![m(1, 0, 10), m(5, 10, 10)],
                vec![m(1, 0, 1)],
                "host ID ranges overlap",
            ),
            (
                vec![m(1, 0, 10), m(100, 5, 10)],
                vec![m(1, 0, 1)],
                "container ID ranges overlap",
            ),
            (vec![m(1, 1, 10)], vec![m(1, 0, 1)], "container ID 0"),
            (vec![m(u32::MAX - 1, 0, 10)], vec![m(1, 0, 1)], "overflows"),
            (vec![m(1, 0, 10)], vec![], "gids: empty"),
        ] {
            let o = UserNamespace {
                mode: NamespaceMode::Pod as i32,
                uids,
                gids,
            };
            let e = a.for_pod("p", Some(&o)).expect_err(needle);
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.to_string().contains(needle), "{e} !~ {needle}");
        }
    }

    #[test]
    fn modes() {
        let (_d, a) = setup("crisp:100000:65536\n", "crisp:100000:65536\n");
        assert_eq!(a.for_pod("p", None).expect("none"), None);
        let node = UserNamespace {
            mode: NamespaceMode::Node as i32,
            ..Default::default()
        };
        assert_eq!(a.for_pod("p", Some(&node)).expect("node"), None);
        let pod = UserNamespace {
            mode: NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let got = a.for_pod("p", Some(&pod)).expect("pod").expect("userns");
        assert!(got.allocated);
        assert_eq!(got.uids[0].host_id, 100000);
        let target = UserNamespace {
            mode: NamespaceMode::Target as i32,
            ..Default::default()
        };
        assert_eq!(
            a.for_pod("q", Some(&target)).expect_err("target").kind(),
            ErrorKind::InvalidArgument
        );
    }
}
