//! Codec and connection tests: frames a real Go spdystream peer wrote, blocks a C zlib
//! compressed with the dictionary, round trips, and malformed input that must end in an
//! error (never a panic, never an unbounded allocation).

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

use super::dictionary::dictionary;
use super::frame::{FLAG_FIN, Frame, FrameDecoder, FrameEncoder, FrameError, goaway, rst};
use super::headers::{HeaderDecompressor, Headers};
use super::{ConnConfig, Connection, Role};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("fixture is hex"))
        .collect()
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(f) = dec.decode_eof(&mut buf)? {
        frames.push(f);
    }
    Ok(frames)
}

fn sorted(h: &Headers) -> Vec<(String, String)> {
    let mut v: Vec<_> = h
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    v.sort();
    v
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = p
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    v.sort();
    v
}

/// Six frames written by moby/spdystream's Framer (Go 1.27, `spdy.NewFramer` + `WriteFrame`):
/// SYN_STREAM 1 {streamType: error, X-Test: [a b]}, SYN_STREAM 3 FIN {streamType: stdout,
/// port: 8080, requestID: 0}, SYN_REPLY 5 {}, DATA 1 FIN "hi", PING 7, GOAWAY 3 OK. The three
/// header blocks share one zlib stream, so decoding the later ones proves one context per
/// direction.
const GO_SPDYSTREAM_CAPTURE: &str = "80030001000000390000000100000000000078f9e3c6a7c262606060626060e02a2e294a4dcc851625aca9a08066606060abd02d498514cc890c4900000000ffff8003000101000032000000030000000000000251186ad98a4b52f24b4b2065781198b630b030606060e02c82c479660a030303a301000000ffff800300020000000e000000056260606000000000ffff0000000101000002686980030006000000040000000780030007000000080000000300000000";

#[test]
fn decodes_frames_written_by_go_spdystream() {
    let frames = decode_all(&unhex(GO_SPDYSTREAM_CAPTURE)).expect("Go's frames decode");
    assert_eq!(frames.len(), 6, "{frames:?}");
    match &frames[0] {
        Frame::SynStream {
            stream_id: 1,
            flags: 0,
            headers,
            ..
        } => {
            assert_eq!(
                sorted(headers),
                pairs(&[("streamtype", "error"), ("x-test", "a"), ("x-test", "b")])
            );
            assert_eq!(headers.get("streamType"), Some("error"));
        }
        other => panic!("frame 0: {other:?}"),
    }
    match &frames[1] {
        Frame::SynStream {
            stream_id: 3,
            flags: FLAG_FIN,
            headers,
            ..
        } => assert_eq!(
            sorted(headers),
            pairs(&[
                ("streamtype", "stdout"),
                ("port", "8080"),
                ("requestid", "0")
            ])
        ),
        other => panic!("frame 1: {other:?}"),
    }
    assert!(
        matches!(&frames[2], Frame::SynReply { stream_id: 5, headers, .. } if headers.is_empty())
    );
    assert_eq!(frames[3], Frame::data(1, Bytes::from_static(b"hi"), true));
    assert_eq!(frames[4], Frame::Ping { id: 7 });
    assert_eq!(
        frames[5],
        Frame::GoAway {
            last_good_stream_id: 3,
            status: goaway::OK
        }
    );
}

/// Two blocks C zlib (Python's zlib module, level 9) compressed in one stream primed with the
/// SPDY/3 dictionary, the second with a NUL-joined multi-value.
#[test]
fn inflates_blocks_from_c_zlib_with_the_dictionary() {
    let mut z = HeaderDecompressor::new();
    let first = unhex("78f9e3c6a7c202a62346703a2b294a4dcc851625acc525c03c01000000ffff");
    let second = unhex("02651c0c2960624ec90797d1ec15bab9a5392599e082942109000000ffff");
    assert_eq!(
        sorted(&z.decode(&first).expect("block 1")),
        pairs(&[("streamtype", "stdin")])
    );
    assert_eq!(
        sorted(&z.decode(&second).expect("block 2")),
        pairs(&[("streamtype", "stdout"), ("x-multi", "a"), ("x-multi", "b")])
    );
}

