use super::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

/// Build a tar entry header with the raw name bytes as given: tar::Builder's path setters
/// refuse `..`, and the point here is to craft what they refuse.
fn raw(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    typ: tar::EntryType,
    data: &[u8],
    link: Option<&str>,
    mode: u32,
) {
    let mut h = tar::Header::new_gnu();
    {
        let g = h.as_gnu_mut().expect("gnu header");
        g.name = [0; 100];
        g.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            g.linkname = [0; 100];
            g.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(typ);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    b.append(&h, data).expect("append");
}

fn finish(b: tar::Builder<Vec<u8>>) -> Vec<u8> {
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gz");
    e.finish().expect("gz")
}

fn sha(data: &[u8]) -> Digest {
    Digest::of(data)
}

struct Sandbox {
    _tmp: tempfile::TempDir,
    outside: PathBuf,
    layer: PathBuf,
}

/// A layer dir with a sibling "outside" dir, to check nothing lands outside.
fn sandbox() -> Sandbox {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outside = tmp.path().join("outside");
    let layer = tmp.path().join("store/layer");
    fs::create_dir_all(&outside).expect("mkdir");
    fs::create_dir_all(&layer).expect("mkdir");
    Sandbox {
        _tmp: tmp,
        outside,
        layer,
    }
}

impl Sandbox {
    fn outside_is_empty(&self) -> bool {
        fs::read_dir(&self.outside)
            .expect("read_dir")
            .next()
            .is_none()
            && fs::read_dir(self.layer.parent().expect("parent"))
                .expect("read_dir")
                .count()
                == 1
    }
}

fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    raw(&mut b, "./", tar::EntryType::Directory, b"", None, 0o755);
    raw(&mut b, "bin/", tar::EntryType::Directory, b"", None, 0o755);
    raw(
        &mut b,
        "bin/tool",
        tar::EntryType::Regular,
        b"#!/bin/sh\necho hi\n",
        None,
        0o4755,
    );
    raw(
        &mut b,
        "bin/alias",
        tar::EntryType::Symlink,
        b"",
        Some("tool"),
        0o777,
    );
    raw(
        &mut b,
        "bin/hard",
        tar::EntryType::Link,
        b"",
        Some("bin/tool"),
        0o755,
    );
    raw(
        &mut b,
        "abs",
        tar::EntryType::Symlink,
        b"",
        Some("/etc/passwd"),
        0o777,
    );
    raw(&mut b, "dev/null", tar::EntryType::Char, b"", None, 0o666);
    raw(&mut b, "run/fifo", tar::EntryType::Fifo, b"", None, 0o600);
    raw(
        &mut b,
        "etc/.wh.gone",
        tar::EntryType::Regular,
        b"",
        None,
        0o600,
    );
    raw(
        &mut b,
        "var/.wh..wh..opq",
        tar::EntryType::Regular,
        b"",
        None,
        0o600,
    );
    // A file with a PAX xattr and uid.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(3);
    h.set_mode(0o640);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_mtime(1_500_000_000);
    b.append_pax_extensions([("SCHILY.xattr.user.test", b"val".as_slice())])
        .expect("pax");
    b.append_data(&mut h, "etc/conf", b"abc".as_slice())
        .expect("append");
    finish(b)
}

#[test]
fn a_reader_that_proves_the_blob_is_counted_not_hashed() {
    let sb = sandbox();
    let tar = sample_tar();
    let data = gzip(&tar);
    let out = unpack_layer_checked(data.as_slice(), &sb.layer, BlobCheck::Reader).expect("unpack");
    assert_eq!(out.compressed_digest, None);
    assert_eq!(out.compressed_size, data.len() as u64);
    assert_eq!(out.diff_id, sha(&tar));
    assert_eq!(out.uncompressed_size, tar.len() as u64);
    assert!(sb.layer.join("bin/tool").exists());
}

