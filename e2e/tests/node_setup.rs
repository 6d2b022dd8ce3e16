//! A node's setup as an operator meets it, through the same scripts and binaries they run:
//! - `hack/cni-default.sh` writes the default pod network only into a CNI directory that has
//!   none, never over or beside an existing config, and what it writes is a network the real
//!   plugins (Debian's bridge, host-local, portmap, loopback) set up: run as a runtime runs
//!   them, in network namespaces this test creates, the pod gets an address in 10.88.0.0/16;
//! - `crispd config check` names each bad key and value and exits non-zero, and accepts what
//!   `crispd config default` prints and the kind node's config (e2e/kind/config.toml);
//! - `make install-files` (what `make install` copies, from the binaries the suite built) lays
//!   out the binaries, config and unit, never replaces an existing config, and the unit it
//!   writes passes `systemd-analyze verify` with no warning;
//! - `make install` installs only a statically linked shim (what `make release` builds): a
//!   dynamic one is refused before anything is copied.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::elf::{Linkage, linkage};
use crisp_e2e::harness::{CNI_BIN_DIR, crispd_binary, which};
use serde_json::{Value, json};

const CONFLIST: &str = "10-crisp-bridge.conflist";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cni_default(dir: &Path, ipv6: Option<bool>) -> Result<String> {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("hack/cni-default.sh")).arg(dir);
    if let Some(v6) = ipv6 {
        cmd.env("CNI_DEFAULT_IPV6", if v6 { "1" } else { "0" });
    }
    let out = run(&mut cmd)?;
    ensure!(
        out.status.success(),
        "cni-default.sh {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every file in `dir` with its contents.
fn snapshot(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        m.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path())?,
        );
    }
    Ok(m)
}

fn ranges(conflist: &Value) -> Vec<String> {
    conflist["plugins"][0]["ipam"]["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r[0]["subnet"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn cni_default_writes_only_where_there_is_no_network() -> Result<()> {
    let tmp = tempfile::tempdir()?;

    // A directory that does not exist yet, as on a fresh machine: created and written.
    let dir = tmp.path().join("fresh/net.d");
    let said = cni_default(&dir, Some(false))?;
    ensure!(said.contains("wrote"), "{said}");
    let files = snapshot(&dir)?;
    ensure!(
        files.keys().collect::<Vec<_>>() == [CONFLIST],
        "only the default conflist, nothing half-written beside it: {:?}",
        files.keys()
    );
    let list: Value = serde_json::from_slice(&files[CONFLIST]).context("valid JSON")?;
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .context("plugins")?
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    ensure!(types == ["bridge", "portmap", "loopback"], "{list:#}");
    ensure!(
        list["plugins"][0]["ipam"]["type"] == "host-local",
        "{list:#}"
    );
    ensure!(ranges(&list) == ["10.88.0.0/16"], "{list:#}");
    ensure!(
        list["plugins"][1]["capabilities"]["portMappings"] == true,
        "{list:#}"
    );

    // Run again: the file is ours now, and stays byte for byte (and inode for inode).
    let ino = std::fs::metadata(dir.join(CONFLIST))?;
    let said = cni_default(&dir, Some(true))?;
    ensure!(said.contains("left as it is"), "{said}");
    ensure!(
        snapshot(&dir)? == files,
        "a second run changed {}",
        dir.display()
    );
    ensure!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.join(CONFLIST))?)
            == std::os::unix::fs::MetadataExt::ino(&ino),
        "a second run replaced the file"
    );

    // With IPv6: both ranges, and a default route for each family.
    let dir6 = tmp.path().join("v6");
    cni_default(&dir6, Some(true))?;
    let list: Value = serde_json::from_slice(&std::fs::read(dir6.join(CONFLIST))?)?;
    ensure!(
        ranges(&list) == ["10.88.0.0/16", "fd42:c815:88::/64"],
        "{list:#}"
    );
    let routes = list["plugins"][0]["ipam"]["routes"].to_string();
    ensure!(
        routes.contains("0.0.0.0/0") && routes.contains("::/0"),
        "{routes}"
    );

    // Any config crispd would read (*.conflist, *.conf, *.json) means a network is there.
    for existing in ["99-flannel.conflist", "05-calico.conf", "cilium.json"] {
        let dir = tmp.path().join(format!("has-{existing}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join(existing),
            b"{\"owned\": \"by the network daemonset\"}",
        )?;
        let before = snapshot(&dir)?;
        let said = cni_default(&dir, None)?;
        ensure!(said.contains(existing), "names what it found: {said}");
        ensure!(
            snapshot(&dir)? == before,
            "{existing}: the directory changed"
        );
    }
    // Files crispd does not read do not count as a network.
    let dir = tmp.path().join("other-files");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("README"), b"x")?;
    cni_default(&dir, Some(false))?;
    ensure!(dir.join(CONFLIST).is_file(), "written beside a README");
    Ok(())
}

