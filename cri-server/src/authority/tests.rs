use super::*;

/// The grpc-go 1.51 header blocks, one copy for these tests and tests/authority.rs.
#[path = "../../tests/common/grpc_go_blocks.rs"]
mod grpc_go_blocks;
use grpc_go_blocks::{GRPC_BLOCK_1, GRPC_BLOCK_2, GRPC_BLOCK_3};

type Headers = Vec<(String, String, bool)>;

fn grpc_headers(path: &str, authority: &str, timeout: &str) -> Headers {
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-go/1.51.0"),
        ("te", "trailers"),
        ("grpc-timeout", timeout),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string(), false))
    .collect()
}

fn frame(typ: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame_header(&mut out, payload.len(), typ, flags, stream_id);
    out.extend_from_slice(payload);
    out
}

fn settings() -> Vec<u8> {
    // SETTINGS with ENABLE_PUSH=0, as grpc-go sends first.
    frame(0x4, 0, 0, &[0x00, 0x02, 0, 0, 0, 0])
}

fn data(stream_id: u32, payload: &[u8]) -> Vec<u8> {
    frame(0x0, FLAG_END_STREAM, stream_id, payload)
}

fn headers(stream_id: u32, block: &[u8]) -> Vec<u8> {
    frame(TYPE_HEADERS, FLAG_END_HEADERS, stream_id, block)
}

fn conn(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut v = PREFACE.to_vec();
    for f in frames {
        v.extend_from_slice(f);
    }
    v
}

fn run(input: &[u8]) -> (Vec<u8>, AuthorityRewriter) {
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::new();
    r.feed(input, &mut out);
    (out, r)
}

#[derive(Debug, PartialEq)]
struct Frame {
    typ: u8,
    flags: u8,
    stream_id: u32,
    payload: Vec<u8>,
}

/// Split the forwarded stream into its preface and frames (panics: test helper).
fn frames(out: &[u8]) -> Vec<Frame> {
    assert_eq!(&out[..24], PREFACE, "preface forwarded");
    let mut rest = &out[24..];
    let mut v = Vec::new();
    while !rest.is_empty() {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        assert!(len <= OUT_MAX_FRAME, "frame of {len} bytes");
        v.push(Frame {
            typ: rest[3],
            flags: rest[4],
            stream_id: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
            payload: rest[9..9 + len].to_vec(),
        });
        rest = &rest[9 + len..];
    }
    v
}

/// Header blocks of the forwarded frames (HEADERS without padding/priority + CONTINUATION).
fn blocks(frames: &[Frame]) -> Vec<(u32, Vec<u8>)> {
    let mut v: Vec<(u32, Vec<u8>)> = Vec::new();
    for f in frames {
        match f.typ {
            TYPE_HEADERS => {
                let skip = if f.flags & FLAG_PRIORITY != 0 { 5 } else { 0 };
                assert_eq!(f.flags & FLAG_PADDED, 0, "we never write padding");
                v.push((f.stream_id, f.payload[skip..].to_vec()));
            }
            TYPE_CONTINUATION => v
                .last_mut()
                .expect("CONTINUATION after HEADERS")
                .1
                .extend_from_slice(&f.payload),
            _ => {}
        }
    }
    v
}

/// Decode a forwarded block the way h2 sees it: with a fresh decoder (h2's table must stay
/// empty, so a block must not depend on earlier ones) that must still be empty afterwards.
fn decode_forwarded(block: &[u8]) -> Headers {
    let mut d = Decoder::new();
    let mut fields = Vec::new();
    d.decode(block, &mut fields)
        .expect("forwarded block decodes");
    assert!(
        d.table.is_empty(),
        "forwarded block inserted into the dynamic table"
    );
    fields
        .into_iter()
        .filter_map(|f| match f {
            Field::Header {
                name,
                value,
                never_indexed,
            } => Some((
                String::from_utf8(name).expect("utf-8 name"),
                String::from_utf8(value).expect("utf-8 value"),
                never_indexed,
            )),
            Field::SizeUpdate(_) => None,
        })
        .collect()
}

