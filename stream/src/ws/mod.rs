//! Kubernetes' WebSocket channel protocols (`wsstream`): every message is one channel's data,
//! prefixed by the channel number as a byte (binary protocols) or as an ASCII digit followed
//! by base64 (the `base64.` protocols).

pub mod mux;
pub mod tunnel;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use tokio_tungstenite::tungstenite::Message;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: `[255, channel]` half-closes the client's side of a channel.
pub const STREAM_CLOSE: u8 = 255;

pub const V1_BINARY: &str = "channel.k8s.io";
pub const V1_BASE64: &str = "base64.channel.k8s.io";
pub const V4_BINARY: &str = "v4.channel.k8s.io";
pub const V4_BASE64: &str = "v4.base64.channel.k8s.io";
pub const V5_BINARY: &str = "v5.channel.k8s.io";
/// A SPDY/3.1 connection carried in binary messages (port-forward, kubectl and crictl ≥1.31).
pub const SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Binary,
    Base64,
}

/// One channel message as it goes on the wire.
pub fn encode(codec: Codec, channel: u8, data: &[u8]) -> Message {
    match codec {
        Codec::Binary => {
            let mut b = Vec::with_capacity(data.len() + 1);
            b.push(channel);
            b.extend_from_slice(data);
            Message::binary(b)
        }
        Codec::Base64 => {
            let mut s = String::with_capacity(data.len() * 4 / 3 + 5);
            s.push(char::from(b'0' + channel));
            STANDARD.encode_string(data, &mut s);
            Message::text(s)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(u8, Bytes),
    /// v5's CLOSE signal for a channel (binary codec only).
    Close(u8),
    /// Ping, pong or an empty message: nothing for a channel.
    Nothing,
    /// The peer closed the WebSocket.
    End,
}

/// Decodes one message; `v5` enables the CLOSE signal. Errors name what is wrong.
pub fn decode(codec: Codec, v5: bool, msg: Message) -> Result<Decoded, String> {
    let raw: Bytes = match (codec, msg) {
        (_, Message::Close(_)) => return Ok(Decoded::End),
        (_, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
            return Ok(Decoded::Nothing);
        }
        (Codec::Binary, Message::Binary(b)) => b,
        (Codec::Base64, Message::Text(t)) => Bytes::copy_from_slice(t.as_bytes()),
        (Codec::Binary, Message::Text(_)) => return Err("text message on a binary protocol".into()),
        (Codec::Base64, Message::Binary(_)) => {
            return Err("binary message on a base64 protocol".into());
        }
    };
    if raw.is_empty() {
        return Ok(Decoded::Nothing);
    }
    if v5 && codec == Codec::Binary && raw[0] == STREAM_CLOSE {
        if raw.len() != 2 {
            return Err(format!(
                "CLOSE signal with {} bytes after it, want 1",
                raw.len() - 1
            ));
        }
        return Ok(Decoded::Close(raw[1]));
    }
    match codec {
        Codec::Binary => Ok(Decoded::Data(raw[0], raw.slice(1..))),
        Codec::Base64 => {
            let ch = raw[0].wrapping_sub(b'0');
            let data = STANDARD
                .decode(&raw[1..])
                .map_err(|e| format!("bad base64 on channel {ch}: {e}"))?;
            Ok(Decoded::Data(ch, Bytes::from(data)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_messages_round_trip_in_both_codecs() {
        for codec in [Codec::Binary, Codec::Base64] {
            let m = encode(codec, STDERR, b"hello\x00\xff");
            assert_eq!(
                decode(codec, false, m),
                Ok(Decoded::Data(STDERR, Bytes::from_static(b"hello\x00\xff")))
            );
        }
        assert_eq!(encode(Codec::Base64, 1, b"hi"), Message::text("1aGk="));
    }

    #[test]
    fn close_signal_is_v5_binary_only() {
        let m = Message::binary(vec![255, 0]);
        assert_eq!(
            decode(Codec::Binary, true, m.clone()),
            Ok(Decoded::Close(0))
        );
        assert_eq!(
            decode(Codec::Binary, false, m),
            Ok(Decoded::Data(255, Bytes::from_static(&[0])))
        );
        assert!(decode(Codec::Binary, true, Message::binary(vec![255, 0, 1])).is_err());
        assert!(decode(Codec::Binary, false, Message::text("0aGk=")).is_err());
        assert!(decode(Codec::Base64, false, Message::text("0!!")).is_err());
    }
}