/// Network namespaces made with `ip netns add`, removed on drop (which takes the test bridge,
/// its iptables rules and the pod's veth with them).
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs one CNI plugin as a runtime does: in the "node" namespace `node`, on the pod
/// namespace `pod`, its config on stdin; returns its JSON result.
fn cni_exec(node: &str, pod: &str, command: &str, id: &str, conf: &Value) -> Result<Value> {
    let kind = conf["type"].as_str().context("plugin type")?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(Path::new(CNI_BIN_DIR).join(kind))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_BIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting CNI plugin {kind}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "CNI {kind} {command}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("CNI {kind} {command} result: {stdout}"))
}

/// Each plugin of `list` in turn (DEL in reverse), each given the previous one's result.
fn cni_list(node: &str, pod: &str, command: &str, id: &str, list: &Value) -> Result<Value> {
    let mut plugins: Vec<Value> = list["plugins"].as_array().context("plugins")?.clone();
    if command == "DEL" {
        plugins.reverse();
    }
    let mut prev = Value::Null;
    for mut p in plugins {
        p["cniVersion"] = list["cniVersion"].clone();
        p["name"] = list["name"].clone();
        if !prev.is_null() {
            p["prevResult"] = prev.clone();
        }
        // What a runtime passes for the portMappings capability the conflist asks for.
        if p["capabilities"]["portMappings"] == true {
            p["runtimeConfig"] = json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]});
        }
        let r = cni_exec(node, pod, command, id, &p)?;
        if command == "ADD" {
            prev = r;
        }
    }
    Ok(prev)
}

#[test]
fn cni_default_network_gets_an_address_from_the_real_plugins() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates network namespaces"
    );
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        ensure!(
            Path::new(CNI_BIN_DIR).join(p).is_file(),
            "this test needs {CNI_BIN_DIR}/{p} (Debian package containernetworking-plugins)"
        );
    }
    which("iptables-save").context("this test needs iptables-save (Debian package iptables)")?;
    let tmp = tempfile::tempdir()?;
    let conf_dir = tmp.path().join("net.d");
    cni_default(&conf_dir, None)?; // IPv6 as the host has it, as `make run` decides
    let mut list: Value = serde_json::from_slice(&std::fs::read(conf_dir.join(CONFLIST))?)?;
    let want_v6 = ranges(&list).len() == 2;
    // The one change: host-local keeps its leases in this test's directory, not the host's
    // /var/lib/cni/networks, so nothing outlives the test.
    let ipam_dir = tmp.path().join("ipam");
    list["plugins"][0]["ipam"]["dataDir"] = json!(ipam_dir.display().to_string());

    // "node" stands for the host: the bridge, its address and the NAT rules land there.
    let tag = format!(
        "{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let (node, pod) = (
        format!("crisp-cnidef-n-{tag}"),
        format!("crisp-cnidef-p-{tag}"),
    );
    let mut guard = Netns(Vec::new());
    for n in [&node, &pod] {
        run_ok(Command::new("ip").args(["netns", "add", n]))?;
        guard.0.push(n.clone());
    }
    let id = format!("cnidefault{tag}").replace('-', "");

    let result = cni_list(&node, &pod, "ADD", &id, &list)?;
    let ips: Vec<&str> = result["ips"]
        .as_array()
        .context("ADD result has ips")?
        .iter()
        .filter_map(|i| i["address"].as_str())
        .collect();
    let v4 = ips
        .iter()
        .find(|a| a.starts_with("10.88."))
        .with_context(|| format!("no address in 10.88.0.0/16: {result:#}"))?;
    ensure!(v4.ends_with("/16"), "{v4}");
    ensure!(
        ips.len() == if want_v6 { 2 } else { 1 },
        "{} address(es) for {} range(s): {result:#}",
        ips.len(),
        ranges(&list).len()
    );
    if want_v6 {
        ensure!(
            ips.iter().any(|a| a.starts_with("fd42:c815:88:")),
            "{result:#}"
        );
    }
    // The address is on the pod's eth0, the gateway on the node's crisp0, lo is up.
    let pod_addrs =
        run_ok(Command::new("ip").args(["-n", &pod, "-o", "addr", "show", "dev", "eth0"]))?;
    ensure!(pod_addrs.contains(v4), "{pod_addrs}");
    let bridge = run_ok(
        Command::new("ip").args(["-n", &node, "-4", "-o", "addr", "show", "dev", "crisp0"]),
    )?;
    ensure!(bridge.contains("10.88.0.1/16"), "{bridge}");
    let lo = run_ok(Command::new("ip").args(["-n", &pod, "-o", "link", "show", "lo"]))?;
    ensure!(lo.contains("UP"), "{lo}");
    let nat =
        run_ok(Command::new("ip").args(["netns", "exec", &node, "iptables-save", "-t", "nat"]))?;
    ensure!(
        nat.contains("--dport 18080"),
        "portmap's hostPort rule: {nat}"
    );
    ensure!(
        nat.contains(&id),
        "bridge's masquerade rule names the container: {nat}"
    );

    cni_list(&node, &pod, "DEL", &id, &list)?;
    let nat =
        run_ok(Command::new("ip").args(["netns", "exec", &node, "iptables-save", "-t", "nat"]))?;
    ensure!(
        !nat.contains(&id) && !nat.contains("18080"),
        "DEL left rules: {nat}"
    );
    let leases: Vec<_> = std::fs::read_dir(ipam_dir.join("crisp"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('.') || n.contains(':'))
        .filter(|n| !n.starts_with("last_reserved_ip"))
        .collect();
    ensure!(leases.is_empty(), "DEL left leases {leases:?}");
    drop(guard);
    let left = run_ok(Command::new("ip").args(["netns", "list"]))?;
    ensure!(!left.contains(&tag), "namespaces left: {left}");
    Ok(())
}