#[test]
fn grpc_go_path_authority_becomes_localhost() {
    let input = conn(&[settings(), headers(1, GRPC_BLOCK_1), data(1, b"\0\0\0\0\0")]);
    let (out, r) = run(&input);
    let fs = frames(&out);
    assert_eq!(fs.len(), 3);
    assert_eq!(
        fs[0],
        Frame {
            typ: 4,
            flags: 0,
            stream_id: 0,
            payload: vec![0, 2, 0, 0, 0, 0]
        }
    );
    assert_eq!(fs[1].typ, TYPE_HEADERS);
    assert_eq!(fs[1].flags, FLAG_END_HEADERS);
    assert_eq!(fs[1].stream_id, 1);
    assert_eq!(
        decode_forwarded(&fs[1].payload),
        grpc_headers(
            "/runtime.v1.RuntimeService/Version",
            "localhost",
            "1999962u"
        )
    );
    assert_eq!(
        fs[2],
        Frame {
            typ: 0,
            flags: 1,
            stream_id: 1,
            payload: vec![0; 5]
        }
    );
    assert_eq!(r.rewritten(), 1);
    assert!(!r.is_passthrough());
    // An independent decoder (loona-hpack's) reads what h2 will read.
    let mut other = loona_hpack::Decoder::new();
    let got = other
        .decode(&fs[1].payload)
        .expect("loona decodes our block");
    assert_eq!(got[3], (b":authority".to_vec(), b"localhost".to_vec()));
}

#[test]
fn valid_authority_and_other_frames_pass_unchanged() {
    // A literal block (no Huffman, no indexing) with a valid authority.
    let mut block = vec![0x83, 0x86];
    for (name_idx, value) in [(4u8, &b"/x.Y/Z"[..]), (1, b"localhost:1234")] {
        block.push(name_idx);
        encode_str(&mut block, value);
    }
    let ping = frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let wupd = frame(0x8, 0, 0, &[0, 0, 0x10, 0]);
    let input = conn(&[
        settings(),
        ping.clone(),
        wupd.clone(),
        headers(3, &block),
        data(3, b"abc"),
    ]);
    let (out, r) = run(&input);
    let fs = frames(&out);
    assert_eq!(fs.len(), 5);
    assert_eq!(fs[1], frames(&conn(&[ping]))[0]);
    assert_eq!(fs[2], frames(&conn(&[wupd]))[0]);
    let h = decode_forwarded(&fs[3].payload);
    assert_eq!(h[3], (":authority".into(), "localhost:1234".into(), false));
    assert_eq!(h[2], (":path".into(), "/x.Y/Z".into(), false));
    // This block was already in our output form: it comes out byte for byte.
    assert_eq!(fs[3].payload, block);
    assert_eq!(r.rewritten(), 0);
}

#[test]
fn dynamic_table_references_across_blocks() {
    let input = conn(&[
        settings(),
        headers(1, GRPC_BLOCK_1),
        data(1, b"\0\0\0\0\0"),
        headers(3, GRPC_BLOCK_2),
        data(3, b"\0\0\0\0\0"),
        headers(5, GRPC_BLOCK_3),
        data(5, b"\0\0\0\0\0"),
    ]);
    let (out, r) = run(&input);
    let bs = blocks(&frames(&out));
    assert_eq!(bs.len(), 3);
    assert_eq!(
        bs.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![1, 3, 5],
        "stream ids kept"
    );
    assert_eq!(
        decode_forwarded(&bs[0].1),
        grpc_headers(
            "/runtime.v1.RuntimeService/Version",
            "localhost",
            "1999962u"
        )
    );
    assert_eq!(
        decode_forwarded(&bs[1].1),
        grpc_headers(
            "/runtime.v1.RuntimeService/Version",
            "localhost",
            "1999971u"
        )
    );
    let mut third = grpc_headers(
        "/runtime.v1.ImageService/ListImages",
        "localhost",
        "119999950u",
    );
    third.push(("authorization".into(), "Bearer secret".into(), true));
    assert_eq!(decode_forwarded(&bs[2].1), third, "sensitive flag kept");
    assert_eq!(r.rewritten(), 3);
    // Our decoder followed the client's table: the grpc-go blocks decode, unrewritten, to
    // what grpc-go encoded.
    let mut d = Decoder::new();
    for (block, path, authority, t) in [
        (
            GRPC_BLOCK_1,
            "/runtime.v1.RuntimeService/Version",
            "/run/crisp/crisp.sock",
            "1999962u",
        ),
        (
            GRPC_BLOCK_2,
            "/runtime.v1.RuntimeService/Version",
            "/run/crisp/crisp.sock",
            "1999971u",
        ),
    ] {
        let mut f = Vec::new();
        d.decode(block, &mut f).expect("grpc-go block decodes");
        let want: Vec<Field> = grpc_headers(path, authority, t)
            .into_iter()
            .map(|(n, v, s)| Field::Header {
                name: n.into_bytes(),
                value: v.into_bytes(),
                never_indexed: s,
            })
            .collect();
        assert_eq!(f, want);
    }
}

