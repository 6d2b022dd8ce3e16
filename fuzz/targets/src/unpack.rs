//! The layer unpacker: tar (gzip, zstd or plain) with whiteouts, applied to a directory.

use std::sync::Once;

/// Files the unpacker writes are capped at this size (RLIMIT_FSIZE, with SIGXFSZ ignored so
/// the write fails with EFBIG): a small compressed input may expand a thousandfold.
const MAX_FILE: u64 = 1 << 20;

/// Unpacks `data` into `<tmp>/root`. Invariant: whatever the layer says (`..`, absolute
/// paths, symlinks, hard links, whiteouts), nothing appears in `<tmp>` beside `root`, and a
/// file planted there stays as it was.
pub fn layer_unpack(data: &[u8]) {
    static LIMIT: Once = Once::new();
    LIMIT.call_once(limit_file_size);
    let tmp = tempfile::tempdir().expect("a temporary directory for the layer");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("the layer's root directory");
    let canary = tmp.path().join("canary");
    std::fs::write(&canary, b"untouched").expect("the canary file");
    let _ = crisp_image::unpack::unpack_layer(data, &root);
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("list the temporary directory")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["canary", "root"],
        "the layer wrote outside its root"
    );
    let meta = std::fs::symlink_metadata(&canary).expect("the canary is still there");
    assert!(meta.is_file(), "the canary was replaced");
    assert_eq!(
        std::fs::read(&canary).expect("read the canary"),
        b"untouched"
    );
}

fn limit_file_size() {
    let lim = libc::rlimit {
        rlim_cur: MAX_FILE,
        rlim_max: MAX_FILE,
    };
    // SAFETY: setrlimit with a valid rlimit; signal() with SIG_IGN for SIGXFSZ. Both affect
    // only this (fuzzing or test) process.
    unsafe {
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim),
            0,
            "setrlimit(RLIMIT_FSIZE)"
        );
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
