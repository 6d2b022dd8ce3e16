//! RunPodSandbox: check what the pod needs exists *now* (promise 4), then set the pod up in
//! order — record (Creating), ID range, netns + CNI ADD, the pod's files, the shim, the pause
//! process through the shim's sandbox service (CreateSandbox with the pause's OCI spec,
//! StartSandbox), record Ready. A failure at any step undoes every earlier step in reverse, so
//! nothing is left (no netns, CNI attachment, shim, cgroup or record). A retry with the same
//! pod name while the first call is in flight joins it and gets its result.

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

use crate::cni::{AttachRequest, PortMapping};
use crate::daemon::Daemon;
use crate::idmap::PodIdMap;
use crate::instrument::CriError;
use crate::shim_client::{ShimClient, StartRequest, ctx};
use crate::store::records::{PodRecord, PodState, ShimRecord};

/// The type URL containerd 2.x gives the pause's runtime spec in CreateSandbox's options.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The runtime options type the shim decodes (containerd's runc options).
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// containerd gives the sandbox this score so the OOM killer takes containers first.
pub const PAUSE_OOM_SCORE_ADJ: i32 = -998;
/// The pause image's user (65535:65535), which containerd's pause runs as.
pub const PAUSE_UID: u32 = 65535;
const SHIM_CALL: Duration = Duration::from_secs(20);

/// Every check RunPodSandbox makes before touching anything.
pub fn preflight(d: &Daemon, req: &RunPodSandboxRequest) -> Result<(), CriError> {
    let cfg = req
        .config
        .as_ref()
        .ok_or_else(|| CriError::invalid("config: missing"))?;
    let meta = cfg
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::invalid("config.metadata: missing"))?;
    for (field, v) in [
        ("config.metadata.name", &meta.name),
        ("config.metadata.namespace", &meta.namespace),
        ("config.metadata.uid", &meta.uid),
    ] {
        if v.is_empty() {
            return Err(CriError::invalid(format!("{field}: empty")));
        }
    }
    // The handler: known, and its binary present (it may have been installed since start-up).
    let Some(bin) = d.cfg.handler_binary(&req.runtime_handler) else {
        return Err(CriError::invalid(format!(
            "runtime_handler: {:?} is not configured (known: {:?})",
            req.runtime_handler,
            d.cfg.runtime_handlers.keys().collect::<Vec<_>>()
        )));
    };
    if let Some(bin) = bin
        && crate::startup::find_binary(&bin).is_none()
    {
        let key = if req.runtime_handler.is_empty() {
            "runtime".to_string()
        } else {
            format!("runtime_handlers.{}.binary", req.runtime_handler)
        };
        return Err(CriError::precondition(format!(
            "runtime handler {:?}: OCI runtime binary {} (setting `{key}`) not found",
            req.runtime_handler,
            bin.display()
        )));
    }
    if crate::startup::find_binary(&d.cfg.shim_binary).is_none() {
        return Err(CriError::precondition(format!(
            "shim binary {} (setting `shim_binary`) not found",
            d.cfg.shim_binary.display()
        )));
    }
    let sc = cfg.linux.as_ref().and_then(|l| l.security_context.as_ref());
    let ns = sc.and_then(|s| s.namespace_options.as_ref());
    let host_network = ns.is_some_and(|n| n.network == NamespaceMode::Node as i32);
    let userns_pod = ns
        .and_then(|n| n.userns_options.as_ref())
        .is_some_and(|u| u.mode == NamespaceMode::Pod as i32);
    // As kubelet's validation ("hostNetwork/hostPID/hostIPC is not allowed when user
    // namespaces are enabled"): the host's namespaces are owned by the host's user namespace,
    // over which a process in the pod's user namespace has no capability. It could neither
    // mount sysfs for the host's netns, nor procfs for the host's PID namespace, nor mqueue
    // for the host's IPC namespace. Checked before the CNI precondition: the config is wrong
    // whatever the node's state.
    if let Some(n) = ns.filter(|_| userns_pod) {
        for (field, mode, what) in [
            ("network", n.network, "host network"),
            ("pid", n.pid, "host PID"),
            ("ipc", n.ipc, "host IPC"),
        ] {
            if mode == NamespaceMode::Node as i32 {
                return Err(CriError::invalid(format!(
                    "config.linux.security_context.namespace_options: {field} NODE ({what}) \
                     cannot be combined with userns_options.mode POD (a user namespace)"
                )));
            }
        }
    }
    if !host_network {
        // FailedPrecondition, naming the directory and what is missing in it.
        d.cni.current()?;
    }
    if let Some(u) = ns.and_then(|n| n.userns_options.as_ref())
        && u.mode == NamespaceMode::Pod as i32
        && !(u.uids.is_empty() && u.gids.is_empty())
    {
        crate::idmap::validate_mappings("uids", &u.uids)?;
        crate::idmap::validate_mappings("gids", &u.gids)?;
    }
    Ok(())
}

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
            (crate::spec::ANN_CONTAINER_TYPE): "sandbox",
            (crate::spec::ANN_SANDBOX_ID): inp.pod_id,
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
pub fn runtime_options(d: &Daemon, handler: &str) -> Option<Any> {
    use containerd_shim_protos::protobuf::Message;
    use containerd_shim_protos::shim::oci::Options;
    let bin = d.cfg.handler_binary(handler).flatten();
    let opts = d
        .cfg
        .runtime_handlers
        .get(handler)
        .map(|h| h.options.clone())
        .unwrap_or_default();
    let systemd = d.cfg.cgroup_driver == crate::config::CgroupDriver::Systemd
        || opts.get("systemd_cgroup").is_some_and(|v| v == "true");
    if bin.is_none() && opts.is_empty() && !systemd {
        return None;
    }
    let o = Options {
        binary_name: bin.map(|b| b.display().to_string()).unwrap_or_default(),
        root: opts.get("root").cloned().unwrap_or_default(),
        systemd_cgroup: systemd,
        ..Default::default()
    };
    Some(Any {
        type_url: RUNC_OPTIONS_TYPE_URL.into(),
        value: o.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    })
}

