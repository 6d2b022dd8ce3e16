//! RunPodSandbox's work, once `cri::run_pod` has checked what the pod needs exists *now*
//! (promise 4): record (Creating, owning up front all it will acquire), ID range, netns, then
//! two branches at once — CNI ADD, and the pod's files, the shim and the pause process through
//! the shim's sandbox service (CreateSandbox with the pause's OCI spec, StartSandbox) — and
//! the record Ready with the shim's address in one commit. Neither branch needs the other's
//! result: the pause joins the netns by path, and eth0 is only needed once containers run,
//! after RunPodSandbox returns. A user-namespaced pod runs them in line instead (its netns is
//! the pause's own, pinned and attached after StartSandbox). A failure anywhere waits for the
//! other branch to finish, then undoes everything the record owns in reverse, so nothing is
//! left (no netns, CNI attachment, shim, cgroup or record). A retry with the same pod name
//! while the first call is in flight joins it and gets its result.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::sandbox_api::{CreateSandboxRequest, StartSandboxRequest};
use crisp_proto::cri::v1::{
    NamespaceMode, PodSandboxConfig, RunPodSandboxRequest, RunPodSandboxResponse,
};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::error::CriError;
use crate::network::cni::{AttachRequest, PortMapping};
use crate::pod::idmap::PodIdMap;
use crate::pod::release::Mode;
use crate::pod::service::PodService;
use crate::shim::client::{ShimCallError, ShimClient, StartRequest, ctx};
use crate::store::records::{Owned, PodRecord, PodState, ShimRecord};

/// The type URL containerd 2.x gives the pause's runtime spec in CreateSandbox's options.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The runtime options type the shim decodes (containerd's runc options).
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// containerd gives the sandbox this score so the OOM killer takes containers first.
pub const PAUSE_OOM_SCORE_ADJ: i32 = -998;
/// The pause image's user (65535:65535), which containerd's pause runs as.
pub const PAUSE_UID: u32 = 65535;
const SHIM_CALL: Duration = Duration::from_secs(20);

/// Namespace modes of the pod, decided once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodModes {
    pub host_network: bool,
    pub host_pid: bool,
    pub host_ipc: bool,
}

pub fn modes(cfg: &PodSandboxConfig) -> PodModes {
    let ns = cfg
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    let node = |v: Option<i32>| v == Some(NamespaceMode::Node as i32);
    PodModes {
        host_network: node(ns.map(|n| n.network)),
        host_pid: node(ns.map(|n| n.pid)),
        host_ipc: node(ns.map(|n| n.ipc)),
    }
}

/// Facts the pause spec needs that are not in the CRI config.
#[derive(Debug, Clone)]
pub struct PauseInputs<'a> {
    pub pod_id: &'a str,
    pub netns_path: Option<&'a str>,
    pub cgroups_path: String,
    pub idmap: Option<&'a PodIdMap>,
    /// crispd's own oom_score_adj: the pause never gets a lower one (no CAP_SYS_RESOURCE).
    pub current_oom_score_adj: i32,
}

/// The OCI runtime spec for the pause process (what containerd 2.x sends the shim as
/// CreateSandbox options): namespaces, hostname, sysctls, cgroupsPath, oomScoreAdj, id maps.
/// Pure: a function of the pod config and the inputs.
pub fn pause_spec(cfg: &PodSandboxConfig, inp: &PauseInputs<'_>) -> Value {
    let m = modes(cfg);
    let mut namespaces = Vec::new();
    if !m.host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    if !m.host_ipc {
        namespaces.push(json!({"type": "ipc"}));
    }
    // A host-network pod keeps the host's UTS namespace too (its hostname is the node's).
    if !m.host_network {
        namespaces.push(json!({"type": "uts"}));
        match inp.netns_path {
            Some(p) => namespaces.push(json!({"type": "network", "path": p})),
            None => namespaces.push(json!({"type": "network"})),
        }
    }
    let linux_cfg = cfg.linux.clone().unwrap_or_default();
    let sysctl: BTreeMap<String, String> = linux_cfg.sysctls.clone().into_iter().collect();
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": inp.cgroups_path,
    });
    if !sysctl.is_empty() {
        linux["sysctl"] = json!(sysctl);
    }
    if let Some(map) = inp.idmap {
        let conv = |v: &[crisp_proto::cri::v1::IdMapping]| -> Vec<Value> {
            v.iter()
                .map(|x| json!({"containerID": x.container_id, "hostID": x.host_id, "size": x.length}))
                .collect()
        };
        if let Some(list) = linux["namespaces"].as_array_mut() {
            list.push(json!({"type": "user"}));
        }
        linux["uidMappings"] = json!(conv(&map.uids));
        linux["gidMappings"] = json!(conv(&map.gids));
    }
    let mut spec = json!({
        "ociVersion": "1.1.0",
        "process": {
            "args": ["/pause"],
            "cwd": "/",
            "user": {"uid": PAUSE_UID, "gid": PAUSE_UID},
            "oomScoreAdj": PAUSE_OOM_SCORE_ADJ.max(inp.current_oom_score_adj),
        },
        "linux": linux,
        "annotations": {
            (crate::container::spec::ANN_CONTAINER_TYPE): "sandbox",
            (crate::container::spec::ANN_SANDBOX_ID): inp.pod_id,
        },
    });
    if !m.host_network && !cfg.hostname.is_empty() {
        spec["hostname"] = json!(cfg.hostname);
    }
    spec
}

