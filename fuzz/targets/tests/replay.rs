//! Replays every file of `fuzz/corpus/<target>/` through its fuzz target on stable, so the
//! corpus the fuzzer grew (and every crash it found, once fixed) is checked by `make test`.

use std::path::PathBuf;

fn replay(target: &str) {
    let (_, run) = crisp_fuzz_targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let mut n = 0;
    for e in entries {
        let path = e.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("{}", path.display());
        run(&data);
        n += 1;
    }
    assert!(n > 0, "corpus {} is empty", dir.display());
}

#[test]
fn authority() {
    replay("authority");
}

#[test]
fn spdy_frames() {
    replay("spdy_frames");
}

#[test]
fn layer_unpack() {
    replay("layer_unpack");
}

#[test]
fn hosts_toml() {
    replay("hosts_toml");
}

#[test]
fn image_reference() {
    replay("image_reference");
}

#[test]
fn manifest_json() {
    replay("manifest_json");
}

#[test]
fn oci_spec() {
    replay("oci_spec");
}

/// Every target has a test above (a new target without one would go unreplayed).
#[test]
fn every_target_is_replayed() {
    let src = include_str!("replay.rs");
    for (name, _) in crisp_fuzz_targets::TARGETS {
        assert!(
            src.contains(&format!("fn {name}()")),
            "no replay test for {name}"
        );
    }
}
