//! Framing of messages on a QUIC stream: one protobuf message per direction,
//! prefixed by its length as a protobuf varint (prost's "length-delimited").

use prost::Message;

/// The largest frame either side accepts. Requests carry a CSR or an SSH public
/// key; replies a certificate chain. 64 KiB is ample and bounds what a
/// misbehaving peer can make us buffer.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("empty frame: the stream ended before any message was sent")]
    Empty,
    #[error("frame too large: {len} bytes, the limit is {MAX_FRAME_LEN}")]
    TooLarge { len: usize },
    #[error("bad length prefix: {0}")]
    BadLength(String),
    #[error("frame declares {declared} bytes but {actual} follow the length prefix")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("frame is not a valid {what} message: {reason}")]
    Decode { what: &'static str, reason: String },
}

/// Encodes `msg` as one length-delimited frame.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    msg.encode_length_delimited_to_vec()
}

/// Decodes exactly one length-delimited message that fills `buf` completely.
pub fn decode<M: Message + Default>(buf: &[u8]) -> Result<M, FrameError> {
    if buf.is_empty() {
        return Err(FrameError::Empty);
    }
    if buf.len() > MAX_FRAME_LEN + 10 {
        return Err(FrameError::TooLarge { len: buf.len() });
    }
    let mut rest = buf;
    let declared = prost::encoding::decode_varint(&mut rest).map_err(|e| FrameError::BadLength(e.to_string()))?;
    let declared = usize::try_from(declared).map_err(|_| FrameError::TooLarge { len: usize::MAX })?;
    if declared > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: declared });
    }
    if declared != rest.len() {
        return Err(FrameError::LengthMismatch { declared, actual: rest.len() });
    }
    M::decode(rest).map_err(|e| FrameError::Decode {
        what: std::any::type_name::<M>().rsplit("::").next().unwrap_or("protobuf"),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    fn sample() -> wire::Request {
        wire::Request {
            body: Some(wire::request::Body::Grant(wire::GrantRequest {
                kind: wire::CredentialKind::X509 as i32,
                role: "dev".into(),
                ttl_seconds: 600,
                sans: vec!["a.example".into()],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample());
        assert_eq!(decode::<wire::Request>(&bytes).unwrap(), sample());
    }

    #[test]
    fn rejects_truncated_trailing_and_garbage() {
        let bytes = encode(&sample());
        assert!(matches!(decode::<wire::Request>(&bytes[..bytes.len() - 1]), Err(FrameError::LengthMismatch { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode::<wire::Request>(&longer), Err(FrameError::LengthMismatch { .. })));
        assert_eq!(decode::<wire::Request>(&[]), Err(FrameError::Empty));
        assert!(matches!(decode::<wire::Request>(&[0xff; 11]), Err(FrameError::BadLength(_))));
        // A well-framed body that is not a protobuf message.
        let junk = [4u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode::<wire::Request>(&junk), Err(FrameError::Decode { .. })));
    }

    #[test]
    fn rejects_oversized_declared_length() {
        let mut buf = Vec::new();
        prost::encoding::encode_varint((MAX_FRAME_LEN + 1) as u64, &mut buf);
        buf.extend_from_slice(&[0; 16]);
        assert!(matches!(decode::<wire::Request>(&buf), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = decode::<wire::Request>(&buf);
            let _ = decode::<wire::Response>(&buf);
        }
    }
}