/// The handler's runtime options as containerd sends them to a shim: `containerd.runc.v1.Options`
/// with the binary, root and cgroup driver. `None` for the default handler with `runtime =
/// auto` and no systemd driver (the shim probes).
pub fn runtime_options(d: &PodService, handler: &str) -> Result<Option<Any>, CriError> {
    use containerd_shim_protos::protobuf::Message;
    use containerd_shim_protos::shim::oci::Options;
    let bin = d.cfg.handler_binary(handler).flatten();
    let opts = d.cfg.handler_options(handler);
    let systemd = d.cfg.cgroup_driver == crate::config::CgroupDriver::Systemd
        || opts.get("systemd_cgroup").is_some_and(|v| v == "true");
    if bin.is_none() && opts.is_empty() && !systemd {
        return Ok(None);
    }
    let o = Options {
        binary_name: bin.map(|b| b.display().to_string()).unwrap_or_default(),
        root: opts.get("root").cloned().unwrap_or_default(),
        systemd_cgroup: systemd,
        ..Default::default()
    };
    let what = format!("the runtime options of handler {handler:?}");
    Ok(Some(Any {
        type_url: RUNC_OPTIONS_TYPE_URL.into(),
        value: encoded(&what, o.write_to_bytes())?,
        ..Default::default()
    }))
}

/// A message crispd sends a shim, encoded, or an error naming it: never an empty body in its
/// place (an empty pause spec would start the pause in the host's namespaces).
fn encoded<E: std::fmt::Display>(what: &str, r: Result<Vec<u8>, E>) -> Result<Vec<u8>, CriError> {
    r.map_err(|e| CriError::internal(format!("encoding {what}: {e}")))
}

/// The key RunPodSandbox is de-duplicated and name-reserved by (containerd's sandbox name).
pub fn pod_key(cfg: &PodSandboxConfig) -> String {
    let m = cfg.metadata.clone().unwrap_or_default();
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

fn key_of(rec: &PodRecord) -> String {
    format!("{}_{}_{}_{}", rec.name, rec.namespace, rec.uid, rec.attempt)
}

/// Milliseconds per step, for the "pod ready" log line (where RunPodSandbox's time goes).
#[derive(Debug, Default)]
struct Laps {
    steps: Vec<(&'static str, f64)>,
    mark: Option<Instant>,
}

impl Laps {
    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        if let Some(m) = self.mark {
            self.steps.push((step, (now - m).as_secs_f64() * 1e3));
        }
        self.mark = Some(now);
    }

    fn summary(&self) -> String {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(n, ms)| format!("{n}={ms:.1}ms"))
            .collect();
        steps.join(" ")
    }
}

/// The name is reserved by the record: an existing pod with the same name is an error that
/// names it (a retry while in flight never gets here, it joined the first call).
fn reserve_name(d: &PodService, cfg: &PodSandboxConfig) -> Result<(), CriError> {
    let key = pod_key(cfg);
    if let Some((_, other)) = d
        .store
        .list::<PodRecord>()?
        .into_iter()
        .find(|(_, r)| key_of(r) == key)
    {
        return Err(CriError::new(
            crate::error::ErrorKind::AlreadyExists,
            format!(
                "pod sandbox name {key:?} is already used by pod {} (state {:?}); remove it first",
                other.id, other.state
            ),
        ));
    }
    Ok(())
}