#[test]
fn unpacks_every_entry_kind() {
    let sb = sandbox();
    let tar = sample_tar();
    let out = unpack_layer(tar.as_slice(), &sb.layer).expect("unpack");
    assert_eq!(out.diff_id, sha(&tar));
    assert_eq!(out.compressed_digest, Some(sha(&tar)));
    assert_eq!(out.uncompressed_size, tar.len() as u64);
    let l = &sb.layer;
    let tool = fs::metadata(l.join("bin/tool")).expect("tool");
    assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(tool.mtime(), 1_600_000_000);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        fs::read_link(l.join("bin/alias")).expect("link"),
        Path::new("tool")
    );
    assert_eq!(
        fs::read_link(l.join("abs")).expect("link"),
        Path::new("/etc/passwd")
    );
    let null = fs::symlink_metadata(l.join("dev/null")).expect("null");
    assert!(null.file_type().is_char_device());
    assert!(
        fs::symlink_metadata(l.join("run/fifo"))
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    let wh = fs::symlink_metadata(l.join("etc/gone")).expect("whiteout");
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!l.join("etc/.wh.gone").exists());
    let opq = read_xattr(&l.join("var"), "trusted.overlay.opaque");
    assert_eq!(opq.as_deref(), Some(b"y".as_slice()));
    assert!(!l.join("var/.wh..wh..opq").exists());
    let conf = fs::metadata(l.join("etc/conf")).expect("conf");
    assert_eq!(
        (conf.uid(), conf.gid(), conf.mode() & 0o7777, conf.mtime()),
        (1000, 1001, 0o640, 1_500_000_000)
    );
    // tmpfs and ext4 both take user xattrs; skip the check if this one does not.
    if let Some(v) = read_xattr(&l.join("etc/conf"), "user.test") {
        assert_eq!(v, b"val");
    }
    // Directory times are set after their content.
    assert_eq!(
        fs::metadata(l.join("bin")).expect("bin").mtime(),
        1_600_000_000
    );
    assert!(sb.outside_is_empty());
}

fn read_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: test helper; buffers outlive the call.
    let r = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

#[test]
fn gzip_and_zstd_give_the_same_diff_id() {
    let tar = sample_tar();
    let gz = gzip(&tar);
    let zs = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
    for (data, name) in [(gz, "gzip"), (zs, "zstd")] {
        let sb = sandbox();
        let out =
            unpack_layer(data.as_slice(), &sb.layer).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out.diff_id, sha(&tar), "{name}");
        assert_eq!(out.compressed_digest, Some(sha(&data)), "{name}");
        assert_eq!(out.compressed_size, data.len() as u64, "{name}");
        assert!(sb.layer.join("bin/tool").is_file());
    }
}

/// Unpack a crafted tar and expect an error mentioning `needle`, with nothing outside.
fn expect_rejected(tar: &[u8], needle: &str) -> Error {
    let sb = sandbox();
    let err = unpack_layer(tar, &sb.layer).expect_err("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
    assert!(
        sb.outside_is_empty(),
        "something was written outside the layer: {msg}"
    );
    assert!(!sb.outside.join("pwned").exists());
    err
}

#[test]
fn rejects_path_traversal() {
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "../outside/pwned",
        tar::EntryType::Regular,
        b"x",
        None,
        0o644,
    );
    let e = expect_rejected(&finish(b), "../outside/pwned");
    assert!(e.to_string().contains(".."), "{e}");
    assert_eq!(e.kind(), Kind::FailedPrecondition);
}

#[test]
fn rejects_write_through_symlink() {
    // Relative symlink pointing out, then a write through it.
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "esc",
        tar::EntryType::Symlink,
        b"",
        Some("../../outside"),
        0o777,
    );
    raw(
        &mut b,
        "esc/pwned",
        tar::EntryType::Regular,
        b"x",
        None,
        0o644,
    );
    let e = expect_rejected(&finish(b), "esc/pwned");
    assert!(e.to_string().contains("symlink"), "{e}");
    // Absolute symlink, then a write through it.
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "abs",
        tar::EntryType::Symlink,
        b"",
        Some("/"),
        0o777,
    );
    raw(
        &mut b,
        "abs/tmp/pwned",
        tar::EntryType::Regular,
        b"x",
        None,
        0o644,
    );
    expect_rejected(&finish(b), "abs/tmp/pwned");
}

#[test]
fn rejects_hardlink_outside() {
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "hl",
        tar::EntryType::Link,
        b"",
        Some("../outside/secret"),
        0o644,
    );
    expect_rejected(&finish(b), "\"hl\"");
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "hl",
        tar::EntryType::Link,
        b"",
        Some("/etc/passwd"),
        0o644,
    );
    let e = expect_rejected(&finish(b), "does not exist inside the layer");
    assert!(e.to_string().contains("\"hl\""), "{e}");
    // A hard link through a symlink to outside.
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "s",
        tar::EntryType::Symlink,
        b"",
        Some("/etc"),
        0o777,
    );
    raw(
        &mut b,
        "hl",
        tar::EntryType::Link,
        b"",
        Some("s/passwd"),
        0o644,
    );
    expect_rejected(&finish(b), "symlink");
}