fn crispd_check(config: &Path) -> Result<Output> {
    run(Command::new(crispd_binary()?)
        .args(["config", "check", "--config"])
        .arg(config))
}

#[test]
fn config_check_names_each_bad_key_and_value() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let crispd = crispd_binary()?;
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        run_ok(Command::new(&crispd).args(["config", "default"]))?,
    )?;
    let out = crispd_check(&good)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("valid"),
        "the printed defaults: {out:?}"
    );

    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"cgroup_drvier = "systemd"
max_container_log_line_size = "16k"
[metrics]
address = "127.0.0.1"
[cni]
conf_dir = "net.d"
"#,
    )?;
    let out = crispd_check(&bad)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a bad file passed: {err}");
    for (key, value) in [
        ("`cgroup_drvier`", "\"systemd\""),
        ("`max_container_log_line_size`", "\"16k\""),
        ("`metrics.address`", "\"127.0.0.1\""),
        ("`cni.conf_dir`", "\"net.d\""),
    ] {
        ensure!(
            err.lines().any(|l| l.contains(key) && l.contains(value)),
            "no line naming {key} = {value}:\n{err}"
        );
    }
    ensure!(err.contains("4 problem(s)"), "{err}");

    // The kind node's config (e2e/kind/config.toml), which no cluster here can try.
    let kind = repo().join("e2e/kind/config.toml");
    let out = crispd_check(&kind)?;
    ensure!(out.status.success(), "{}: {out:?}", kind.display());

    let out = crispd_check(&tmp.path().join("absent.toml"))?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("absent.toml"),
        "a missing --config file: {out:?}"
    );
    Ok(())
}

/// The directory holding the binaries the suite built (crispd, the shim, the snapshotter).
fn built_binaries() -> Result<PathBuf> {
    let crispd = crispd_binary()?;
    let dir = crispd.parent().context("crispd's directory")?.to_path_buf();
    for b in ["containerd-shim-crisp-v2", "crisp-snapshotter"] {
        ensure!(
            dir.join(b).is_file(),
            "{b} not built in {} (cargo build --workspace --bins)",
            dir.display()
        );
    }
    Ok(dir)
}