/// The pod's record as set-up starts (state Creating), owning already the ID range (if the
/// pod asks for a user namespace) and the network (unless it uses the host's): both are
/// released idempotently, so listing them before they exist is safe, and from here on
/// anything allocated has an owner that recovery can see.
fn new_record(
    id: &str,
    req: &RunPodSandboxRequest,
    cfg: &PodSandboxConfig,
    netns: &Path,
) -> PodRecord {
    let meta = cfg.metadata.clone().unwrap_or_default();
    let m = modes(cfg);
    let mut rec = PodRecord {
        id: id.to_string(),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        attempt: meta.attempt,
        state: PodState::Creating,
        created_at: crate::util::now_nanos(),
        runtime_handler: req.runtime_handler.clone(),
        config_pb: crate::pod::status::encode_config(cfg),
        netns_path: None,
        ips: vec![],
        shim_address: None,
        pause_pid: None,
        cgroup_parent: cgroup_parent(cfg),
        owned: Some(Vec::new()),
    };
    if userns_options(cfg).is_some_and(|u| u.mode == NamespaceMode::Pod as i32) {
        rec.own(Owned::IdRange);
    }
    if !m.host_network {
        rec.netns_path = Some(netns.display().to_string());
        rec.own(Owned::Network);
    }
    // The pod dir, the shim (a `start` that fails half-way may still have spawned it) and the
    // pause (CreateSandbox may start it and then fail): owned from the first commit, so set-up
    // needs no commit per step. Releasing what was never acquired is a no-op.
    rec.own(Owned::Files);
    rec.own(Owned::Shim);
    rec.own(Owned::Pause);
    rec
}

fn cgroup_parent(cfg: &PodSandboxConfig) -> String {
    cfg.linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default()
}

fn userns_options(cfg: &PodSandboxConfig) -> Option<&crisp_proto::cri::v1::UserNamespace> {
    cfg.linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|n| n.userns_options.as_ref())
}

/// RunPodSandbox's set-up, checks done: reserve the name, record the pod, run the steps; on
/// failure release whatever the record says the pod owns (`pod::release`, the same release
/// RemovePodSandbox and recovery use), in reverse.
pub async fn create(
    d: &Arc<PodService>,
    req: RunPodSandboxRequest,
) -> Result<RunPodSandboxResponse, CriError> {
    let cfg = req.config.clone().unwrap_or_default();
    reserve_name(d, &cfg)?;
    let id = crate::util::new_id();
    let driver = crisp_shim::placement::CgroupDriver::from(d.cfg.cgroup_driver);
    // Promise 2: the one placement function.
    let cgroups_path = crisp_shim::placement::cgroup_path(driver, &cgroup_parent(&cfg), &id)
        .map_err(|e| CriError::invalid(format!("config.linux.cgroup_parent: {e}")))?;
    // Held for the whole set-up: a Stop/Remove of this id (it is listed while Creating) waits
    // for the pod to be complete or fully undone, never tears down under our feet.
    let _g = d.pod_locks.lock(&id).await;
    let span = tracing::info_span!("pod", pod_id = %id);
    let started = Instant::now();
    let mut laps = Laps::default();
    laps.lap("start");
    let mut rec = new_record(&id, &req, &cfg, &d.cfg.netns_dir().join(&id));
    d.store.insert_new(&id, &rec)?;
    laps.lap("record");
    let r = setup(d, &mut rec, &req, &cfg, cgroups_path, &mut laps)
        .instrument(span.clone())
        .await;
    match r {
        Ok(resp) => {
            span.in_scope(|| {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    steps = %laps.summary(),
                    "pod ready"
                )
            });
            Ok(resp)
        }
        Err(e) => {
            span.in_scope(|| tracing::warn!(error = %e, "RunPodSandbox failed; undoing"));
            let undo = crate::pod::release::release(d, &mut rec, Mode::Undo);
            if let Err(u) = undo.instrument(span).await {
                tracing::warn!(pod_id = %id, error = %u, "undo left something behind");
            }
            Err(e)
        }
    }
}

