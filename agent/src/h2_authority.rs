//! gRPC's C core (grpcio for Python, hence py-spiffe; grpc-java likewise)
//! sends a Unix socket's path as the HTTP/2 `:authority` of every request on
//! it (`tmp%2Fagent%2Fspiffe.sock`), which is no RFC 3986 authority, and h2
//! (under tonic) resets such a request with PROTOCOL_ERROR before any
//! service sees it (hyperium/tonic#742, grpc/grpc-java#12664). The SPIFFE
//! socket must serve those clients unchanged, so the bytes a client sends
//! pass through this rewriter first: HTTP/2 frames go through as they are,
//! but each request's header block is decoded (HPACK, by `loona-hpack`,
//! mirroring the client's dynamic table) and encoded again with literals
//! only, its `:authority` replaced by `localhost` when it is not a valid
//! authority (what grpc-go and Kubernetes send on a Unix socket). Nothing
//! else in the request changes. Pure: bytes in, bytes out.

/// The HTTP/2 client connection preface.
const PREFACE_LEN: usize = 24;
/// The largest frame payload a client may send the agent (h2's default
/// SETTINGS_MAX_FRAME_SIZE, which tonic keeps).
pub const MAX_FRAME: usize = 16_384;
/// The largest header block (all its frames) the rewriter holds: what the
/// decoded list may be. An encoder never needs more (a field's prefixes fit
/// in the 32 bytes the list counts per field); a longer block can only be
/// table references, each more decoding work for nothing.
pub const MAX_HEADER_BLOCK: usize = MAX_HEADER_LIST;
/// The largest decoded header list a request may carry (RFC 9113 §6.5.2:
/// names, values and 32 bytes per field), as hyper's server advertises in
/// SETTINGS_MAX_HEADER_LIST_SIZE and the SPIFFE socket sets explicitly.
/// Bounding the *decoded* size matters: one HPACK byte can name a dynamic
/// table entry of 4 KiB, so a 64 KiB block could otherwise expand a
/// thousandfold.
pub const MAX_HEADER_LIST: usize = 16 * 1024;
/// Once a call of [`AuthorityFix::feed`] has written this much, it stops
/// and leaves the rest of its input for the next call: a few bytes can
/// still name a 4 KiB table entry, so output is bounded per call, not by
/// input. A call writes at most this plus one unit (a frame or a block).
pub const MAX_FEED_OUTPUT: usize = 64 * 1024;
/// The HPACK dynamic table size the server allows (h2's default
/// SETTINGS_HEADER_TABLE_SIZE, which tonic keeps).
const TABLE_SIZE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A header block whose CONTINUATION frames are still to come.
struct Pending {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

pub struct AuthorityFix {
    preface_seen: usize,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<Pending>,
}

impl Default for AuthorityFix {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self { preface_seen: 0, decoder, pending: None }
    }
}

impl AuthorityFix {
    /// Moves complete units of `input` (the preface, a frame, a whole header
    /// block) to `out`, rewritten, until `out` holds [`MAX_FEED_OUTPUT`];
    /// what is incomplete or was not reached stays in `input` (call again
    /// once `out` is handed on). An error ends the connection (h2 would
    /// refuse it too).
    pub fn feed(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        let mut at = 0;
        if self.preface_seen < PREFACE_LEN {
            let n = (PREFACE_LEN - self.preface_seen).min(input.len());
            out.extend_from_slice(&input[..n]);
            self.preface_seen += n;
            at = n;
        }
        while self.preface_seen == PREFACE_LEN && input.len() - at >= 9 && out.len() < MAX_FEED_OUTPUT {
            let h = &input[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if len > MAX_FRAME {
                return Err(format!("a frame of {len} bytes exceeds the {MAX_FRAME}-byte maximum"));
            }
            if input.len() - at < 9 + len {
                break;
            }
            let (kind, flags, stream) = (h[3], h[4], [h[5], h[6], h[7], h[8]]);
            let payload = &input[at + 9..at + 9 + len];
            match (kind, &mut self.pending) {
                (HEADERS, None) => {
                    let (priority, fragment) = headers_fragment(flags, payload)?;
                    let pending =
                        Pending { stream, end_stream: flags & END_STREAM != 0, priority, block: fragment.to_vec() };
                    if flags & END_HEADERS != 0 {
                        self.emit(pending, out)?;
                    } else {
                        self.pending = Some(pending);
                    }
                }
                (CONTINUATION, Some(p)) if p.stream == stream => {
                    if p.block.len() + payload.len() > MAX_HEADER_BLOCK {
                        return Err(format!("a header block exceeds {MAX_HEADER_BLOCK} bytes"));
                    }
                    p.block.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        let p = self.pending.take().ok_or("no header block")?;
                        self.emit(p, out)?;
                    }
                }
                (_, Some(_)) => return Err("a frame interrupted a header block (RFC 9113 §6.10)".into()),
                (_, None) => out.extend_from_slice(&input[at..at + 9 + len]),
            }
            at += 9 + len;
        }
        input.drain(..at);
        Ok(())
    }

