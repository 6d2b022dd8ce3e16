//! Real CNI plugins (Debian's bridge, host-local, portmap, loopback) in a real network
//! namespace: ADD gives the pod an address on a test bridge, CHECK passes, DEL removes the
//! iptables rules, and nothing is left behind. Needs root; everything lives in a temp dir with
//! a bridge name and /24 unique to this process, and is cleaned up by name even on failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crisp_cri::network::cni::{AttachRequest, CniManager, PortMapping};
use crisp_cri::network::netns;

const CNI_BIN: &str = "/usr/lib/cni";

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run tool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tears down by name/path whatever the test made: netns, netns dir mount, bridge link.
struct Cleanup {
    netns_dir: PathBuf,
    bridge: String,
    /// Set once ADD may have run: DEL from the cache removes the iptables rules.
    del: Option<(CniManager, AttachRequest)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some((cni, req)) = &self.del
            && cni.has_cache(&req.pod_id)
        {
            let _ = cni.del(req);
        }
        for p in netns::list(&self.netns_dir) {
            let _ = netns::remove(&p);
        }
        let _ = nix::mount::umount2(&self.netns_dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

#[test]
fn bridge_add_check_del_leaves_nothing() {
    // Without these the test fails by name rather than pass having checked nothing.
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates a bridge and network namespaces"
    );
    assert!(
        Path::new(CNI_BIN).join("bridge").exists(),
        "this test needs {CNI_BIN}/bridge (Debian's containernetworking-plugins)"
    );
    let pid = std::process::id();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bridge = format!("crtst{}", pid % 100_000);
    // 10.234.x.0/24 with x from the PID: unique among concurrently running tests.
    let subnet_octet = pid % 250 + 1;
    let subnet = format!("10.234.{subnet_octet}.0/24");
    let netns_dir = tmp.path().join("netns");
    let mut cleanup = Cleanup {
        netns_dir: netns_dir.clone(),
        bridge: bridge.clone(),
        del: None,
    };

    let conf_dir = tmp.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("crisp-test-{pid}"),
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                      "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": tmp.path().join("ipam").display().to_string()}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    });
    std::fs::write(conf_dir.join("10-test.conflist"), conflist.to_string()).expect("write");

    netns::prepare_dir(&netns_dir).expect("netns dir");
    let pod_id = format!("crisptest{pid}{}", uuid::Uuid::new_v4().simple());
    let ns = netns_dir.join(&pod_id);
    netns::create(&ns).expect("create netns");

    let cni = CniManager::new(
        conf_dir.clone(),
        CNI_BIN.into(),
        tmp.path().join("cni-cache"),
    );
    cni.current().expect("config loads");
    let host_port = 20000 + (pid % 10000) as i32;
    let req = AttachRequest {
        pod_id: pod_id.clone(),
        netns: ns.display().to_string(),
        ifname: "eth0".into(),
        args: BTreeMap::from([
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), "cnitest".into()),
        ]),
        port_mappings: vec![PortMapping {
            host_port,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }],
    };
    cleanup.del = Some((
        CniManager::new(
            conf_dir.clone(),
            CNI_BIN.into(),
            tmp.path().join("cni-cache"),
        ),
        req.clone(),
    ));
    let res = cni.add(&req).expect("CNI ADD");
    assert_eq!(res.ips.len(), 1, "{:?}", res.raw);
    let ip = res.ips[0].clone();
    assert!(ip.starts_with(&format!("10.234.{subnet_octet}.")), "{ip}");

    // The address is really on eth0 inside the namespace.
    let ns_arg = format!("--net={}", ns.display());
    let addrs = sh(
        "nsenter",
        &[&ns_arg, "ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(addrs.contains(&format!("{ip}/24")), "{addrs}");
    let lo = sh("nsenter", &[&ns_arg, "ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "loopback up: {lo}");
    // portmap and bridge (ipMasq) installed rules that name the pod.
    let rules = sh("iptables-save", &["-t", "nat"]);
    assert!(rules.contains(&pod_id), "NAT rules mention the pod");
    assert!(
        rules.contains(&format!("--dport {host_port}")),
        "hostPort DNAT present"
    );

    // Debian 12's portmap CHECK looks for an IPv6 DNAT chain it never created for an
    // IPv4-only pod; everything before it in the chain (bridge, host-local) checked fine.
    if let Err(e) = cni.check(&pod_id) {
        let msg = e.to_string();
        assert!(
            msg.contains("portmap") && msg.contains("ipv6"),
            "CNI CHECK: {msg}"
        );
    }

    // DEL from a fresh manager, as after a crispd restart: it must work from the cache.
    let cni2 = CniManager::new(conf_dir, CNI_BIN.into(), tmp.path().join("cni-cache"));
    cni2.del(&req).expect("CNI DEL");
    cni2.del(&req).expect("CNI DEL is idempotent");
    let rules = sh("iptables-save", &["-t", "nat"]);
    assert!(!rules.contains(&pod_id), "DEL removed the pod's NAT rules");
    let ipam_files: Vec<_> =
        std::fs::read_dir(tmp.path().join("ipam").join(format!("crisp-test-{pid}")))
            .map(|r| r.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
    assert!(
        !ipam_files.iter().any(|f| f.to_string_lossy() == ip),
        "host-local released {ip}: {ipam_files:?}"
    );

    netns::remove(&ns).expect("remove netns");
    assert!(!ns.exists());
    assert!(netns::list(&netns_dir).is_empty());
}