/// The named set-up steps; the record already owns everything they acquire.
async fn setup(
    d: &Arc<PodService>,
    rec: &mut PodRecord,
    req: &RunPodSandboxRequest,
    cfg: &PodSandboxConfig,
    cgroups_path: String,
    laps: &mut Laps,
) -> Result<RunPodSandboxResponse, CriError> {
    let m = modes(cfg);
    // ID range (user namespace only when the pod asks for one).
    let idmap = d.idmap.for_pod(&rec.id, userns_options(cfg))?;
    laps.lap("id range");
    // A user-namespaced pod's netns must be owned by its user namespace (runc joins the user
    // namespace first, then could not setns into a netns of the host's): the shim creates both
    // for the pause, and crispd pins and attaches the netns after StartSandbox, as containerd
    // does.
    let netns_after_pause = !m.host_network && idmap.is_some();
    if !m.host_network && !netns_after_pause {
        make_netns(d, rec, None).await?;
        laps.lap("netns");
    }
    let inputs = PauseInputs {
        pod_id: &rec.id,
        netns_path: rec.netns_path.as_deref().filter(|_| !netns_after_pause),
        cgroups_path,
        idmap: idmap.as_ref(),
        current_oom_score_adj: current_oom_score_adj(),
    };
    let spec = pause_spec(cfg, &inputs);
    let mut side = SandboxSide::default();
    let mut sandbox_laps = Laps::default();
    let sandbox = sandbox(d, &rec.id, req, cfg, &spec, &mut side, &mut sandbox_laps);
    let net = if m.host_network || netns_after_pause {
        let r = sandbox.await;
        side.record_into(rec);
        r?;
        None
    } else {
        // Both run to the end even if one fails: the undo then finds each settled.
        let netns = rec.netns_path.clone().unwrap_or_default();
        let cni = timed(cni_add(d, cfg, &rec.id, netns));
        let (sb, (ips, cni_ms)) = tokio::join!(sandbox, cni);
        side.record_into(rec);
        laps.steps.push(("cni add (beside the sandbox)", cni_ms));
        sb?;
        Some(ips?)
    };
    side.record_into(rec);
    laps.steps.append(&mut sandbox_laps.steps);
    laps.lap("joined");
    rec.ips = net.unwrap_or_default();
    if netns_after_pause {
        let pid = side.pause_pid.unwrap_or_default();
        make_netns(d, rec, Some(pid)).await?;
        laps.lap("netns");
        let netns = rec.netns_path.clone().unwrap_or_default();
        rec.ips = cni_add(d, cfg, &rec.id, netns).await?;
        laps.lap("cni add");
    }
    ready(d, rec, &side)?;
    laps.lap("record ready");
    Ok(RunPodSandboxResponse {
        pod_sandbox_id: rec.id.clone(),
    })
}

/// The future's output and how long it took in milliseconds.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let t = Instant::now();
    let r = f.await;
    (r, t.elapsed().as_secs_f64() * 1e3)
}

/// What the sandbox branch acquired, for the record (and for the undo if it failed half-way).
#[derive(Default)]
struct SandboxSide {
    shim: Option<ShimClient>,
    pause_pid: Option<u32>,
}

impl SandboxSide {
    fn record_into(&self, rec: &mut PodRecord) {
        if let Some(s) = &self.shim {
            rec.shim_address = Some(s.address().to_string());
        }
        if self.pause_pid.is_some() {
            rec.pause_pid = self.pause_pid;
        }
    }
}

/// The pod's files, its shim and the pause started through the shim.
async fn sandbox(
    d: &PodService,
    id: &str,
    req: &RunPodSandboxRequest,
    cfg: &PodSandboxConfig,
    spec: &Value,
    out: &mut SandboxSide,
    laps: &mut Laps,
) -> Result<(), CriError> {
    laps.lap("start");
    files(d, id, cfg).await?;
    laps.lap("pod files");
    let shim = shim(d, id, req).await?;
    out.shim = Some(shim.clone());
    laps.lap("shim start");
    out.pause_pid = Some(pause(d, id, &shim, cfg, spec).await?);
    laps.lap("sandbox create+start");
    Ok(())
}