#[test]
fn refuses_a_block_compressed_without_the_dictionary() {
    let mut z = HeaderDecompressor::new();
    let plain = unhex("78da62606060646060e02a2e294a4dcc2da92c4805f2588b4b5232f300000000ffff");
    let err = z.decode(&plain).expect_err("no dictionary");
    assert!(err.to_string().contains("dictionary"), "{err}");
}

#[test]
fn round_trips_every_frame_over_one_context_per_direction() {
    let h = |t: &str| {
        Headers::new()
            .with("streamType", t)
            .with("port", "80")
            .with("x", "1")
    };
    let frames = vec![
        Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 3,
            flags: 0,
            headers: h("error"),
        },
        Frame::SynReply {
            stream_id: 1,
            flags: 0,
            headers: Headers::new(),
        },
        Frame::SynStream {
            stream_id: 3,
            associated_to: 0,
            priority: 0,
            flags: FLAG_FIN,
            headers: h("stdout"),
        },
        Frame::Headers {
            stream_id: 3,
            flags: 0,
            headers: h("resize"),
        },
        Frame::data(3, Bytes::from(vec![7u8; 70_000]), false),
        Frame::data(3, Bytes::new(), true),
        Frame::RstStream {
            stream_id: 3,
            status: rst::CANCEL,
        },
        Frame::Settings,
        Frame::WindowUpdate {
            stream_id: 1,
            delta: 1000,
        },
        Frame::Ping { id: 9 },
        Frame::GoAway {
            last_good_stream_id: 3,
            status: goaway::OK,
        },
    ];
    let mut enc = FrameEncoder::new();
    let mut wire = BytesMut::new();
    for f in frames.clone() {
        enc.encode(f, &mut wire).expect("encode");
    }
    let got = decode_all(&wire).expect("decode");
    // The decoder hands a big DATA frame out in one piece when it is all buffered.
    assert_eq!(got, frames);
}

#[test]
fn data_frames_are_handed_out_as_they_arrive() {
    let mut enc = FrameEncoder::new();
    let mut wire = BytesMut::new();
    enc.encode(
        Frame::data(5, Bytes::from(vec![1u8; 1000]), true),
        &mut wire,
    )
    .expect("encode");
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for chunk in wire.chunks(100) {
        buf.extend_from_slice(chunk);
        while let Some(f) = dec.decode(&mut buf).expect("decode") {
            got.push(f);
        }
    }
    let total: usize = got
        .iter()
        .map(|f| match f {
            Frame::Data { data, .. } => data.len(),
            _ => panic!("only data"),
        })
        .sum();
    assert_eq!(total, 1000);
    assert!(got.len() > 1, "pieces, not one buffered frame");
    assert!(matches!(got.last(), Some(Frame::Data { fin: true, .. })));
    assert!(
        got[..got.len() - 1]
            .iter()
            .all(|f| matches!(f, Frame::Data { fin: false, .. }))
    );
}

fn control(kind: u16, version: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_u32(0x8000_0000 | (u32::from(version) << 16) | u32::from(kind));
    b.put_u32((u32::from(flags) << 24) | payload.len() as u32);
    b.extend_from_slice(payload);
    b
}

fn syn_with_block(block: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(block);
    control(1, 3, 0, &p)
}

fn dict_deflate(raw: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(Compression::default(), true);
    z.set_dictionary(dictionary()).expect("dictionary");
    let mut out = Vec::with_capacity(raw.len() + 1024);
    z.compress_vec(raw, &mut out, FlushCompress::Sync)
        .expect("deflate");
    out
}