#[test]
fn continuation_padding_and_priority() {
    let (a, rest) = GRPC_BLOCK_1.split_at(10);
    let (b, c) = rest.split_at(40);
    // HEADERS: PADDED (pad 7) + PRIORITY (exclusive dep on 0, weight 16), no END_HEADERS.
    let mut p = vec![7u8];
    p.extend_from_slice(&[0x80, 0, 0, 0, 15]);
    p.extend_from_slice(a);
    p.extend_from_slice(&[0; 7]);
    let input = conn(&[
        frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            7,
            &p,
        ),
        frame(TYPE_CONTINUATION, 0, 7, b),
        frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 7, c),
        data(9, b"z"),
    ]);
    let (out, r) = run(&input);
    let fs = frames(&out);
    assert_eq!(fs.len(), 2, "one HEADERS frame out, then the DATA frame");
    assert_eq!(fs[0].typ, TYPE_HEADERS);
    assert_eq!(
        fs[0].flags,
        FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS
    );
    assert_eq!(fs[0].stream_id, 7);
    assert_eq!(&fs[0].payload[..5], &[0x80, 0, 0, 0, 15], "priority kept");
    assert_eq!(
        decode_forwarded(&fs[0].payload[5..]),
        grpc_headers(
            "/runtime.v1.RuntimeService/Version",
            "localhost",
            "1999962u"
        )
    );
    assert_eq!(
        fs[1],
        Frame {
            typ: 0,
            flags: 1,
            stream_id: 9,
            payload: b"z".to_vec()
        }
    );
    assert_eq!(r.rewritten(), 1);
}

#[test]
fn split_reads_give_the_same_bytes() {
    let input = conn(&[
        settings(),
        headers(1, GRPC_BLOCK_1),
        data(1, &[0xaa; 300]),
        headers(3, GRPC_BLOCK_2),
        data(3, b"\0\0\0\0\0"),
        headers(5, GRPC_BLOCK_3),
    ]);
    let (whole, _) = run(&input);
    for chunk in [1, 2, 3, 7, 9, 10, 64] {
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            r.feed(c, &mut out);
        }
        assert_eq!(out, whole, "chunks of {chunk}");
        assert_eq!(r.rewritten(), 3);
    }
    // The same, moving verbatim bytes around the state machine as the adapter does.
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::new();
    let mut rest = &input[..];
    while !rest.is_empty() {
        let direct = r.verbatim_budget().min(rest.len()).min(5);
        if direct > 0 {
            out.extend_from_slice(&rest[..direct]);
            r.skip_verbatim(direct);
            rest = &rest[direct..];
        } else {
            let n = rest.len().min(4);
            r.feed(&rest[..n], &mut out);
            rest = &rest[n..];
        }
    }
    assert_eq!(out, whole);
}

#[test]
fn big_block_is_split_into_continuations() {
    // 40 KB of metadata, sent by the client in 16 KB frames.
    let mut block = GRPC_BLOCK_1.to_vec();
    let big = "v".repeat(40_000);
    block.push(0x00);
    encode_str(&mut block, b"x-big");
    encode_str(&mut block, big.as_bytes());
    let mut fs_in = Vec::new();
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, c) in chunks.iter().enumerate() {
        let typ = if i == 0 {
            TYPE_HEADERS
        } else {
            TYPE_CONTINUATION
        };
        let flags = if i + 1 == chunks.len() {
            FLAG_END_HEADERS
        } else {
            0
        };
        fs_in.push(frame(typ, flags, 1, c));
    }
    let (out, _) = run(&conn(&fs_in));
    let fs = frames(&out);
    assert!(fs.len() >= 3);
    assert_eq!(fs[0].typ, TYPE_HEADERS);
    assert_eq!(fs[0].flags & FLAG_END_HEADERS, 0);
    for f in &fs[1..] {
        assert_eq!(f.typ, TYPE_CONTINUATION);
        assert_eq!(f.stream_id, 1);
    }
    assert_eq!(fs.last().map(|f| f.flags), Some(FLAG_END_HEADERS));
    let h = decode_forwarded(&blocks(&fs)[0].1);
    assert_eq!(h[3].1, "localhost");
    assert_eq!(h[8], ("x-big".into(), big, false));
}