/// The pod is Ready: its record and where its shim listens, in one commit. Until then a crash
/// leaves a Creating pod that start-up undoes (finding the shim by the files its `start`
/// wrote in the pod dir).
fn ready(d: &PodService, rec: &mut PodRecord, side: &SandboxSide) -> Result<(), CriError> {
    rec.state = PodState::Ready;
    let bundle = crate::pod::files::pod_dir(&d.cfg.state, &rec.id);
    match &side.shim {
        Some(shim) => {
            let s = ShimRecord {
                address: shim.address().to_string(),
                pid: shim.pid(),
                bundle: bundle.display().to_string(),
            };
            d.store.put_two(&rec.id, &s, &rec.id, &*rec)?;
        }
        None => d.store.put(&rec.id, &*rec)?,
    }
    tracing::info!(pause_pid = ?rec.pause_pid, ips = ?rec.ips, "pod sandbox started");
    Ok(())
}

/// The network namespace: made here, or the pause's pinned when `pause_pid` is given (a
/// user-namespaced pod's).
async fn make_netns(
    d: &Arc<PodService>,
    rec: &mut PodRecord,
    pause_pid: Option<u32>,
) -> Result<(), CriError> {
    let path = d.cfg.netns_dir().join(&rec.id);
    let p = path.clone();
    let made = match pause_pid {
        None => tokio::task::spawn_blocking(move || crate::network::netns::create(&p)).await,
        Some(pid) => {
            tokio::task::spawn_blocking(move || crate::network::netns::bind_from_pid(&p, pid)).await
        }
    };
    made.map_err(|e| CriError::internal(format!("netns task: {e}")))??;
    let netns = path.display().to_string();
    if rec.netns_path.as_deref() != Some(netns.as_str()) {
        rec.netns_path = Some(netns);
        d.store.put(&rec.id, &*rec)?;
    }
    Ok(())
}

/// The pod's files: hostname, hosts, resolv.conf in the pod dir (the shim's bundle dir too).
async fn files(d: &PodService, id: &str, cfg: &PodSandboxConfig) -> Result<(), CriError> {
    let dir = crate::pod::files::pod_dir(&d.cfg.state, id);
    let hostname = if cfg.hostname.is_empty() || modes(cfg).host_network {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    } else {
        cfg.hostname.clone()
    };
    let dir2 = dir.clone();
    let dns = cfg.dns_config.clone();
    tokio::task::spawn_blocking(move || {
        crate::pod::files::write(&dir2, &hostname, dns.as_ref(), Path::new("/etc"))
    })
    .await
    .map_err(|e| CriError::internal(format!("pod files task: {e}")))?
    .map_err(|e| CriError::context(&format!("pod {}: files in {}", id, dir.display()), e))?;
    Ok(())
}

/// Start the pod's shim; it is reachable for release from here (the live connection).
async fn shim(
    d: &PodService,
    id: &str,
    req: &RunPodSandboxRequest,
) -> Result<ShimClient, CriError> {
    let dir = crate::pod::files::pod_dir(&d.cfg.state, id);
    let events = crate::shim::events::socket_path(&d.cfg.state);
    let shim_bin =
        crate::util::find_binary(&d.cfg.shim_binary).unwrap_or_else(|| d.cfg.shim_binary.clone());
    let shim = ShimClient::start(StartRequest {
        shim_binary: &shim_bin,
        pod_id: id,
        bundle: &dir,
        events_socket: &events,
        options: runtime_options(d, &req.runtime_handler)?,
        idmap_mode: idmap_mode_for_shim(d),
    })
    .await?;
    d.shims.insert(id, shim.clone());
    Ok(shim)
}

/// The idmapped-layer mount mode crispd's snapshotter resolved at start-up, handed to the
/// shim: without it every shim probed it on its pod's first container (a user namespace and an
/// overlay mount: StartContainer's p50 went 46 -> 32 ms with it). A `CRISP_IDMAP_MODE` other
/// than auto in crispd's environment already reaches the shim as it is.
fn idmap_mode_for_shim(d: &PodService) -> Option<String> {
    let set = std::env::var("CRISP_IDMAP_MODE").is_ok_and(|m| m != "auto");
    (!set).then(|| d.ctrs.snapshotter.mounter().mode().to_string())
}