fn make_install(vars: &[(&str, &Path)], from: &Path) -> Result<String> {
    which("make").context("this test needs make (Debian package make)")?;
    let mut cmd = Command::new("make");
    cmd.arg("-s")
        .arg("-C")
        .arg(repo())
        .arg("install-files")
        .arg(format!("FROM={}", from.display()));
    for (k, v) in vars {
        cmd.arg(format!("{k}={}", v.display()));
    }
    let out = run(&mut cmd)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "make install-files: {}\n{err}",
        out.status
    );
    Ok(err)
}

fn unit_keys(unit: &str) -> BTreeMap<String, String> {
    unit.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn make_install_lays_out_the_node_and_keeps_an_existing_config() -> Result<()> {
    let from = built_binaries()?;
    let tmp = tempfile::tempdir()?;
    let dest = tmp.path().join("dest");
    make_install(&[("DESTDIR", &dest)], &from)?;

    for b in ["crispd", "containerd-shim-crisp-v2", "crisp-snapshotter"] {
        let installed = dest.join("usr/local/bin").join(b);
        ensure!(
            std::fs::read(&installed).ok() == Some(std::fs::read(from.join(b))?),
            "{} is not a copy of the built {b}",
            installed.display()
        );
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&installed)?.permissions());
        ensure!(mode & 0o777 == 0o755, "{b}: mode {mode:o}");
    }

    let conf = dest.join("etc/crisp/config.toml");
    let written = std::fs::read_to_string(&conf).context("config.toml written")?;
    let defaults = run_ok(Command::new(from.join("crispd")).args(["config", "default"]))?;
    let expected = defaults.replace(
        "shim_binary = \"containerd-shim-crisp-v2\"",
        "shim_binary = \"/usr/local/bin/containerd-shim-crisp-v2\"",
    );
    ensure!(
        expected != defaults,
        "the defaults name the shim by name:\n{defaults}"
    );
    ensure!(
        written == expected,
        "config.toml is not the defaults with the installed shim:\n{written}"
    );

    let unit = std::fs::read_to_string(dest.join("etc/systemd/system/crispd.service"))?;
    let keys = unit_keys(&unit);
    for (k, v) in [
        ("ExecStart", "/usr/local/bin/crispd"),
        ("KillMode", "process"),
        ("Delegate", "yes"),
        ("Restart", "always"),
        ("After", "network-online.target local-fs.target"),
        ("Wants", "network-online.target"),
        ("LimitNOFILE", "1048576"),
    ] {
        ensure!(
            keys.get(k).map(String::as_str) == Some(v),
            "unit {k}: want {v}\n{unit}"
        );
    }
    ensure!(
        dest.join("etc/cni/net.d").join(CONFLIST).is_file(),
        "the default network in the empty staged CNI dir"
    );

    // A second install (an upgrade) keeps the operator's config and network, and still
    // rewrites the binaries and the unit.
    let mine = "log_level = \"debug\"\ncgroup_driver = \"systemd\"\n";
    std::fs::write(&conf, mine)?;
    std::fs::write(dest.join("etc/cni/net.d").join(CONFLIST), b"{}")?;
    std::fs::write(dest.join("etc/systemd/system/crispd.service"), b"stale")?;
    let said = make_install(&[("DESTDIR", &dest)], &from)?;
    ensure!(
        std::fs::read_to_string(&conf)? == mine,
        "the existing config was replaced"
    );
    ensure!(said.contains("kept"), "{said}");
    ensure!(
        std::fs::read(dest.join("etc/cni/net.d").join(CONFLIST))? == b"{}",
        "the existing network was replaced"
    );
    ensure!(
        std::fs::read_to_string(dest.join("etc/systemd/system/crispd.service"))? == unit,
        "the unit was not rewritten"
    );

    // An existing config with a mistake is kept too, and the install says what is wrong.
    std::fs::write(&conf, "cgroup_driver = \"cgroupv3\"\n")?;
    let said = make_install(&[("DESTDIR", &dest)], &from)?;
    ensure!(
        said.contains("cgroup_driver") && said.contains("cgroupv3") && said.contains("WARNING"),
        "{said}"
    );
    Ok(())
}

