//! Closing a connection with a reason the agent reads.

use grantline_proto::wire;

/// Closes a connection telling the agent why, as an encoded `wire::Error` in
/// the QUIC application close reason.
pub(crate) fn close_with(conn: &quinn::Connection, error: &wire::Error) {
    let reason = prost::Message::encode_to_vec(error);
    let code = u32::try_from(error.code).unwrap_or(0);
    conn.close(code.into(), &reason);
}