    /// Decodes a whole header block and writes it again as HEADERS (and
    /// CONTINUATION) frames of literals.
    fn emit(&mut self, p: Pending, out: &mut Vec<u8>) -> Result<(), String> {
        let mut block = Vec::with_capacity(p.block.len().min(MAX_HEADER_LIST) + 16);
        let mut listed = 0usize;
        self.decoder
            .decode_with_cb(&p.block, |name, value| {
                // Past the bound nothing more is copied; the block is refused below.
                listed = listed.saturating_add(name.len() + value.len() + 32);
                if listed > MAX_HEADER_LIST {
                    return;
                }
                let value: &[u8] =
                    if &*name == b":authority" && !valid_authority(&value) { b"localhost" } else { &value };
                block.push(0x10); // literal, never indexed, new name
                string(&name, &mut block);
                string(value, &mut block);
            })
            .map_err(|e| format!("the header block does not decode (HPACK): {e:?}"))?;
        if listed > MAX_HEADER_LIST {
            return Err(format!("a header list of {listed} bytes exceeds the {MAX_HEADER_LIST}-byte maximum"));
        }
        let mut first = true;
        let mut rest = &block[..];
        loop {
            let room = if first && p.priority.is_some() { MAX_FRAME - 5 } else { MAX_FRAME };
            let (chunk, after) = rest.split_at(rest.len().min(room));
            let mut flags = if after.is_empty() { END_HEADERS } else { 0 };
            let kind = if first { HEADERS } else { CONTINUATION };
            if first && p.end_stream {
                flags |= END_STREAM;
            }
            let priority = if first { p.priority } else { None };
            if priority.is_some() {
                flags |= PRIORITY;
            }
            let len = chunk.len() + priority.map_or(0, |_| 5);
            let len = u32::try_from(len).map_err(|_| "frame too large")?.to_be_bytes();
            out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            out.extend_from_slice(&p.stream);
            out.extend_from_slice(priority.as_ref().map_or(&[][..], |b| &b[..]));
            out.extend_from_slice(chunk);
            if after.is_empty() {
                return Ok(());
            }
            rest = after;
            first = false;
        }
    }
}

/// The header block fragment of a HEADERS payload, and its priority fields.
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), String> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, after) = body.split_first().ok_or("a padded HEADERS frame has no pad length")?;
        pad = usize::from(n);
        body = after;
    }
    let priority = if flags & PRIORITY != 0 {
        let (p, after) = body.split_at_checked(5).ok_or("a HEADERS frame is too short for its priority")?;
        body = after;
        Some([p[0], p[1], p[2], p[3], p[4]])
    } else {
        None
    };
    let end = body.len().checked_sub(pad).ok_or("a HEADERS frame's padding exceeds its payload")?;
    Ok((priority, &body[..end]))
}

fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// An HPACK string literal without Huffman coding (RFC 7541 §5.2).
fn string(bytes: &[u8], out: &mut Vec<u8>) {
    integer(bytes.len(), 7, 0, out);
    out.extend_from_slice(bytes);
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `n` is 1 to 8.
// Every cast is of a value already below 256.
#[allow(clippy::cast_possible_truncation)]
fn integer(mut value: usize, n: u32, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn headers_of(out: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut d = loona_hpack::Decoder::new();
        let mut at = PREFACE_LEN;
        let mut block = Vec::new();
        while at < out.len() {
            let len = usize::from(out[at]) << 16 | usize::from(out[at + 1]) << 8 | usize::from(out[at + 2]);
            if matches!(out[at + 3], HEADERS | CONTINUATION) {
                let skip = if out[at + 4] & PRIORITY != 0 { 5 } else { 0 };
                block.extend_from_slice(&out[at + 9 + skip..at + 9 + len]);
            }
            at += 9 + len;
        }
        d.decode(&block).unwrap().into_iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
    }

    /// What grpcio sends on a Unix socket (encoded with indexing and
    /// Huffman, as its encoder does) comes out with a valid authority and
    /// every other header unchanged, however the bytes arrive.
    #[test]
    fn a_socket_path_authority_becomes_localhost_and_nothing_else_changes() {
        let mut enc = loona_hpack::Encoder::new();
        let request: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"tmp%2Fagent%2Fspiffe.sock"),
            (b"workload.spiffe.io", b"true"),
            (b"te", b"trailers"),
        ];
        let block = enc.encode(request.iter().copied());
        let second = enc.encode(request.iter().copied()); // now from the dynamic table
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let (a, b) = block.split_at(block.len() / 2);
        wire.extend(frame(HEADERS, PRIORITY, 1, &[[0, 0, 0, 0, 16].as_slice(), a].concat()));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        wire.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 3, &[&[2][..], &second, &[0, 0]].concat()));
        for step in [1, 7, 9, 64, wire.len()] {
            let mut fix = AuthorityFix::default();
            let (mut input, mut out) = (Vec::new(), Vec::new());
            for chunk in wire.chunks(step) {
                input.extend_from_slice(chunk);
                fix.feed(&mut input, &mut out).unwrap();
            }
            assert!(input.is_empty(), "step {step}: {} bytes left", input.len());
            let headers = headers_of(&out);
            let mut want: Vec<(Vec<u8>, Vec<u8>)> = request.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            want[3].1 = b"localhost".to_vec();
            assert_eq!(headers, [want.clone(), want].concat(), "step {step}");
            assert_eq!(&out[..PREFACE_LEN], &wire[..PREFACE_LEN]);
        }
    }

    #[test]
    fn a_valid_authority_and_other_frames_pass_unchanged() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":authority"[..], &b"localhost:80"[..]), (b":path", b"/x")]);
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x6, 0, 0, &[0; 8])); // PING
        wire.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (mut input, mut out) = (wire.clone(), Vec::new());
        AuthorityFix::default().feed(&mut input, &mut out).unwrap();
        assert_eq!(&out[..PREFACE_LEN + 17], &wire[..PREFACE_LEN + 17], "the PING is untouched");
        assert_eq!(headers_of(&out)[0].1, b"localhost:80");
    }

    #[test]
    fn malformed_input_is_refused_without_panicking() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let cases = [
            frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
            frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]),
            frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]),
            [frame(HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, b"x")].concat(),
            [frame(HEADERS, 0, 1, &[0x82]), frame(CONTINUATION, END_HEADERS, 3, &[0x84])].concat(),
            vec![0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1],
        ];
        for case in cases {
            let (mut input, mut out) = ([preface.clone(), case.clone()].concat(), Vec::new());
            assert!(AuthorityFix::default().feed(&mut input, &mut out).is_err(), "{case:?}");
        }
    }

    /// Review finding: one indexed byte names a 4 KiB dynamic table entry,
    /// so a 16 KiB block of such bytes decoded to 64 MiB of literals, all
    /// copied inside one read. The decoded list is now bounded.
    #[test]
    fn indexed_references_cannot_amplify() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'v'; 4000];
        let first = enc.encode([(&b"a"[..], &big[..])]);
        // 0xbe: the first dynamic table entry (index 62), again and again.
        let flood = vec![0xbe; 16_000];
        let mut input =
            [preface, frame(HEADERS, END_HEADERS, 1, &first), frame(HEADERS, END_HEADERS, 3, &flood)].concat();
        let mut out = Vec::new();
        let err = AuthorityFix::default().feed(&mut input, &mut out).unwrap_err();
        assert!(err.contains("header list"), "{err}");
        assert!(out.len() < 2 * MAX_HEADER_LIST, "{} bytes written", out.len());
        // Many one-byte blocks, each naming the 4 KiB entry: one call writes
        // a bounded amount and leaves the rest for the next.
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let tiny: Vec<u8> = (0..200u32).flat_map(|i| frame(HEADERS, END_HEADERS, 3 + 2 * i, &[0xbe])).collect();
        let mut input = [preface, frame(HEADERS, END_HEADERS, 1, &first), tiny].concat();
        let mut fix = AuthorityFix::default();
        let mut calls = 0;
        while !input.is_empty() {
            let mut out = Vec::new();
            fix.feed(&mut input, &mut out).unwrap();
            assert!(out.len() <= MAX_FEED_OUTPUT + MAX_HEADER_LIST + MAX_FRAME + 64, "{} bytes in one call", out.len());
            calls += 1;
        }
        assert!(calls > 10, "800 KB of literals came out over {calls} calls");
        // A list just under the bound still passes.
        let mut enc = loona_hpack::Encoder::new();
        let value = vec![b'v'; MAX_HEADER_LIST - 64];
        let block = enc.encode([(&b"a"[..], &value[..])]);
        let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for (i, c) in chunks.iter().enumerate() {
            let end = if i + 1 == chunks.len() { END_HEADERS } else { 0 };
            wire.extend(frame(if i == 0 { HEADERS } else { CONTINUATION }, end, 1, c));
        }
        let (mut input, mut out) = (wire, Vec::new());
        AuthorityFix::default().feed(&mut input, &mut out).unwrap();
        assert_eq!(headers_of(&out)[0].1.len(), value.len());
    }
}
