//! The bodies of crisp's fuzz targets, one function per front door: bytes a client, a
//! registry or a layer author controls, fed to the code that reads them first.
//!
//! cargo-fuzz (`fuzz/fuzz_targets/*.rs`, nightly) calls each with the fuzzer's input;
//! `tests/replay.rs` runs every file of `fuzz/corpus/<target>/` through the same function
//! on stable, so `make test` replays the corpus. Each function panics only when crisp
//! misbehaves: a panic inside crisp, or a broken invariant checked here (named in the
//! function's doc).

mod spec;
mod unpack;

pub use spec::oci_spec;
pub use unpack::layer_unpack;

use bytes::BytesMut;
use crisp_cri::authority::AuthorityRewriter;
use crisp_stream::spdy::{FrameDecoder, Headers, headers::HeaderDecompressor};
use tokio_util::codec::Decoder;

/// A fuzz target's body: panics only when crisp misbehaves.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory and cargo-fuzz binary.
pub const TARGETS: &[(&str, Target)] = &[
    ("authority", authority),
    ("spdy_frames", spdy_frames),
    ("layer_unpack", layer_unpack),
    ("hosts_toml", hosts_toml),
    ("image_reference", image_reference),
    ("manifest_json", manifest_json),
    ("oci_spec", oci_spec),
];

/// The HTTP/2 `:authority` rewriter reads every byte every CRI client sends. Invariants:
/// the output does not depend on how the input is split into reads, and input that is not
/// an HTTP/2 client preface passes byte for byte.
pub fn authority(data: &[u8]) {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let whole = rewrite(&[input]);
    // A second pass in reads of `split`+1 bytes (the socket decides read sizes, not the client).
    let chunks: Vec<&[u8]> = input.chunks(split as usize + 1).collect();
    let chunked = rewrite(&chunks);
    assert_eq!(whole, chunked, "rewriter output depends on read boundaries");
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let n = input.len().min(preface.len());
    if input[..n] != preface[..n] {
        assert_eq!(whole, input, "non-HTTP/2 input must pass unchanged");
    }
}

fn rewrite(chunks: &[&[u8]]) -> Vec<u8> {
    let mut rw = AuthorityRewriter::new();
    let mut out = Vec::new();
    for c in chunks {
        rw.feed(c, &mut out);
    }
    rw.finish(&mut out);
    out
}

/// SPDY/3.1 frames (the streaming server's exec/attach/port-forward connections) and their
/// zlib-compressed header blocks. The first byte picks: a frame stream through one decoder
/// (the connection's zlib context spans frames), or one raw header block, compressed or not.
/// Invariant: every decoded frame consumed input (no endless loop on a stuck buffer).
pub fn spdy_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let mut dec = FrameDecoder::new();
            let mut buf = BytesMut::from(rest);
            loop {
                let before = buf.len();
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => assert!(
                        buf.len() < before || before == 0,
                        "a frame decoded from {before} bytes consumed none"
                    ),
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = dec.decode_eof(&mut buf);
        }
        1 => {
            let _ = HeaderDecompressor::new().decode(rest);
        }
        _ => {
            let _ = Headers::from_block(rest);
        }
    }
}

/// A registry's `hosts.toml` (the first line names the registry it configures). Invariant:
/// every endpoint it yields has a URL with a scheme.
pub fn hosts_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (registry, toml) = text.split_once('\n').unwrap_or(("docker.io", text));
    let base = std::path::Path::new("/etc/crisp/certs.d").join("fuzz");
    if let Ok(hosts) = crisp_image::hosts::parse_hosts_toml(toml, &base, registry) {
        for h in hosts {
            let url = h.url("/v2/");
            assert!(
                url.starts_with("http://") || url.starts_with("https://"),
                "endpoint without a scheme: {url:?}"
            );
        }
    }
}

/// Image references (kubelet's normalisation), digests and image ids. Invariant: a parsed
/// reference, printed back, parses to the same reference.
pub fn image_reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crisp_image::Digest::parse(text);
    let _ = crisp_image::reference::parse_image_id(text);
    let Ok(r) = crisp_image::Reference::parse(text) else {
        return;
    };
    let printed = r.to_string();
    let again = crisp_image::Reference::parse(&printed)
        .unwrap_or_else(|e| panic!("{text:?} parsed, its form {printed:?} did not: {e}"));
    assert_eq!(again, r, "{text:?} → {printed:?}");
}

/// Manifest, index and image config JSON as a registry serves them, and the platform choice
/// over an index. Must not panic.
pub fn manifest_json(data: &[u8]) {
    use crisp_image::manifest;
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let content_type = match mode % 4 {
        0 => "application/vnd.oci.image.manifest.v1+json",
        1 => "application/vnd.oci.image.index.v1+json",
        2 => "application/vnd.docker.distribution.manifest.v2+json",
        _ => "",
    };
    if let Ok(manifest::Parsed::Index(idx)) = manifest::parse(body, content_type, "fuzz") {
        let _ = manifest::choose(&idx, &manifest::node_platform());
    }
    let digest = crisp_image::Digest::of(body);
    if let Ok(cfg) = manifest::parse_config(body, &digest) {
        let _ = manifest::chain_ids(&cfg.rootfs.diff_ids);
    }
}
