//! SPDY/3.1 frames on the wire: the subset a Go `spdystream` peer sends and expects.
//!
//! Control frames: `1 | version(15) | type(16) | flags(8) | length(24) | payload`.
//! Data frames:    `0 | stream id(31)           | flags(8) | length(24) | payload`.
//!
//! Data frames are decoded incrementally (a 16 MiB frame never sits in memory whole): the
//! decoder hands out each piece as it arrives, with `fin` on the last one.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::headers::{HeaderCompressor, HeaderDecompressor, Headers};

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// The largest payload the 24-bit length field can carry.
pub const MAX_PAYLOAD: usize = 0x00FF_FFFF;
/// Control frames carry a few headers at most; anything larger is refused before buffering.
pub const MAX_CONTROL_PAYLOAD: usize = 256 * 1024;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes (SPDY/3 section 2.6.3).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const STREAM_IN_USE: u32 = 8;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// Read and ignored: spdystream peers send none that matter.
    Settings,
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    /// Read and ignored: spdystream does no SPDY flow control; TCP gives backpressure.
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A piece of a DATA frame; `fin` is set on the frame's last piece only.
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
}

impl Frame {
    pub fn data(stream_id: u32, data: Bytes, fin: bool) -> Self {
        Frame::Data {
            stream_id,
            fin,
            data,
        }
    }
}

/// Why the byte stream is not SPDY/3.1 a peer may send. Every variant ends the connection
/// (GOAWAY with PROTOCOL_ERROR, then close).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported SPDY version {0} (only 3)")]
    UnsupportedVersion(u16),
    #[error("{kind} frame with invalid length {len}")]
    BadLength { kind: &'static str, len: usize },
    #[error("control frame of {0} bytes exceeds the {MAX_CONTROL_PAYLOAD} byte limit")]
    ControlTooLarge(usize),
    #[error("{0} frame on stream 0")]
    ZeroStreamId(&'static str),
    #[error("{0} frame with invalid field: {1}")]
    Invalid(&'static str, &'static str),
    #[error("header block: {0}")]
    HeaderBlock(String),
}

/// Reads frames; owns the connection's inbound zlib context.
pub struct FrameDecoder {
    inflate: HeaderDecompressor,
    /// The rest of a DATA frame being handed out piecewise: (stream, bytes left, fin flag).
    data_left: Option<(u32, usize, bool)>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self {
            inflate: HeaderDecompressor::new(),
            data_left: None,
        }
    }

    fn continue_data(&mut self, src: &mut BytesMut) -> Option<Frame> {
        let (stream_id, left, fin) = self.data_left?;
        if left > 0 && src.is_empty() {
            return None;
        }
        let take = left.min(src.len());
        let data = src.split_to(take).freeze();
        let left = left - take;
        if left == 0 {
            self.data_left = None;
        } else {
            self.data_left = Some((stream_id, left, fin));
        }
        Some(Frame::Data {
            stream_id,
            fin: fin && left == 0,
            data,
        })
    }

    fn control(&mut self, kind: u16, flags: u8, mut p: Bytes) -> Result<Option<Frame>, FrameError> {
        let need = |name: &'static str, p: &Bytes, min: usize, exact: bool| {
            if p.len() < min || (exact && p.len() != min) {
                Err(FrameError::BadLength {
                    kind: name,
                    len: p.len(),
                })
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            SYN_STREAM => {
                need("SYN_STREAM", &p, 10, false)?;
                let stream_id = p.get_u32() & 0x7FFF_FFFF;
                let associated_to = p.get_u32() & 0x7FFF_FFFF;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                nonzero("SYN_STREAM", stream_id)?;
                let headers = self.inflate.decode(&p)?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers,
                }
            }
            SYN_REPLY | HEADERS => {
                let name = if kind == SYN_REPLY {
                    "SYN_REPLY"
                } else {
                    "HEADERS"
                };
                need(name, &p, 4, false)?;
                let stream_id = p.get_u32() & 0x7FFF_FFFF;
                nonzero(name, stream_id)?;
                // Inflate even a block we then ignore: the zlib context spans the connection.
                let headers = self.inflate.decode(&p)?;
                if kind == SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            RST_STREAM => {
                need("RST_STREAM", &p, 8, true)?;
                let stream_id = p.get_u32() & 0x7FFF_FFFF;
                let status = p.get_u32();
                nonzero("RST_STREAM", stream_id)?;
                if status == 0 {
                    return Err(FrameError::Invalid("RST_STREAM", "status 0"));
                }
                Frame::RstStream { stream_id, status }
            }
            SETTINGS => {
                need("SETTINGS", &p, 4, false)?;
                let n = p.get_u32() as usize;
                if n.checked_mul(8) != Some(p.len()) {
                    return Err(FrameError::BadLength {
                        kind: "SETTINGS",
                        len: p.len() + 4,
                    });
                }
                Frame::Settings
            }
            PING => {
                need("PING", &p, 4, true)?;
                Frame::Ping { id: p.get_u32() }
            }
            GOAWAY => {
                need("GOAWAY", &p, 8, true)?;
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7FFF_FFFF,
                    status: p.get_u32(),
                }
            }
            WINDOW_UPDATE => {
                need("WINDOW_UPDATE", &p, 8, true)?;
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & 0x7FFF_FFFF,
                    delta: p.get_u32() & 0x7FFF_FFFF,
                }
            }
            // SPDY/3 section 2.2.1: unknown control frames are ignored.
            _ => return Ok(None),
        };
        Ok(Some(frame))
    }
}