/// The key RunPodSandbox is de-duplicated and name-reserved by (containerd's sandbox name).
fn pod_key(cfg: &PodSandboxConfig) -> String {
    let m = cfg.metadata.clone().unwrap_or_default();
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

fn key_of(rec: &PodRecord) -> String {
    format!("{}_{}_{}_{}", rec.name, rec.namespace, rec.uid, rec.attempt)
}

pub async fn run_pod_sandbox(
    d: &Arc<Daemon>,
    req: RunPodSandboxRequest,
) -> Result<RunPodSandboxResponse, CriError> {
    preflight(d, &req)?;
    let key = req.config.as_ref().map(pod_key).unwrap_or_default();
    let dd = Arc::clone(d);
    let span = tracing::Span::current();
    let (r, role) = d
        .pod_inflight
        .run(&key, async move { create(&dd, req).await }.instrument(span))
        .await;
    if role == crate::inflight::Role::Joined {
        tracing::info!(pod = %key, "joined a RunPodSandbox already in flight");
    }
    r
}

/// What has been set up so far, undone in reverse on failure.
#[derive(Debug, Default)]
struct Done {
    record: bool,
    idmap: bool,
    netns: Option<String>,
    cni: bool,
    files: bool,
    shim: Option<ShimClient>,
    sandbox_created: bool,
    /// Milliseconds per step, for the "pod ready" log line (where RunPodSandbox's time goes).
    steps: Vec<(&'static str, f64)>,
    mark: Option<Instant>,
}

impl Done {
    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        if let Some(m) = self.mark {
            self.steps.push((step, (now - m).as_secs_f64() * 1e3));
        }
        self.mark = Some(now);
    }
}

async fn create(
    d: &Arc<Daemon>,
    req: RunPodSandboxRequest,
) -> Result<RunPodSandboxResponse, CriError> {
    let cfg = req.config.clone().unwrap_or_default();
    let meta = cfg.metadata.clone().unwrap_or_default();
    let key = pod_key(&cfg);
    // The name is reserved by the record: an existing pod with the same name is an error that
    // names it (a retry while in flight never gets here, it joined the first call).
    if let Some((_, other)) = d
        .store
        .list::<PodRecord>()?
        .into_iter()
        .find(|(_, r)| key_of(r) == key)
    {
        return Err(CriError::new(
            crate::instrument::ErrorKind::AlreadyExists,
            format!(
                "pod sandbox name {key:?} is already used by pod {} (state {:?}); remove it first",
                other.id, other.state
            ),
        ));
    }
    let id = crate::util::new_id();
    // Held for the whole set-up: a Stop/Remove of this id (it is listed while Creating) waits
    // for the pod to be complete or fully undone, never tears down under our feet.
    let _g = d.pod_locks.lock(&id).await;
    let span = tracing::info_span!("pod", pod_id = %id);
    let started = Instant::now();
    let mut done = Done::default();
    let r = setup(d, &id, &req, &cfg, &meta, &mut done)
        .instrument(span.clone())
        .await;
    match r {
        Ok(resp) => {
            span.in_scope(|| {
                let steps: Vec<String> = done
                    .steps
                    .iter()
                    .map(|(n, ms)| format!("{n}={ms:.1}ms"))
                    .collect();
                tracing::info!(
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    steps = %steps.join(" "),
                    "pod ready"
                )
            });
            Ok(resp)
        }
        Err(e) => {
            span.in_scope(|| tracing::warn!(error = %e, "RunPodSandbox failed; undoing"));
            undo(d, &id, &cfg, done).instrument(span).await;
            Err(e)
        }
    }
}

async fn setup(
    d: &Arc<Daemon>,
    id: &str,
    req: &RunPodSandboxRequest,
    cfg: &PodSandboxConfig,
    meta: &crisp_proto::cri::v1::PodSandboxMetadata,
    done: &mut Done,
) -> Result<RunPodSandboxResponse, CriError> {
    let m = modes(cfg);
    let cgroup_parent = cfg
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    let driver = crisp_shim::placement::CgroupDriver::from(d.cfg.cgroup_driver);
    // Promise 2: the one placement function.
    let cgroups_path = crisp_shim::placement::cgroup_path(driver, &cgroup_parent, id)
        .map_err(|e| CriError::invalid(format!("config.linux.cgroup_parent: {e}")))?;

    done.lap("start");
    // 1. The record first (state Creating): from here on, anything allocated has an owner that
    //    recovery can see.
    let mut rec = PodRecord {
        id: id.to_string(),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        attempt: meta.attempt,
        state: PodState::Creating,
        created_at: crate::util::now_nanos(),
        runtime_handler: req.runtime_handler.clone(),
        config_pb: crate::cri::pods::encode_config(cfg),
        netns_path: None,
        ips: vec![],
        shim_address: None,
        pause_pid: None,
        cgroup_parent: cgroup_parent.clone(),
    };
    d.store.insert_new(id, &rec)?;
    done.record = true;

    done.lap("record");
    // 2. ID range (user namespace only when the pod asks for one).
    let userns = cfg
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|n| n.userns_options.as_ref());
    let idmap = d.idmap.for_pod(id, userns)?;
    done.idmap = idmap.as_ref().is_some_and(|m| m.allocated);

    done.lap("id range");
    // 3. Network namespace and CNI ADD. A user-namespaced pod's netns must be owned by its user
    //    namespace (runc joins the user namespace first, then could not setns into a netns of
    //    the host's): the shim creates both for the pause, and crispd pins and attaches the
    //    netns after StartSandbox (step 6b), as containerd does.
    let netns_after_pause = !m.host_network && idmap.is_some();
    if !m.host_network && !netns_after_pause {
        let path = d.cfg.netns_dir().join(id);
        let p = path.clone();
        tokio::task::spawn_blocking(move || crate::netns::create(&p))
            .await
            .map_err(|e| CriError::internal(format!("netns task: {e}")))??;
        let netns = path.display().to_string();
        done.netns = Some(netns.clone());
        rec.netns_path = Some(netns.clone());
        d.store.put(id, &rec)?;
        done.lap("netns");
        cni_add(d, id, meta, cfg, netns, &mut rec, done).await?;
    }

    // 4. The pod's files (bundle dir of the shim too).
    let dir = crate::sandbox_files::pod_dir(&d.cfg.state, id);
    let hostname = if cfg.hostname.is_empty() || m.host_network {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    } else {
        cfg.hostname.clone()
    };
    done.files = true;
    {
        let dir2 = dir.clone();
        let dns = cfg.dns_config.clone();
        tokio::task::spawn_blocking(move || {
            crate::sandbox_files::write(&dir2, &hostname, dns.as_ref(), Path::new("/etc"))
        })
        .await
        .map_err(|e| CriError::internal(format!("pod files task: {e}")))?
        .map_err(|e| CriError::internal(format!("writing pod files in {}: {e}", dir.display())))?;
    }

    done.lap("pod files");
    // 5. The shim.
    let events = crate::shim_events::socket_path(&d.cfg.state);
    let shim_bin = crate::startup::find_binary(&d.cfg.shim_binary)
        .unwrap_or_else(|| d.cfg.shim_binary.clone());
    let shim = ShimClient::start(StartRequest {
        shim_binary: &shim_bin,
        pod_id: id,
        bundle: &dir,
        events_socket: &events,
        options: runtime_options(d, &req.runtime_handler),
    })
    .await?;
    done.shim = Some(shim.clone());
    d.store.put(
        id,
        &ShimRecord {
            address: shim.address().to_string(),
            pid: shim.pid(),
            bundle: dir.display().to_string(),
        },
    )?;
    d.shims.insert(id, shim.clone());
    rec.shim_address = Some(shim.address().to_string());
    d.store.put(id, &rec)?;

    done.lap("shim start");
    // 6. The pause process, through the shim's sandbox service.
    let spec = pause_spec(
        cfg,
        &PauseInputs {
            pod_id: id,
            netns_path: rec.netns_path.as_deref(),
            cgroups_path,
            idmap: idmap.as_ref(),
            current_oom_score_adj: current_oom_score_adj(),
        },
    );
    let mut annotations: HashMap<String, String> = cfg.annotations.clone();
    for (k, v) in [
        (crate::spec::ANN_CONTAINER_TYPE, "sandbox".to_string()),
        (crate::spec::ANN_SANDBOX_ID, id.to_string()),
        (crate::spec::ANN_SANDBOX_NAME, meta.name.clone()),
        (crate::spec::ANN_SANDBOX_NAMESPACE, meta.namespace.clone()),
        (crate::spec::ANN_SANDBOX_UID, meta.uid.clone()),
    ] {
        annotations.insert(k.to_string(), v);
    }
    let create = CreateSandboxRequest {
        sandbox_id: id.to_string(),
        bundle_path: dir.display().to_string(),
        netns_path: rec.netns_path.clone().unwrap_or_default(),
        options: MessageField::some(Any {
            type_url: SPEC_TYPE_URL.into(),
            value: serde_json::to_vec(&spec).unwrap_or_default(),
            ..Default::default()
        }),
        annotations,
        ..Default::default()
    };
    done.sandbox_created = true;
    shim.sandbox()
        .create_sandbox(ctx(SHIM_CALL), &create)
        .await
        .map_err(|e| crate::shim_client::rpc_error("CreateSandbox", id, e))?;
    let started = shim
        .sandbox()
        .start_sandbox(
            ctx(SHIM_CALL),
            &StartSandboxRequest {
                sandbox_id: id.to_string(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| crate::shim_client::rpc_error("StartSandbox", id, e))?;

    done.lap("sandbox create+start");
    rec.pause_pid = Some(started.pid);
    // 6b. A user-namespaced pod: pin the pause's new netns where every other pod's is, then
    //     CNI ADD on it. Undo (CNI DEL, unmount + unlink) is the same as for any pod.
    if netns_after_pause {
        let path = d.cfg.netns_dir().join(id);
        let p = path.clone();
        let pid = started.pid;
        tokio::task::spawn_blocking(move || crate::netns::bind_from_pid(&p, pid))
            .await
            .map_err(|e| CriError::internal(format!("netns task: {e}")))??;
        let netns = path.display().to_string();
        done.netns = Some(netns.clone());
        rec.netns_path = Some(netns.clone());
        d.store.put(id, &rec)?;
        done.lap("netns");
        cni_add(d, id, meta, cfg, netns, &mut rec, done).await?;
    }
    // 7. Ready.
    rec.state = PodState::Ready;
    d.store.put(id, &rec)?;
    tracing::info!(pause_pid = started.pid, ips = ?rec.ips, "pod sandbox started");
    Ok(RunPodSandboxResponse {
        pod_sandbox_id: id.to_string(),
    })
}

/// CNI ADD of the pod's `eth0` in `netns`; the IPs go to the record (stored by the caller).
async fn cni_add(
    d: &Arc<Daemon>,
    id: &str,
    meta: &crisp_proto::cri::v1::PodSandboxMetadata,
    cfg: &PodSandboxConfig,
    netns: String,
    rec: &mut PodRecord,
    done: &mut Done,
) -> Result<(), CriError> {
    let lo = std::path::PathBuf::from(&netns);
    tokio::task::spawn_blocking(move || crate::netns::loopback_up(&lo))
        .await
        .map_err(|e| CriError::internal(format!("netns task: {e}")))??;
    let attach = AttachRequest {
        pod_id: id.to_string(),
        netns,
        ifname: "eth0".into(),
        args: [
            ("IgnoreUnknown", "1".to_string()),
            ("K8S_POD_NAMESPACE", meta.namespace.clone()),
            ("K8S_POD_NAME", meta.name.clone()),
            ("K8S_POD_INFRA_CONTAINER_ID", id.to_string()),
            ("K8S_POD_UID", meta.uid.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        port_mappings: port_mappings(cfg),
    };
    let cni = Arc::clone(&d.cni);
    done.cni = true; // DEL is safe even if ADD failed half-way (plugins must allow it).
    let result = tokio::task::spawn_blocking(move || cni.add(&attach))
        .await
        .map_err(|e| CriError::internal(format!("CNI task: {e}")))??;
    rec.ips = result.ips;
    done.lap("cni add");
    Ok(())
}

/// Undo whatever `setup` did, in reverse; each step is attempted even if an earlier one fails
/// (each is logged), so a failure leaves as little as possible.
async fn undo(d: &Daemon, id: &str, cfg: &PodSandboxConfig, done: Done) {
    use crate::cri::pod_teardown as t;
    let rec = d.store.get::<PodRecord>(id).ok().flatten();
    if done.shim.is_some() {
        if done.sandbox_created
            && let Some(r) = &rec
            && let Err(e) = t::stop_pause(d, r).await
        {
            tracing::warn!(error = %e, "undo: stop pause");
        }
        let addr = done.shim.as_ref().map(|s| s.address().to_string());
        if let Err(e) = t::shutdown_shim(d, id, addr.as_deref()).await {
            tracing::warn!(error = %e, "undo: shut down shim");
        }
    } else if done.files {
        // `start` may have spawned the shim and then failed (e.g. the connection timed out):
        // the pod dir's address/shim.pid still find it, before the dir is removed below.
        if let Err(e) = t::shutdown_shim(d, id, None).await {
            tracing::warn!(error = %e, "undo: shut down a shim that never connected");
        }
    }
    if (done.cni || done.netns.is_some())
        && let Err(e) = t::release_network_opt(d, id, done.netns.as_deref(), true).await
    {
        tracing::warn!(error = %e, "undo: release network");
    }
    if done.files {
        t::shim_delete_action(d, id).await;
    }
    if done.files
        && let Err(e) = t::remove_pod_files(&crate::sandbox_files::pod_dir(&d.cfg.state, id))
    {
        tracing::warn!(error = %e, "undo: pod files");
    }
    if done.idmap
        && let Err(e) = d.idmap.release(id)
    {
        tracing::warn!(error = %e, "undo: id range");
    }
    let parent = cfg
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or("");
    if let Err(e) = t::remove_pod_cgroup(d, parent, id) {
        tracing::warn!(error = %e, "undo: cgroup");
    }
    if done.record
        && let Err(e) = d.store.delete::<PodRecord>(id)
    {
        tracing::warn!(error = %e, "undo: pod record");
    }
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
    use crate::instrument::ErrorKind;
    use crisp_proto::cri::v1::{NamespaceOption, PodSandboxConfig, PodSandboxMetadata};

    fn req(handler: &str) -> RunPodSandboxRequest {
        RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "web".into(),
                    uid: "u1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            runtime_handler: handler.into(),
        }
    }

    #[tokio::test]
    async fn names_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon::for_test(dir.path());
        let mut cfg = (*d.cfg).clone();
        cfg.shim_binary = "/bin/sh".into(); // exists: the shim is not what this test is about
        cfg.runtime_handlers.insert(
            "ghost".into(),
            crate::config::RuntimeHandler {
                binary: "/nonexistent/ghost".into(),
                ..Default::default()
            },
        );
        d.cfg = std::sync::Arc::new(cfg);
        let d = Arc::new(d);

        let mut r = req("");
        r.config
            .as_mut()
            .and_then(|c| c.metadata.as_mut())
            .expect("meta")
            .uid
            .clear();
        let e = run_pod_sandbox(&d, r).await.expect_err("no uid");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("config.metadata.uid"), "{}", e.message);

        let e = run_pod_sandbox(&d, req("kata"))
            .await
            .expect_err("unknown handler");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(
            e.message.contains("runtime_handler") && e.message.contains("kata"),
            "{}",
            e.message
        );

        let e = run_pod_sandbox(&d, req("ghost"))
            .await
            .expect_err("missing binary");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(
            e.message.contains("runtime_handlers.ghost.binary"),
            "{}",
            e.message
        );

        // No CNI config: FailedPrecondition naming the directory.
        let e = run_pod_sandbox(&d, req("runc"))
            .await
            .expect_err("no network");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(e.message.contains("net.d"), "{}", e.message);

        // Once a config appears, the request passes every check.
        std::fs::create_dir_all(dir.path().join("net.d")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
        std::fs::write(dir.path().join("bin/loopback"), "").expect("write");
        std::fs::write(
            dir.path().join("net.d/10.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .expect("write");
        d.cni.reload();
        // Past the checks, the plugin (an empty file) cannot run: the call fails and undoes
        // what it did — no record, no netns, no pod dir.
        let e = run_pod_sandbox(&d, req("runc"))
            .await
            .expect_err("plugin cannot run");
        assert_ne!(e.kind, ErrorKind::Unimplemented);
        assert_eq!(d.store.count(crate::store::PODS).expect("count"), 0);
        assert!(
            crate::netns::list(&d.cfg.netns_dir()).is_empty(),
            "netns undone"
        );
        crate::netns::release_dir_if_empty(&d.cfg.netns_dir());
        assert!(
            std::fs::read_dir(d.cfg.state.join("pods"))
                .map(|r| r.count())
                .unwrap_or(0)
                == 0
        );
    }

    /// A pod with a user namespace (mode POD) and the given namespace options.
    fn userns_pod_with(ns: NamespaceOption) -> RunPodSandboxRequest {
        use crisp_proto::cri::v1::{
            LinuxPodSandboxConfig, LinuxSandboxSecurityContext, UserNamespace,
        };
        let mut r = req("");
        if let Some(cfg) = r.config.as_mut() {
            cfg.linux = Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        userns_options: Some(UserNamespace {
                            mode: NamespaceMode::Pod as i32,
                            ..Default::default()
                        }),
                        ..ns
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        r
    }

    #[test]
    fn host_namespaces_with_a_user_namespace_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon::for_test(dir.path());
        let mut c = (*d.cfg).clone();
        c.shim_binary = "/bin/sh".into();
        d.cfg = std::sync::Arc::new(c);
        let node = NamespaceMode::Node as i32;
        for (field, ns) in [
            (
                "network",
                NamespaceOption {
                    network: node,
                    ..Default::default()
                },
            ),
            (
                "pid",
                NamespaceOption {
                    pid: node,
                    ..Default::default()
                },
            ),
            (
                "ipc",
                NamespaceOption {
                    ipc: node,
                    ..Default::default()
                },
            ),
        ] {
            // No CNI config in this daemon: the config error comes first for every field,
            // host network or not.
            let e = preflight(&d, &userns_pod_with(ns)).expect_err(field);
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{field}: {}", e.message);
            assert!(
                e.message.contains("namespace_options")
                    && e.message.contains("userns_options.mode POD")
                    && e.message.contains(&format!("{field} NODE")),
                "{}",
                e.message
            );
        }
        // The pod's own PID and IPC namespaces with a user namespace pass these checks (and
        // stop at the missing CNI config).
        let e = preflight(&d, &userns_pod_with(NamespaceOption::default())).expect_err("no CNI");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{}", e.message);
    }

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
        assert_eq!(spec["annotations"][crate::spec::ANN_SANDBOX_ID], "p1");
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