#[test]
fn rejects_directory_over_symlink() {
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "d",
        tar::EntryType::Symlink,
        b"",
        Some("../../outside"),
        0o777,
    );
    raw(&mut b, "d/", tar::EntryType::Directory, b"", None, 0o755);
    raw(
        &mut b,
        "d/pwned",
        tar::EntryType::Regular,
        b"x",
        None,
        0o644,
    );
    let e = expect_rejected(&finish(b), "\"d/\"");
    assert!(e.to_string().contains("replace a symlink"), "{e}");
}

#[test]
fn rejects_oversized_extended_header() {
    let mut b = tar::Builder::new(Vec::new());
    let big = vec![b'a'; (MAX_EXTENDED_HEADER + 1) as usize];
    raw(
        &mut b,
        "././@LongLink",
        tar::EntryType::GNULongName,
        &big,
        None,
        0o644,
    );
    raw(&mut b, "x", tar::EntryType::Regular, b"x", None, 0o644);
    let e = expect_rejected(&finish(b), "exceeds");
    assert_eq!(e.kind(), Kind::DataLoss);
}

#[test]
fn rejects_truncated_input() {
    let tar = sample_tar();
    let gz = gzip(&tar);
    let e = expect_rejected(&gz[..gz.len() / 2], "");
    assert_eq!(e.kind(), Kind::DataLoss, "{e}");
    // A plain tar cut inside a file's content.
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        "f",
        tar::EntryType::Regular,
        &[7u8; 4096],
        None,
        0o644,
    );
    let t = finish(b);
    let e = expect_rejected(&t[..1024], "\"f\"");
    assert_eq!(e.kind(), Kind::DataLoss, "{e}");
}

#[test]
fn later_entries_replace_earlier_ones() {
    let sb = sandbox();
    let mut b = tar::Builder::new(Vec::new());
    raw(&mut b, "a", tar::EntryType::Regular, b"one", None, 0o644);
    raw(&mut b, "a", tar::EntryType::Regular, b"two", None, 0o600);
    raw(&mut b, "l", tar::EntryType::Symlink, b"", Some("a"), 0o777);
    raw(&mut b, "l", tar::EntryType::Regular, b"file", None, 0o644);
    unpack_layer(finish(b).as_slice(), &sb.layer).expect("unpack");
    assert_eq!(fs::read(sb.layer.join("a")).expect("a"), b"two");
    assert_eq!(fs::read(sb.layer.join("l")).expect("l"), b"file");
}

#[test]
fn guard_follows_pax_size_and_base256() {
    assert_eq!(parse_size(b"00000001000\0"), Some(512));
    let mut f = [0u8; 12];
    f[0] = 0x80;
    f[11] = 5;
    assert_eq!(parse_size(&f), Some(5));
    assert_eq!(pax_size(b"12 size=100\n"), Some(100));
    assert_eq!(pax_size(b"11 path=ab\n"), None);
}

/// The hashing thread sees every byte once and in order, whatever sizes the reads have:
/// 3 MiB read in pieces of 1 byte up to 300 KiB (across many 256 KiB batches) give the digest
/// and length of hashing it whole.
#[test]
fn hash_reader_matches_a_whole_hash_across_batches() {
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    let mut r = HashReader::new(&data[..]);
    let mut buf = vec![0u8; 300 * 1024];
    let mut size = 1;
    loop {
        let n = r.read(&mut buf[..size]).expect("read");
        if n == 0 {
            break;
        }
        size = size * 3 % (300 * 1024) + 1;
    }
    let (d, n, _) = r.finish().expect("finish");
    assert_eq!(n, data.len() as u64);
    assert_eq!(d, Digest::from_sha256(&Sha256::digest(&data)));
}

/// A file written through `Writeback` holds exactly what was written, across the points where
/// writeback is started.
#[test]
fn writeback_file_holds_what_was_written() {
    use std::io::Write;
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("f");
    let data: Vec<u8> = (0..(WRITEBACK_EVERY as u32 * 2 + 12345))
        .map(|i| (i % 251) as u8)
        .collect();
    let mut w = Writeback::new(fs::File::create(&path).expect("create"));
    for piece in data.chunks(1 << 20) {
        w.write_all(piece).expect("write");
    }
    assert_eq!(w.started, 2 * WRITEBACK_EVERY, "writeback started twice");
    drop(w);
    assert_eq!(fs::read(&path).expect("read back"), data);
}