/// Each entry must fail to decode with an error (the connection then sends GOAWAY).
#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let mut bomb = Vec::new();
    bomb.put_u32(1);
    bomb.put_u32(1);
    bomb.put_slice(b"x");
    bomb.put_u32(1 << 20);
    bomb.extend(std::iter::repeat_n(b'a', 1 << 20));
    let mut lying_count = Vec::new();
    lying_count.put_u32(1_000_000);
    let mut long_name = Vec::new();
    long_name.put_u32(1);
    long_name.put_u32(4096);
    long_name.put_slice(b"abc");

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated control header", vec![0x80, 0x03, 0x00]),
        (
            "truncated control payload",
            control(6, 3, 0, &[0, 0, 0, 1])[..10].to_vec(),
        ),
        ("truncated data frame", {
            let mut b = vec![0, 0, 0, 1, 0, 0, 0, 10];
            b.extend_from_slice(b"abc");
            b
        }),
        (
            "data frame claiming 16 MiB",
            vec![0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 1, 2, 3],
        ),
        (
            "control frame claiming 16 MiB",
            vec![0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff],
        ),
        ("SPDY version 2", control(6, 2, 0, &[0, 0, 0, 1])),
        ("SPDY version 0x7fff", control(6, 0x7fff, 0, &[0, 0, 0, 1])),
        (
            "SYN_STREAM shorter than its fields",
            control(1, 3, 0, &[0, 0, 0, 1]),
        ),
        ("SYN_STREAM on stream 0", control(1, 3, 0, &[0; 10])),
        ("RST_STREAM of 4 bytes", control(3, 3, 0, &[0, 0, 0, 1])),
        (
            "RST_STREAM status 0",
            control(3, 3, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
        ),
        ("PING of 3 bytes", control(6, 3, 0, &[0, 0, 1])),
        ("GOAWAY of 4 bytes", control(7, 3, 0, &[0, 0, 0, 1])),
        (
            "SETTINGS count beyond payload",
            control(4, 3, 0, &[0, 0, 0, 9]),
        ),
        ("data frame on stream 0", vec![0, 0, 0, 0, 0, 0, 0, 1, 7]),
        (
            "block compressed without the dictionary",
            syn_with_block(&unhex(
                "78da62606060646060e02a2e294a4dcc2da92c4805f2588b4b5232f300000000ffff",
            )),
        ),
        (
            "block of garbage",
            syn_with_block(b"\x78\xf9\xe3\xc6\xa7\xc2garbage!"),
        ),
        ("block that is not zlib", syn_with_block(b"hello world")),
        ("empty block", syn_with_block(b"")),
        (
            "block inflating to 1 MiB",
            syn_with_block(&dict_deflate(&bomb)),
        ),
        (
            "pair count beyond the block",
            syn_with_block(&dict_deflate(&lying_count)),
        ),
        (
            "name length beyond the block",
            syn_with_block(&dict_deflate(&long_name)),
        ),
    ];
    for (name, bytes) in cases {
        let res = decode_all(&bytes);
        assert!(res.is_err(), "{name}: decoded {res:?}");
    }
}

/// A cheap deterministic fuzz: random bytes, and valid frames with random bytes flipped.
#[test]
fn random_bytes_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let valid = unhex(GO_SPDYSTREAM_CAPTURE);
    for round in 0..3000 {
        let bytes: Vec<u8> = if round % 2 == 0 {
            let len = (next() % 300) as usize;
            (0..len).map(|_| next() as u8).collect()
        } else {
            let mut b = valid.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            b
        };
        let _ = decode_all(&bytes);
    }
}

fn pair() -> (Connection, Connection) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (
        Connection::new(a, ConnConfig::new(Role::Client)),
        Connection::new(b, ConnConfig::new(Role::Server)),
    )
}

#[tokio::test]
async fn streams_carry_data_both_ways_and_fin_is_eof() {
    let (client, mut server) = pair();
    let opener = tokio::spawn(async move {
        let mut s = client
            .open_stream(Headers::new().with("streamType", "stdin"))
            .await
            .expect("open");
        s.write_all(b"ping").await.expect("write");
        s.shutdown().await.expect("fin");
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.expect("read");
        (client, back)
    });
    let mut s = server.accept().await.expect("stream");
    assert_eq!(s.headers().get("streamtype"), Some("stdin"));
    assert_eq!(s.id() % 2, 1, "client streams are odd");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("read to FIN");
    assert_eq!(got, b"ping");
    s.write_all(b"pong").await.expect("write");
    s.shutdown().await.expect("fin");
    let (_client, back) = opener.await.expect("join");
    assert_eq!(back, b"pong");
}

