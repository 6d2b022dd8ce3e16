//! Accept CRI clients that send the socket path as HTTP/2 `:authority`.
//!
//! grpc-go before 1.53 (kubelet, crictl and critest up to Kubernetes 1.27) dials a unix
//! socket with the socket *path* as `:authority` (`/run/crisp/crisp.sock`). h2, under tonic,
//! parses `:authority` as a URI authority, finds it malformed and resets every stream with
//! PROTOCOL_ERROR, so those clients cannot talk to crispd at all. containerd (grpc-go server)
//! accepts them. h2 has no switch for this and we do not patch it, so crispd puts a small
//! adapter between the accepted socket and tonic that rewrites such an `:authority` to
//! `localhost` in the client→server byte stream. The server→client direction is untouched.
//!
//! How the rewrite stays correct: a header block is HPACK-compressed against a dynamic table
//! that the client's encoder and the server's decoder build in lockstep. We decode every
//! request header block with our own decoder, which follows the client's table (insertions,
//! evictions, size updates), and forward it re-encoded with no reference into the dynamic
//! table and no insertion into it: every field a "literal without indexing" (or "never
//! indexed" when the client marked it so), names by static-table index where one exists.
//! h2's dynamic table therefore stays empty, and consistent, for the whole connection, so
//! blocks we change and blocks we don't are decoded the same way. Frames other than
//! HEADERS/CONTINUATION (DATA above all) pass byte for byte, without buffering.
//!
//! Anything we cannot parse (no HTTP/2 preface, a malformed frame or header block, a block
//! over 16 MiB) switches the connection to plain pass-through from that point: h2 then sees
//! the client's own bytes and reports the error itself. Nothing here panics on input.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a malformed `:authority` becomes: what grpc-go 1.53+ sends for unix sockets.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Frames we write are at most the protocol's minimum SETTINGS_MAX_FRAME_SIZE, which every
/// server accepts whatever it advertised.
const OUT_MAX_FRAME: usize = 16_384;
/// h2's default max header list size: a bigger encoded block is not a request anyone sends.
const MAX_BLOCK: usize = 16 << 20;
/// Cap on the client's dynamic table (h2 itself allows 4096; a larger size update is
/// forwarded and rejected by h2, this only bounds our memory meanwhile).
const MAX_TABLE: usize = 1 << 20;
/// Size of an HPACK dynamic table before any size update (RFC 7541 §4.2, RFC 9113 §6.5.2).
const DEFAULT_TABLE: usize = 4096;

/// Whether the first rewrite was logged at info.
static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The client→server half: a pure state machine, bytes in, bytes out.
pub struct AuthorityRewriter {
    state: State,
    /// Bytes of the preface or of a frame header being collected.
    head: Vec<u8>,
    /// The header block being collected (HEADERS + CONTINUATION frames).
    block: Option<Block>,
    decoder: Decoder,
    rewritten: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preface,
    FrameHeader,
    /// Payload bytes of a frame we do not touch.
    Forward {
        remaining: usize,
    },
    /// Payload bytes of a HEADERS or CONTINUATION frame, collected into `block.raw`.
    HeaderPayload {
        remaining: usize,
        flags: u8,
        first: bool,
    },
    Passthrough,
}

struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The client's frames as received, to forward unchanged if we give up.
    raw: Vec<u8>,
    /// Where the payload of the frame being collected starts in `raw`.
    payload_start: usize,
    /// The concatenated header block fragments.
    fragment: Vec<u8>,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityRewriter {
    pub fn new() -> Self {
        AuthorityRewriter {
            state: State::Preface,
            head: Vec::with_capacity(PREFACE.len()),
            block: None,
            decoder: Decoder::new(),
            rewritten: 0,
        }
    }

    /// How many `:authority` values have been replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Whether the connection fell back to forwarding everything unchanged.
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// How many of the next input bytes will be forwarded exactly as they come, so the
    /// caller may move them without `feed` (see `skip_verbatim`).
    pub fn verbatim_budget(&self) -> usize {
        match self.state {
            State::Forward { remaining } => remaining,
            State::Passthrough => usize::MAX,
            _ => 0,
        }
    }

    /// The caller forwarded `n <= verbatim_budget()` bytes itself.
    pub fn skip_verbatim(&mut self, n: usize) {
        if let State::Forward { remaining } = self.state {
            let left = remaining.saturating_sub(n);
            self.state = if left == 0 {
                State::FrameHeader
            } else {
                State::Forward { remaining: left }
            };
        }
    }

    /// End of input: whatever is held back (an incomplete frame) goes out as received.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(b) = self.block.take() {
            out.extend_from_slice(&b.raw);
        }
        out.append(&mut self.head);
        self.state = State::Passthrough;
    }

    /// Consume client bytes, append the bytes to forward to the server to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Preface => {
                    let want = PREFACE.len() - self.head.len();
                    let n = want.min(input.len());
                    self.head.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if !PREFACE.starts_with(&self.head) {
                        // Not HTTP/2 with prior knowledge: none of our business.
                        out.append(&mut self.head);
                        self.state = State::Passthrough;
                    } else if self.head.len() == PREFACE.len() {
                        out.append(&mut self.head);
                        self.state = State::FrameHeader;
                    }
                }
                State::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.head.len()).min(input.len());
                    self.head.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.head.len() == FRAME_HEADER_LEN {
                        self.frame_header(out);
                    }
                }
                State::Forward { remaining } => {
                    let n = remaining.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.skip_verbatim(n);
                }
                State::HeaderPayload {
                    remaining,
                    flags,
                    first,
                } => {
                    let n = remaining.min(input.len());
                    let Some(block) = self.block.as_mut() else {
                        self.give_up(out);
                        continue;
                    };
                    block.raw.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if remaining == n {
                        self.state = State::FrameHeader;
                        self.header_frame_done(flags, first, out);
                    } else {
                        self.state = State::HeaderPayload {
                            remaining: remaining - n,
                            flags,
                            first,
                        };
                    }
                }
            }
        }
    }

    /// A complete 9-byte frame header is in `head`.
    fn frame_header(&mut self, out: &mut Vec<u8>) {
        let h = &self.head;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let (typ, flags) = (h[3], h[4]);
        let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        match (&mut self.block, typ) {
            (Some(b), TYPE_CONTINUATION) if b.stream_id == stream_id => {
                if b.raw.len() + FRAME_HEADER_LEN + len > MAX_BLOCK {
                    self.give_up(out);
                    return;
                }
                b.raw.append(&mut self.head);
                b.payload_start = b.raw.len();
            }
            (Some(_), _) => {
                // Anything but the block's CONTINUATION is a protocol error: h2's to report.
                self.give_up(out);
                return;
            }
            (None, TYPE_HEADERS) => {
                let mut raw = Vec::with_capacity(FRAME_HEADER_LEN + len);
                raw.append(&mut self.head);
                self.block = Some(Block {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    priority: None,
                    raw,
                    payload_start: FRAME_HEADER_LEN,
                    fragment: Vec::new(),
                });
            }
            (None, _) => {
                out.append(&mut self.head);
                self.state = if len == 0 {
                    State::FrameHeader
                } else {
                    State::Forward { remaining: len }
                };
                return;
            }
        }
        let first = typ == TYPE_HEADERS;
        if len == 0 {
            self.header_frame_done(flags, first, out);
        } else {
            self.state = State::HeaderPayload {
                remaining: len,
                flags,
                first,
            };
        }
    }

    /// The payload of a HEADERS/CONTINUATION frame is complete in `block.raw`.
    fn header_frame_done(&mut self, flags: u8, first: bool, out: &mut Vec<u8>) {
        let Some(block) = self.block.as_mut() else {
            self.give_up(out);
            return;
        };
        let payload = &block.raw[block.payload_start..];
        let fragment = if first {
            let mut start = 0;
            let mut pad = 0;
            if flags & FLAG_PADDED != 0 {
                match payload.first() {
                    Some(&p) => pad = usize::from(p),
                    None => return self.give_up(out),
                }
                start = 1;
            }
            if flags & FLAG_PRIORITY != 0 {
                match payload.get(start..start + 5) {
                    Some(p) => block.priority = <[u8; 5]>::try_from(p).ok(),
                    None => return self.give_up(out),
                }
                start += 5;
            }
            match payload.len().checked_sub(pad) {
                Some(end) if end >= start => &payload[start..end],
                _ => return self.give_up(out),
            }
        } else {
            payload
        };
        block.fragment.extend_from_slice(fragment);
        if flags & FLAG_END_HEADERS != 0 {
            self.block_done(out);
        }
    }

    /// A whole header block is collected: decode it, re-encode it, write it out.
    fn block_done(&mut self, out: &mut Vec<u8>) {
        let Some(block) = self.block.take() else {
            return;
        };
        let mut enc = Vec::with_capacity(block.fragment.len() * 2 + 16);
        let rewritten = &mut self.rewritten;
        let decoded = self.decoder.decode_with(&block.fragment, |f| match f {
            FieldRef::SizeUpdate(n) => encode_int(&mut enc, n, 5, 0x20),
            FieldRef::Header {
                name,
                value,
                never_indexed,
                name_index,
                mut full_index,
            } => {
                let value: &[u8] = if name == b":authority" && !valid_authority(value) {
                    // Once per daemon where an operator sees it (it tells an old client is
                    // around), then at debug: such clients send it on every call, and crictl
                    // opens a connection per command.
                    if !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!(
                            authority = %String::from_utf8_lossy(value),
                            "a client sends a malformed :authority (grpc-go < 1.53 on a \
                             unix socket); rewriting such values to localhost"
                        );
                    } else {
                        tracing::debug!(
                            authority = %String::from_utf8_lossy(value),
                            "rewrote a malformed :authority to localhost"
                        );
                    }
                    *rewritten += 1;
                    full_index = None;
                    REPLACEMENT_AUTHORITY
                } else {
                    value
                };
                // A whole static-table entry is one indexed byte (no dynamic table).
                if !never_indexed && let Some(i) = full_index {
                    encode_int(&mut enc, i, 7, 0x80);
                    return;
                }
                // 0000xxxx: literal without indexing; 0001xxxx: never indexed.
                let first = if never_indexed { 0x10 } else { 0x00 };
                match name_index {
                    Some(i) => encode_int(&mut enc, i, 4, first),
                    None => {
                        enc.push(first);
                        encode_str(&mut enc, name);
                    }
                }
                encode_str(&mut enc, value);
            }
        });
        if decoded.is_err() {
            // Malformed for us means malformed for h2 too: let it see the original.
            out.extend_from_slice(&block.raw);
            self.state = State::Passthrough;
            return;
        }
        write_block(out, &block, &enc);
    }

    /// Forward what is held back unchanged and stop interpreting the stream.
    fn give_up(&mut self, out: &mut Vec<u8>) {
        self.finish(out);
    }
}