#[test]
fn size_update_forwarded_and_followed() {
    // Size update to 0 (empties the client's table), then back to 4096, then fields.
    let mut block2 = vec![0x20, 0x3f, 0xe1, 0x1f];
    block2.extend_from_slice(&[0x83, 0x86]);
    block2.extend_from_slice(&GRPC_BLOCK_1[2..]); // re-inserts :path etc. (indexes restart)
    let input = conn(&[
        headers(1, GRPC_BLOCK_1),
        headers(3, &block2),
        headers(5, GRPC_BLOCK_2),
    ]);
    let (out, r) = run(&input);
    let bs = blocks(&frames(&out));
    assert_eq!(bs.len(), 3);
    assert_eq!(
        &bs[1].1[..4],
        &[0x20, 0x3f, 0xe1, 0x1f],
        "size updates lead the block"
    );
    for (_, b) in &bs {
        assert_eq!(decode_forwarded(b)[3].1, "localhost");
    }
    assert_eq!(r.rewritten(), 3);
    assert!(!r.is_passthrough());
}

#[test]
fn not_http2_passes_through() {
    let input = b"GET / HTTP/1.1\r\nHost: /run/crisp.sock\r\n\r\n".to_vec();
    let (out, r) = run(&input);
    assert_eq!(out, input);
    assert!(r.is_passthrough());
}

#[test]
fn malformed_input_passes_through_unchanged() {
    let good = conn(&[settings(), headers(1, GRPC_BLOCK_1)]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Block 2 refers to table entries that a lost block 1 would have created.
        ("bad index", conn(&[headers(1, GRPC_BLOCK_2)])),
        ("truncated block", conn(&[headers(1, &GRPC_BLOCK_1[..20])])),
        (
            "frame interleaved in a header block",
            conn(&[
                frame(TYPE_HEADERS, 0, 1, &GRPC_BLOCK_1[..10]),
                data(1, b"x"),
            ]),
        ),
        (
            "CONTINUATION of another stream",
            conn(&[
                frame(TYPE_HEADERS, 0, 1, &GRPC_BLOCK_1[..10]),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &GRPC_BLOCK_1[10..]),
            ]),
        ),
        (
            "padding longer than the frame",
            conn(&[frame(
                TYPE_HEADERS,
                FLAG_PADDED | FLAG_END_HEADERS,
                1,
                &[200, 0x83],
            )]),
        ),
        (
            "size update after a field",
            conn(&[headers(1, &[0x83, 0x20, 0x83])]),
        ),
        (
            "huge integer",
            conn(&[headers(1, &[0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])]),
        ),
    ];
    for (what, input) in cases {
        let (out, r) = run(&input);
        assert_eq!(out, input, "{what}: forwarded as received");
        assert!(r.is_passthrough(), "{what}");
    }
    // After the give-up, everything that follows passes untouched too.
    let mut input = conn(&[headers(1, GRPC_BLOCK_2)]);
    input.extend_from_slice(&good[24..]);
    let (out, _) = run(&input);
    assert_eq!(out, input);
    // An incomplete frame at EOF goes out as received.
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::new();
    let cut = &good[..good.len() - 3];
    r.feed(cut, &mut out);
    r.finish(&mut out);
    assert_eq!(out, cut);
}

#[test]
fn random_input_never_panics() {
    // xorshift: deterministic, no dependency.
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let base = conn(&[
        settings(),
        headers(1, GRPC_BLOCK_1),
        headers(3, GRPC_BLOCK_2),
        headers(5, GRPC_BLOCK_3),
    ]);
    for _ in 0..3000 {
        let mut input = base.clone();
        // Mutate a few bytes after the preface, sometimes truncate, sometimes pure noise.
        match next() % 3 {
            0 => {
                for _ in 0..(next() % 4 + 1) {
                    let i = 24 + (next() as usize) % (input.len() - 24);
                    input[i] = next() as u8;
                }
            }
            1 => input.truncate(24 + (next() as usize) % (input.len() - 24)),
            _ => {
                input.truncate(24);
                for _ in 0..(next() % 200) {
                    input.push(next() as u8);
                }
            }
        }
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        for c in input.chunks((next() % 17 + 1) as usize) {
            r.feed(c, &mut out);
        }
        r.finish(&mut out);
    }
}