#[tokio::test]
async fn pings_are_answered_and_are_not_activity() {
    let (client, _server) = pair();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        client.ping().await.expect("pong");
    }
    assert!(
        client.idle_for() >= Duration::from_millis(250),
        "pings reset idleness: {:?}",
        client.idle_for()
    );
}

#[tokio::test]
async fn reset_stream_fails_the_peer_reader() {
    let (client, mut server) = pair();
    let opener = tokio::spawn(async move {
        let s = client.open_stream(Headers::new()).await.expect("open");
        (client, s)
    });
    let s = server.accept().await.expect("stream");
    let (_client, mut cs) = opener.await.expect("join");
    s.reset();
    let mut buf = [0u8; 8];
    let err = cs.read(&mut buf).await.expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn refused_streams_are_reset_after_stop_accepting() {
    let (client, mut server) = pair();
    server.stop_accepting();
    let Err(err) = client.open_stream(Headers::new()).await else {
        panic!("stream accepted after stop_accepting");
    };
    assert!(
        matches!(
            err,
            super::ConnError::Reset {
                status: rst::REFUSED_STREAM,
                ..
            }
        ),
        "{err}"
    );
}

/// A peer that stops reading must stop the writer after a bounded amount, not grow a buffer.
#[tokio::test]
async fn a_reader_that_stops_blocks_the_writer() {
    let (client, mut server) = pair();
    let opener = tokio::spawn(async move {
        let s = client.open_stream(Headers::new()).await.expect("open");
        (client, s)
    });
    let _unread = server.accept().await.expect("stream");
    let (_client, mut s) = opener.await.expect("join");
    let chunk = vec![0u8; 32 * 1024];
    let mut written = 0usize;
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.write_all(&chunk)).await {
        r.expect("write");
        written += chunk.len();
        assert!(written < 16 << 20, "wrote {written} bytes nobody reads");
    }
    assert!(written > 0);
}

/// A protocol error gets GOAWAY(PROTOCOL_ERROR) and the connection closed.
#[tokio::test]
async fn protocol_error_sends_goaway_and_closes() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = Connection::new(b, ConnConfig::new(Role::Server));
    let (r, mut w) = tokio::io::split(a);
    w.write_all(&control(6, 2, 0, &[0, 0, 0, 1]))
        .await
        .expect("write");
    let mut frames = FramedRead::new(r, FrameDecoder::new());
    let f = tokio::time::timeout(Duration::from_secs(5), frames.next())
        .await
        .expect("answer in time")
        .expect("a frame")
        .expect("valid frame");
    assert_eq!(
        f,
        Frame::GoAway {
            last_good_stream_id: 0,
            status: goaway::PROTOCOL_ERROR
        }
    );
    tokio::time::timeout(Duration::from_secs(5), server.closed())
        .await
        .expect("connection closed");
    drop(server);
    let end = tokio::time::timeout(Duration::from_secs(7), frames.next())
        .await
        .expect("EOF in time");
    assert!(end.is_none(), "{end:?}");
}

/// The server answers every SYN_STREAM with SYN_REPLY before any data, and echoes pings.
#[tokio::test]
async fn server_replies_to_raw_frames() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let mut server = Connection::new(b, ConnConfig::new(Role::Server));
    let (r, w) = tokio::io::split(a);
    let mut out = FramedWrite::new(w, FrameEncoder::new());
    let mut inp = FramedRead::new(r, FrameDecoder::new());
    out.send(Frame::SynStream {
        stream_id: 1,
        associated_to: 0,
        priority: 0,
        flags: 0,
        headers: Headers::new().with("streamType", "stdout"),
    })
    .await
    .expect("send");
    out.send(Frame::Ping { id: 1 }).await.expect("ping");
    let s = server.accept().await.expect("stream");
    assert_eq!(s.headers().get("streamtype"), Some("stdout"));
    let f = inp.next().await.expect("frame").expect("valid");
    assert!(matches!(f, Frame::SynReply { stream_id: 1, .. }), "{f:?}");
    let f = inp.next().await.expect("frame").expect("valid");
    assert_eq!(f, Frame::Ping { id: 1 });
}