fn nonzero(kind: &'static str, stream_id: u32) -> Result<(), FrameError> {
    if stream_id == 0 {
        Err(FrameError::ZeroStreamId(kind))
    } else {
        Ok(())
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.data_left.is_some() {
                return Ok(self.continue_data(src));
            }
            if src.len() < 8 {
                src.reserve(8);
                return Ok(None);
            }
            let first = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
            let flags = src[4];
            let len = u32::from_be_bytes([0, src[5], src[6], src[7]]) as usize;
            if first & 0x8000_0000 == 0 {
                let stream_id = first & 0x7FFF_FFFF;
                nonzero("DATA", stream_id)?;
                src.advance(8);
                self.data_left = Some((stream_id, len, flags & FLAG_FIN != 0));
                continue;
            }
            let version = ((first >> 16) & 0x7FFF) as u16;
            if version != VERSION {
                return Err(FrameError::UnsupportedVersion(version));
            }
            if len > MAX_CONTROL_PAYLOAD {
                return Err(FrameError::ControlTooLarge(len));
            }
            if src.len() < 8 + len {
                src.reserve(8 + len - src.len());
                return Ok(None);
            }
            src.advance(8);
            let payload = src.split_to(len).freeze();
            if let Some(frame) = self.control((first & 0xFFFF) as u16, flags, payload)? {
                return Ok(Some(frame));
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && self.data_left.is_none() => Ok(None),
            None => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside a frame",
            ))),
        }
    }
}

/// Writes frames; owns the connection's outbound zlib context, so frames must be encoded in
/// the order they are sent.
pub struct FrameEncoder {
    deflate: HeaderCompressor,
}

impl Default for FrameEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameEncoder {
    pub fn new() -> Self {
        Self {
            deflate: HeaderCompressor::new(),
        }
    }
}

fn control_header(dst: &mut BytesMut, kind: u16, flags: u8, len: usize) {
    dst.put_u32(0x8000_0000 | (u32::from(VERSION) << 16) | u32::from(kind));
    dst.put_u32((u32::from(flags) << 24) | (len as u32 & 0x00FF_FFFF));
}

impl Encoder<Frame> for FrameEncoder {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let block = self.deflate.encode(&headers)?;
                control_header(dst, SYN_STREAM, flags, 10 + block.len());
                dst.put_u32(stream_id & 0x7FFF_FFFF);
                dst.put_u32(associated_to & 0x7FFF_FFFF);
                dst.put_u8((priority & 0x7) << 5);
                dst.put_u8(0);
                dst.put_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.deflate.encode(&headers)?;
                control_header(dst, SYN_REPLY, flags, 4 + block.len());
                dst.put_u32(stream_id & 0x7FFF_FFFF);
                dst.put_slice(&block);
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.deflate.encode(&headers)?;
                control_header(dst, HEADERS, flags, 4 + block.len());
                dst.put_u32(stream_id & 0x7FFF_FFFF);
                dst.put_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control_header(dst, RST_STREAM, 0, 8);
                dst.put_u32(stream_id & 0x7FFF_FFFF);
                dst.put_u32(status);
            }
            Frame::Settings => {
                control_header(dst, SETTINGS, 0, 4);
                dst.put_u32(0);
            }
            Frame::Ping { id } => {
                control_header(dst, PING, 0, 4);
                dst.put_u32(id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control_header(dst, GOAWAY, 0, 8);
                dst.put_u32(last_good_stream_id & 0x7FFF_FFFF);
                dst.put_u32(status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control_header(dst, WINDOW_UPDATE, 0, 8);
                dst.put_u32(stream_id & 0x7FFF_FFFF);
                dst.put_u32(delta & 0x7FFF_FFFF);
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(FrameError::BadLength {
                        kind: "DATA",
                        len: data.len(),
                    });
                }
                dst.reserve(8 + data.len());
                dst.put_u32(stream_id & 0x7FFF_FFFF);
                dst.put_u32((u32::from(if fin { FLAG_FIN } else { 0 }) << 24) | data.len() as u32);
                dst.put_slice(&data);
            }
        }
        Ok(())
    }
}