/// `make install-files REQUIRE_STATIC_SHIM=1` (what `make install` runs) from a directory
/// holding the built crispd and snapshotter and `shim` as the shim.
fn install_with_shim(tmp: &Path, name: &str, shim: &Path) -> Result<(Output, PathBuf)> {
    let built = built_binaries()?;
    let from = tmp.join(name).join("from");
    std::fs::create_dir_all(&from)?;
    for b in ["crispd", "crisp-snapshotter"] {
        std::os::unix::fs::symlink(built.join(b), from.join(b))?;
    }
    std::fs::copy(shim, from.join(SHIM))?;
    let dest = tmp.join(name).join("dest");
    which("make").context("this test needs make (Debian package make)")?;
    let out = run(Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(repo())
        .arg("install-files")
        .arg(format!("FROM={}", from.display()))
        .arg(format!("DESTDIR={}", dest.display()))
        .arg("REQUIRE_STATIC_SHIM=1"))?;
    Ok((out, dest.join("usr/local/bin").join(SHIM)))
}

const SHIM: &str = "containerd-shim-crisp-v2";

#[test]
fn make_install_refuses_a_shim_that_is_not_statically_linked() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // The suite's shim is a debug build, linked dynamically as `cargo build` links it.
    let dynamic = built_binaries()?.join(SHIM);
    let interpreter = match linkage(&dynamic)? {
        Linkage::Dynamic { interpreter } => interpreter,
        other => bail!(
            "the suite's {} is {other}: this test wants a dynamic shim",
            dynamic.display()
        ),
    };
    let (out, installed) = install_with_shim(tmp.path(), "dynamic", &dynamic)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a dynamic shim was installed: {err}");
    ensure!(
        err.contains(SHIM) && err.contains("not statically linked") && err.contains(&interpreter),
        "the refusal names neither the shim nor its interpreter: {err}"
    );
    ensure!(
        !installed.exists(),
        "{} was installed anyway",
        installed.display()
    );

    // A static executable passes (busybox-static stands in for `make release`'s shim), is
    // what gets installed, and the install says it is static.
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file(),
        "this test needs /bin/busybox (Debian package busybox-static)"
    );
    let (out, installed) = install_with_shim(tmp.path(), "static", busybox)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "a static shim was refused: {err}");
    ensure!(
        matches!(linkage(&installed)?, Linkage::Static { .. }),
        "{} is {}",
        installed.display(),
        linkage(&installed)?
    );
    ensure!(err.contains(&format!("{SHIM} (static)")), "{err}");
    Ok(())
}

fn systemd_analyze_verify(unit: &Path) -> Result<(bool, String)> {
    let bin = which("systemd-analyze")
        .context("this test needs systemd-analyze (Debian package systemd)")?;
    let out = run(Command::new(bin).arg("verify").arg(unit))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn installed_unit_passes_systemd_analyze_verify() -> Result<()> {
    let from = built_binaries()?;
    let tmp = tempfile::tempdir()?;
    // Installed for real under a prefix of our own (no DESTDIR), so ExecStart names an
    // executable that exists, as verify requires.
    let prefix = tmp.path().join("usr");
    let (etc, units, cni) = (
        tmp.path().join("etc"),
        tmp.path().join("systemd"),
        tmp.path().join("net.d"),
    );
    make_install(
        &[
            ("PREFIX", &prefix),
            ("SYSCONFDIR", &etc),
            ("SYSTEMDUNITDIR", &units),
            ("CNI_CONF_DIR", &cni),
        ],
        &from,
    )?;
    let unit = units.join("crispd.service");
    let text = std::fs::read_to_string(&unit)?;
    ensure!(
        text.contains(&format!("ExecStart={}/bin/crispd\n", prefix.display())),
        "{text}"
    );
    let (ok, warnings) = systemd_analyze_verify(&unit)?;
    ensure!(
        ok && warnings.trim().is_empty(),
        "systemd-analyze verify: {warnings}"
    );
    let conf = std::fs::read_to_string(etc.join("crisp/config.toml"))?;
    ensure!(
        conf.contains(&format!(
            "shim_binary = \"{}/bin/containerd-shim-crisp-v2\"",
            prefix.display()
        )),
        "{conf}"
    );

    // The same check sees a misspelt key on this host: the pass above means something.
    let bad = tmp.path().join("bad/crispd.service");
    std::fs::create_dir_all(bad.parent().context("parent")?)?;
    std::fs::write(&bad, text.replace("Delegate=yes", "Delegat=yes"))?;
    let (_, warnings) = systemd_analyze_verify(&bad)?;
    if !warnings.contains("Delegat") {
        bail!("systemd-analyze verify did not flag an unknown key: {warnings:?}");
    }
    Ok(())
}
