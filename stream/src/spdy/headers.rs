//! SPDY/3 name/value header blocks and their zlib contexts.
//!
//! A block is `count(32) { name_len(32) name value_len(32) value }*`, names lower case,
//! several values of one name joined by NUL. Each direction of a connection compresses all of
//! its blocks with ONE zlib stream primed with the SPDY/3 dictionary and sync-flushed after
//! every block, so a block can only be inflated after every earlier block of that direction.

use bytes::{Buf, BufMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::dictionary;
use super::frame::FrameError;

/// An inflated block larger than this is refused (a few headers are all a peer needs).
const MAX_INFLATED: usize = 256 * 1024;

/// Header pairs in wire order; names are lower case, a name may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds a value; the name is lower-cased as SPDY requires.
    pub fn add(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.0.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.add(name, value);
        self
    }

    /// The first value of `name` (case-insensitive, like Go's `http.Header.Get`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The uncompressed block: one entry per distinct name, values joined by NUL.
    pub fn to_block(&self) -> Vec<u8> {
        let mut names: Vec<&str> = Vec::new();
        for (n, _) in &self.0 {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        let mut out = Vec::with_capacity(64);
        out.put_u32(names.len() as u32);
        for name in names {
            let values: Vec<&str> = self
                .0
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            let value = values.join("\0");
            out.put_u32(name.len() as u32);
            out.put_slice(name.as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out
    }

    /// Parses an uncompressed block, refusing anything a length field runs past.
    pub fn from_block(mut b: &[u8]) -> Result<Self, FrameError> {
        let bad = |m: &str| FrameError::HeaderBlock(m.to_string());
        if b.len() < 4 {
            return Err(bad("truncated pair count"));
        }
        let count = b.get_u32() as usize;
        // Each pair needs at least 8 bytes of lengths: a count beyond that is a lie.
        if count > b.len() / 8 {
            return Err(bad("pair count exceeds the block"));
        }
        let mut headers = Headers::new();
        for _ in 0..count {
            let name = take_string(&mut b).ok_or_else(|| bad("truncated header name"))?;
            if name.is_empty() {
                return Err(bad("empty header name"));
            }
            let value = take_string(&mut b).ok_or_else(|| bad("truncated header value"))?;
            if headers.0.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                return Err(FrameError::HeaderBlock(format!(
                    "duplicate header {name:?}"
                )));
            }
            for v in value.split('\0') {
                headers.add(&name, v);
            }
        }
        if !b.is_empty() {
            return Err(bad("trailing bytes after the last pair"));
        }
        Ok(headers)
    }
}

fn take_string(b: &mut &[u8]) -> Option<String> {
    if b.len() < 4 {
        return None;
    }
    let len = b.get_u32() as usize;
    if len > b.len() {
        return None;
    }
    let s = String::from_utf8_lossy(&b[..len]).into_owned();
    b.advance(len);
    Some(s)
}

/// The outbound zlib context of a connection.
pub struct HeaderCompressor {
    z: Compress,
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCompressor {
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        // Priming a fresh zlib-rs stream cannot fail; if it ever did, every block would be
        // unreadable to the peer, so the error surfaces on the first encode instead.
        let _ = z.set_dictionary(dictionary());
        Self { z }
    }

    pub fn encode(&mut self, headers: &Headers) -> Result<Vec<u8>, FrameError> {
        let input = headers.to_block();
        let start = self.z.total_in();
        let mut out = Vec::with_capacity(input.len() + 64);
        loop {
            let consumed = (self.z.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            self.z
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| FrameError::HeaderBlock(format!("deflate: {e}")))?;
            let done = (self.z.total_in() - start) as usize == input.len();
            // A sync flush is complete once all input is in and zlib left output room unused.
            if done && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// The inbound zlib context of a connection.
pub struct HeaderDecompressor {
    z: Decompress,
    /// Whether the stream's zlib header asked for the SPDY/3 dictionary. SPDY/3 requires it;
    /// a stream without it would inflate, but it is not a SPDY peer and is refused.
    primed: bool,
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
            primed: false,
        }
    }

    /// Inflates one block (all of `input` must be consumed) and parses it.
    pub fn decode(&mut self, input: &[u8]) -> Result<Headers, FrameError> {
        let start = self.z.total_in();
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            let consumed = (self.z.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity());
            }
            let before = out.len();
            match self
                .z
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => {
                    return Err(FrameError::HeaderBlock("zlib stream ended".into()));
                }
                Ok(_) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(adler) if adler == spdy_dictionary_adler() => {
                        self.z.set_dictionary(dictionary()).map_err(|e| {
                            FrameError::HeaderBlock(format!("zlib dictionary: {e}"))
                        })?;
                        self.primed = true;
                        continue;
                    }
                    Some(adler) => {
                        return Err(FrameError::HeaderBlock(format!(
                            "block compressed with an unknown dictionary (adler32 {adler:#010x})"
                        )));
                    }
                    None => return Err(FrameError::HeaderBlock(format!("inflate: {e}"))),
                },
            }
            if out.len() > MAX_INFLATED {
                return Err(FrameError::HeaderBlock(format!(
                    "inflates to more than {MAX_INFLATED} bytes"
                )));
            }
            let all_in = (self.z.total_in() - start) as usize == input.len();
            let room_left = out.len() < out.capacity();
            if all_in && room_left {
                break;
            }
            if !all_in && out.len() == before && room_left {
                return Err(FrameError::HeaderBlock("inflate made no progress".into()));
            }
        }
        if !self.primed {
            return Err(FrameError::HeaderBlock(
                "block not compressed with the SPDY/3 dictionary".into(),
            ));
        }
        if out.is_empty() {
            return Err(FrameError::HeaderBlock("truncated block".into()));
        }
        Headers::from_block(&out)
    }
}

/// The Adler-32 of the SPDY/3 dictionary, which a block's zlib header names.
pub const fn spdy_dictionary_adler() -> u32 {
    0xe3c6_a7c2
}