/// The pause process, through the shim's sandbox service (CreateSandbox with its OCI spec,
/// StartSandbox); returns its pid.
async fn pause(
    d: &PodService,
    id: &str,
    shim: &ShimClient,
    cfg: &PodSandboxConfig,
    spec: &Value,
) -> Result<u32, CriError> {
    let id = id.to_string();
    let meta = cfg.metadata.clone().unwrap_or_default();
    let mut annotations: HashMap<String, String> = cfg.annotations.clone();
    for (k, v) in [
        (
            crate::container::spec::ANN_CONTAINER_TYPE,
            "sandbox".to_string(),
        ),
        (crate::container::spec::ANN_SANDBOX_ID, id.clone()),
        (crate::container::spec::ANN_SANDBOX_NAME, meta.name.clone()),
        (
            crate::container::spec::ANN_SANDBOX_NAMESPACE,
            meta.namespace.clone(),
        ),
        (crate::container::spec::ANN_SANDBOX_UID, meta.uid.clone()),
    ] {
        annotations.insert(k.to_string(), v);
    }
    let dir = crate::pod::files::pod_dir(&d.cfg.state, &id);
    let spec_json = encoded(
        &format!("pod {id}: the pause spec"),
        serde_json::to_vec(spec),
    )?;
    let create = CreateSandboxRequest {
        sandbox_id: id.clone(),
        bundle_path: dir.display().to_string(),
        netns_path: spec_netns(spec).unwrap_or_default(),
        options: MessageField::some(Any {
            type_url: SPEC_TYPE_URL.into(),
            value: spec_json,
            ..Default::default()
        }),
        annotations,
        ..Default::default()
    };
    shim.sandbox()
        .create_sandbox(ctx(SHIM_CALL), &create)
        .await
        .map_err(|e| ShimCallError::sandbox("CreateSandbox", &id, shim.typed(e)))?;
    let start = StartSandboxRequest {
        sandbox_id: id.clone(),
        ..Default::default()
    };
    let started = shim
        .sandbox()
        .start_sandbox(ctx(SHIM_CALL), &start)
        .await
        .map_err(|e| ShimCallError::sandbox("StartSandbox", &id, shim.typed(e)))?;
    Ok(started.pid)
}

/// The network namespace path the pause spec joins, if any.
fn spec_netns(spec: &Value) -> Option<String> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .map(str::to_string)
}