/// Whether h2 would accept this `:authority` (it parses it as an `http::uri::Authority`).
fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// Write `enc` as a HEADERS frame (+ CONTINUATION frames) for the block's stream.
fn write_block(out: &mut Vec<u8>, block: &Block, enc: &[u8]) {
    let prio_len = if block.priority.is_some() { 5 } else { 0 };
    let first_cap = OUT_MAX_FRAME - prio_len;
    let (first, mut rest) = enc.split_at(enc.len().min(first_cap));
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    frame_header(
        out,
        first.len() + prio_len,
        TYPE_HEADERS,
        flags,
        block.stream_id,
    );
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(OUT_MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, typ: u8, flags: u8, stream_id: u32) {
    // len <= OUT_MAX_FRAME < 2^24 always.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, typ, flags]);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// HPACK (RFC 7541): a decoder that follows the client's dynamic table, and the two encoding
// primitives the re-encoder needs.

#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    SizeUpdate(usize),
    Header {
        name: Vec<u8>,
        value: Vec<u8>,
        never_indexed: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum HpackError {
    #[error("truncated header block")]
    Truncated,
    #[error("integer too large")]
    IntegerOverflow,
    #[error("index {0} not in the table")]
    BadIndex(usize),
    #[error("bad Huffman string")]
    Huffman,
    #[error("table size update not at the start of the block")]
    LateSizeUpdate,
    #[error("table size update to {0} over the limit")]
    TableTooBig(usize),
}

/// One decoded field, borrowed for the time of the callback, with what the re-encoder
/// needs to know about the static table (looked up once per table entry, not per use).
enum FieldRef<'a> {
    SizeUpdate(usize),
    Header {
        name: &'a [u8],
        value: &'a [u8],
        never_indexed: bool,
        /// A static-table index with this name.
        name_index: Option<usize>,
        /// A static-table index with this name and value.
        full_index: Option<usize>,
    },
}

/// A decoded literal: name, a static-table index with that name, value.
type Literal = (Vec<u8>, Option<usize>, Vec<u8>);

struct Entry {
    name: Vec<u8>,
    value: Vec<u8>,
    name_index: Option<usize>,
    full_index: Option<usize>,
}

struct Decoder {
    /// Newest first, as HPACK indexes it (index 62 = front).
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl Decoder {
    fn new() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE,
        }
    }

    /// Decode one complete header block into owned fields (tests, diagnostics).
    #[cfg(test)]
    fn decode(&mut self, buf: &[u8], out: &mut Vec<Field>) -> Result<(), HpackError> {
        self.decode_with(buf, |f| {
            out.push(match f {
                FieldRef::SizeUpdate(n) => Field::SizeUpdate(n),
                FieldRef::Header {
                    name,
                    value,
                    never_indexed,
                    ..
                } => Field::Header {
                    name: name.to_vec(),
                    value: value.to_vec(),
                    never_indexed,
                },
            })
        })
    }

    /// Decode one complete header block, updating the dynamic table as the encoder did,
    /// handing each field to `cb` in order. On error the block is to be dropped whole.
    fn decode_with(
        &mut self,
        mut buf: &[u8],
        mut cb: impl FnMut(FieldRef<'_>),
    ) -> Result<(), HpackError> {
        let mut seen_header = false;
        while let Some(&b) = buf.first() {
            if b & 0x80 != 0 {
                let (idx, n) = decode_int(buf, 7)?;
                buf = &buf[n..];
                cb(self.get(idx)?);
            } else if b & 0x40 != 0 {
                let (name, name_index, value) = self.literal(&mut buf, 6)?;
                let full_index = static_index(&name, &value);
                cb(FieldRef::Header {
                    name: &name,
                    value: &value,
                    never_indexed: false,
                    name_index,
                    full_index,
                });
                self.insert(Entry {
                    name,
                    value,
                    name_index,
                    full_index,
                });
            } else if b & 0x20 != 0 {
                if seen_header {
                    return Err(HpackError::LateSizeUpdate);
                }
                let (size, n) = decode_int(buf, 5)?;
                buf = &buf[n..];
                if size > MAX_TABLE {
                    return Err(HpackError::TableTooBig(size));
                }
                self.max_size = size;
                self.evict(0);
                cb(FieldRef::SizeUpdate(size));
                continue;
            } else {
                let (name, name_index, value) = self.literal(&mut buf, 4)?;
                cb(FieldRef::Header {
                    name: &name,
                    value: &value,
                    never_indexed: b & 0x10 != 0,
                    name_index,
                    full_index: None,
                });
            }
            seen_header = true;
        }
        Ok(())
    }

    /// A literal field: name index (or 0 and a name string), then the value string.
    /// Returns (name, a static index with that name, value).
    fn literal(&mut self, buf: &mut &[u8], prefix: u8) -> Result<Literal, HpackError> {
        let (idx, n) = decode_int(buf, prefix)?;
        *buf = &buf[n..];
        let (name, name_index) = if idx == 0 {
            let name = self.string(buf)?;
            let i = static_name_index(&name);
            (name, i)
        } else {
            match self.get(idx)? {
                FieldRef::Header {
                    name, name_index, ..
                } => (name.to_vec(), name_index),
                FieldRef::SizeUpdate(_) => return Err(HpackError::BadIndex(idx)),
            }
        };
        let value = self.string(buf)?;
        Ok((name, name_index, value))
    }

    fn string(&mut self, buf: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
        let huffman = buf.first().is_some_and(|b| b & 0x80 != 0);
        let (len, n) = decode_int(buf, 7)?;
        let end = n.checked_add(len).ok_or(HpackError::IntegerOverflow)?;
        let raw = buf.get(n..end).ok_or(HpackError::Truncated)?;
        *buf = &buf[end..];
        if huffman {
            HUFFMAN.decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }

    fn get(&self, idx: usize) -> Result<FieldRef<'_>, HpackError> {
        match idx {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (name, value) = STATIC_TABLE[idx - 1];
                Ok(FieldRef::Header {
                    name,
                    value,
                    never_indexed: false,
                    name_index: Some(idx),
                    full_index: Some(idx),
                })
            }
            _ => self
                .table
                .get(idx - 62)
                .map(|e| FieldRef::Header {
                    name: &e.name,
                    value: &e.value,
                    never_indexed: false,
                    name_index: e.name_index,
                    full_index: e.full_index,
                })
                .ok_or(HpackError::BadIndex(idx)),
        }
    }

    fn insert(&mut self, e: Entry) {
        let size = e.name.len() + e.value.len() + 32;
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front(e);
    }

    /// Evict oldest entries until `extra` more octets fit.
    fn evict(&mut self, extra: usize) {
        while self.size + extra > self.max_size {
            match self.table.pop_back() {
                Some(e) => self.size -= e.name.len() + e.value.len() + 32,
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

/// Canonical-code Huffman decoder for RFC 7541 Appendix B (the code table itself comes
/// from httlib-huffman): per code length, the first code and where its symbols start, so
/// decoding costs a compare per bit and no lookups in maps.
struct Huffman {
    first: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    symbols: Vec<u16>,
}

static HUFFMAN: std::sync::LazyLock<Huffman> = std::sync::LazyLock::new(Huffman::new);

impl Huffman {
    fn new() -> Huffman {
        let table = &httlib_huffman::encoder::table::ENCODE_TABLE;
        let mut h = Huffman {
            first: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols: Vec::with_capacity(table.len()),
        };
        for len in 1..=30u8 {
            let mut codes: Vec<(u32, u16)> = (0u16..)
                .zip(table.iter())
                .filter(|(_, (l, _))| *l == len)
                .map(|(sym, (_, code))| (*code, sym))
                .collect();
            codes.sort_unstable();
            let l = usize::from(len);
            h.first[l] = codes.first().map_or(0, |c| c.0);
            h.count[l] = u32::try_from(codes.len()).unwrap_or(0);
            h.offset[l] = h.symbols.len();
            h.symbols.extend(codes.iter().map(|c| c.1));
        }
        h
    }

    fn decode(&self, src: &[u8]) -> Result<Vec<u8>, HpackError> {
        let mut out = Vec::with_capacity(src.len() * 8 / 5 + 1);
        let (mut code, mut len) = (0u32, 0usize);
        for &byte in src {
            for bit in (0..8).rev() {
                code = (code << 1) | u32::from((byte >> bit) & 1);
                len += 1;
                if len > 30 {
                    return Err(HpackError::Huffman);
                }
                // Canonical code: the codes of one length are consecutive.
                let i = code.wrapping_sub(self.first[len]);
                if i < self.count[len] {
                    match self.symbols.get(self.offset[len] + i as usize) {
                        Some(&sym) if sym < 256 => out.push(sym as u8),
                        _ => return Err(HpackError::Huffman), // EOS inside a string
                    }
                    code = 0;
                    len = 0;
                }
            }
        }
        // Padding: at most 7 bits, all ones (a prefix of EOS).
        if len > 7 || code != (1u32 << len) - 1 {
            return Err(HpackError::Huffman);
        }
        Ok(out)
    }
}

/// RFC 7541 §5.1 integer with an N-bit prefix: (value, bytes used).
fn decode_int(buf: &[u8], prefix: u8) -> Result<(usize, usize), HpackError> {
    let first = *buf.first().ok_or(HpackError::Truncated)?;
    let mask = ((1u16 << prefix) - 1) as u8;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Ok((value, 1));
    }
    // At most 4 continuation octets: values up to 2^28, plenty for any length or index.
    for (i, &b) in buf.iter().enumerate().skip(1) {
        if i > 4 {
            return Err(HpackError::IntegerOverflow);
        }
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(HpackError::Truncated)
}

fn encode_int(out: &mut Vec<u8>, mut value: usize, prefix: u8, first: u8) {
    let mask = ((1u16 << prefix) - 1) as usize;
    if value < mask {
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A plain (not Huffman) string literal: h2 reads both.
fn encode_str(out: &mut Vec<u8>, s: &[u8]) {
    encode_int(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

fn static_index(name: &[u8], value: &[u8]) -> Option<usize> {
    STATIC_TABLE
        .iter()
        .position(|(n, v)| *n == name && *v == value)
        .map(|i| i + 1)
}

fn static_name_index(name: &[u8]) -> Option<usize> {
    STATIC_TABLE
        .iter()
        .position(|(n, _)| *n == name)
        .map(|i| i + 1)
}

/// RFC 7541 Appendix A.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

// ---------------------------------------------------------------------------------------
// The I/O adapter tonic serves on.

/// Verbatim runs at least this long are read straight into the reader's buffer.
const DIRECT_MIN: usize = 4096;

/// An accepted connection whose client→server bytes go through an `AuthorityRewriter`.
pub struct FixAuthority<S> {
    inner: S,
    rewriter: AuthorityRewriter,
    scratch: Box<[u8]>,
    /// Rewritten bytes not yet handed to the reader, from `pos`.
    out: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        FixAuthority {
            inner,
            rewriter: AuthorityRewriter::new(),
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            out: Vec::new(),
            pos: 0,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn rewriter(&self) -> &AuthorityRewriter {
        &self.rewriter
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.pos);
                buf.put_slice(&this.out[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.out.len() {
                    this.out.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Big runs of bytes that pass unchanged (DATA payloads) go straight into the
            // caller's buffer; small ones ride along with the next frame header through
            // `scratch`, not in a read of their own.
            let direct = this.rewriter.verbatim_budget().min(buf.remaining());
            if direct >= DIRECT_MIN {
                let mut sub = ReadBuf::new(buf.initialize_unfilled_to(direct));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
                let n = sub.filled().len();
                if n == 0 {
                    this.eof = true;
                    this.rewriter.finish(&mut this.out);
                    continue;
                }
                this.rewriter.skip_verbatim(n);
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut sub = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
            let n = sub.filled().len();
            if n == 0 {
                this.eof = true;
                this.rewriter.finish(&mut this.out);
                continue;
            }
            this.rewriter.feed(&this.scratch[..n], &mut this.out);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FixAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