#[test]
fn hpack_integers_round_trip() {
    for prefix in [4u8, 5, 6, 7] {
        for v in [
            0usize,
            1,
            14,
            15,
            16,
            30,
            31,
            62,
            63,
            126,
            127,
            128,
            1337,
            16_384,
            1 << 20,
        ] {
            let mut b = Vec::new();
            encode_int(&mut b, v, prefix, 0);
            assert_eq!(
                decode_int(&b, prefix),
                Ok((v, b.len())),
                "{v} with {prefix}-bit prefix"
            );
        }
    }
    // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
    assert_eq!(decode_int(&[0x1f, 0x9a, 0x0a], 5), Ok((1337, 3)));
    assert_eq!(decode_int(&[0x1f, 0x9a], 5), Err(HpackError::Truncated));
}

#[test]
fn authority_validity_matches_h2() {
    for ok in [
        "localhost",
        "localhost:1234",
        "[::1]:50051",
        "example.com",
        "127.0.0.1:10010",
    ] {
        assert!(valid_authority(ok.as_bytes()), "{ok}");
    }
    for bad in [
        "/run/crisp/crisp.sock",
        "",
        "unix:///run/x.sock",
        "a b",
        "\u{e9}",
    ] {
        assert!(!valid_authority(bad.as_bytes()), "{bad}");
    }
}

/// Huffman-encode with RFC 7541's table (test helper: the rewriter never encodes Huffman).
fn huffman_encode(s: &[u8]) -> Vec<u8> {
    let table = &httlib_huffman::encoder::table::ENCODE_TABLE;
    let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
    for &b in s {
        let (len, code) = table[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

#[test]
fn huffman_codes_are_canonical() {
    // The decoder relies on the codes of one length being consecutive.
    let table = &httlib_huffman::encoder::table::ENCODE_TABLE;
    for len in 1..=30u8 {
        let mut codes: Vec<u32> = table
            .iter()
            .filter(|(l, _)| *l == len)
            .map(|(_, c)| *c)
            .collect();
        codes.sort_unstable();
        for w in codes.windows(2) {
            assert_eq!(w[1], w[0] + 1, "length {len}");
        }
    }
    // RFC 7541 C.4.1: "www.example.com".
    let www = [
        0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
    ];
    assert_eq!(HUFFMAN.decode(&www), Ok(b"www.example.com".to_vec()));
    assert_eq!(huffman_encode(b"www.example.com"), www);
}

#[test]
fn huffman_round_trips_and_matches_loona() {
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(HUFFMAN.decode(&huffman_encode(&all)), Ok(all.clone()));
    let mut loona = loona_hpack::huffman::HuffmanDecoder::new();
    let mut s: u32 = 12345;
    for n in 0..500usize {
        let v: Vec<u8> = (0..n % 40)
            .map(|_| {
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (s >> 16) as u8
            })
            .collect();
        let enc = huffman_encode(&v);
        assert_eq!(HUFFMAN.decode(&enc), Ok(v.clone()));
        assert_eq!(loona.decode(&enc).ok(), Some(v));
        // Random bytes: both decoders agree on what is valid and what it means.
        let noise: Vec<u8> = enc.iter().map(|b| b ^ (s as u8)).collect();
        assert_eq!(
            HUFFMAN.decode(&noise).ok(),
            loona.decode(&noise).ok(),
            "{noise:?}"
        );
    }
    // Padding longer than 7 bits, padding not all ones, EOS inside a string.
    assert!(HUFFMAN.decode(&[0xff]).is_err(), "8 bits of padding");
    assert!(HUFFMAN.decode(&[0x06]).is_err(), "'0' then 0b110 padding");
    assert!(HUFFMAN.decode(&[0xff, 0xff, 0xff, 0xfc]).is_err(), "EOS");
}