/// lo up and CNI ADD of the pod's `eth0` in `netns`; returns the pod's IPs.
async fn cni_add(
    d: &Arc<PodService>,
    cfg: &PodSandboxConfig,
    id: &str,
    netns: String,
) -> Result<Vec<String>, CriError> {
    let meta = cfg.metadata.clone().unwrap_or_default();
    let id = id.to_string();
    let lo = std::path::PathBuf::from(&netns);
    tokio::task::spawn_blocking(move || crate::network::netns::loopback_up(&lo))
        .await
        .map_err(|e| CriError::internal(format!("netns task: {e}")))??;
    let attach = AttachRequest {
        pod_id: id.clone(),
        netns,
        ifname: "eth0".into(),
        args: [
            ("IgnoreUnknown", "1".to_string()),
            ("K8S_POD_NAMESPACE", meta.namespace.clone()),
            ("K8S_POD_NAME", meta.name.clone()),
            ("K8S_POD_INFRA_CONTAINER_ID", id),
            ("K8S_POD_UID", meta.uid.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        port_mappings: port_mappings(cfg),
    };
    let cni = Arc::clone(&d.cni);
    // DEL is safe even if ADD failed half-way (plugins must allow it): the record owns the
    // network already.
    let result = tokio::task::spawn_blocking(move || cni.add(&attach))
        .await
        .map_err(|e| CriError::internal(format!("CNI task: {e}")))??;
    Ok(result.ips)
}

fn port_mappings(cfg: &PodSandboxConfig) -> Vec<PortMapping> {
    cfg.port_mappings
        .iter()
        .filter(|p| p.host_port > 0)
        .map(|p| PortMapping {
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: match crisp_proto::cri::v1::Protocol::try_from(p.protocol) {
                Ok(crisp_proto::cri::v1::Protocol::Udp) => "udp",
                Ok(crisp_proto::cri::v1::Protocol::Sctp) => "sctp",
                _ => "tcp",
            }
            .into(),
            host_ip: p.host_ip.clone(),
        })
        .collect()
}

fn current_oom_score_adj() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What crispd sends a shim is encoded or the call fails naming it: never an empty body
    /// (an empty pause spec would put the pause in the host's namespaces).
    #[test]
    fn an_unencodable_message_is_an_error_naming_it() {
        let e = encoded(
            "pod p1: the pause spec",
            Err::<Vec<u8>, _>("key must be a string"),
        )
        .expect_err("encoding failed");
        assert_eq!(e.kind, crate::error::ErrorKind::Internal);
        assert_eq!(
            e.message,
            "encoding pod p1: the pause spec: key must be a string"
        );
        assert_eq!(encoded("x", Ok::<_, String>(vec![1])).expect("ok"), vec![1]);
    }
    use crisp_proto::cri::v1::PodSandboxConfig;

    fn config() -> PodSandboxConfig {
        use crisp_proto::cri::v1::{
            IdMapping, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption,
        };
        let _ = IdMapping::default();
        PodSandboxConfig {
            hostname: "web-0".into(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/podu1".into(),
                sysctls: [(
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "0".to_string(),
                )]
                .into(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pause_spec_for_a_pod_network_pod() {
        let cfg = config();
        let spec = pause_spec(
            &cfg,
            &PauseInputs {
                pod_id: "p1",
                netns_path: Some("/run/crisp/netns/p1"),
                cgroups_path: "/kubepods/podu1/crisp-p1".into(),
                idmap: None,
                current_oom_score_adj: 0,
            },
        );
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                   {"type": "network", "path": "/run/crisp/netns/p1"}])
        );
        assert_eq!(spec["hostname"], "web-0");
        assert_eq!(spec["linux"]["cgroupsPath"], "/kubepods/podu1/crisp-p1");
        assert_eq!(
            spec["linux"]["sysctl"]["net.ipv4.ip_unprivileged_port_start"],
            "0"
        );
        // Never below crispd's own score (no CAP_SYS_RESOURCE to lower it).
        assert_eq!(spec["process"]["oomScoreAdj"], 0);
        assert!(spec["linux"].get("uidMappings").is_none());
        assert_eq!(
            spec["annotations"][crate::container::spec::ANN_SANDBOX_ID],
            "p1"
        );
    }

    #[test]
    fn pause_spec_host_modes_and_user_namespace() {
        use crisp_proto::cri::v1::IdMapping;
        let mut cfg = config();
        if let Some(ns) = cfg
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
        {
            ns.network = NamespaceMode::Node as i32;
            ns.pid = NamespaceMode::Node as i32;
        }
        let map = PodIdMap {
            uids: vec![IdMapping {
                host_id: 100000,
                container_id: 0,
                length: 65536,
            }],
            gids: vec![IdMapping {
                host_id: 200000,
                container_id: 0,
                length: 65536,
            }],
            allocated: true,
        };
        let spec = pause_spec(
            &cfg,
            &PauseInputs {
                pod_id: "p2",
                netns_path: None,
                cgroups_path: "/crisp-p2".into(),
                idmap: Some(&map),
                current_oom_score_adj: -1000,
            },
        );
        // Host network and PID: neither listed; host network keeps the host's UTS (no hostname).
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "ipc"}, {"type": "user"}])
        );
        assert!(spec.get("hostname").is_none());
        assert_eq!(
            spec["linux"]["uidMappings"],
            json!([{"containerID": 0, "hostID": 100000, "size": 65536}])
        );
        assert_eq!(spec["linux"]["gidMappings"][0]["hostID"], 200000);
        assert_eq!(spec["process"]["oomScoreAdj"], PAUSE_OOM_SCORE_ADJ);

        // A user-namespaced pod network pod: a NEW network namespace (no path) with the user
        // namespace, so the netns is owned by it (crispd pins it after StartSandbox).
        let spec = pause_spec(
            &config(),
            &PauseInputs {
                pod_id: "p3",
                netns_path: None,
                cgroups_path: "/crisp-p3".into(),
                idmap: Some(&map),
                current_oom_score_adj: 0,
            },
        );
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"},
                   {"type": "user"}])
        );
    }

    #[test]
    fn port_mappings_for_portmap() {
        use crisp_proto::cri::v1::{PortMapping as Pm, Protocol};
        let cfg = PodSandboxConfig {
            port_mappings: vec![
                Pm {
                    protocol: Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: String::new(),
                },
                // No host port: not a mapping (kubelet sends container ports too).
                Pm {
                    protocol: 0,
                    container_port: 80,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            ..Default::default()
        };
        let m = port_mappings(&cfg);
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].host_port, m[0].container_port, m[0].protocol.as_str()),
            (5353, 53, "udp")
        );
    }
}
