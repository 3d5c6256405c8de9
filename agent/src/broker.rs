//! One request to the broker: a bidirectional stream carrying one frame each way.

use std::time::Duration;

use grantline_proto::{frame, wire};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("not connected to the broker")]
    NotConnected,
    #[error("connection to the broker failed: {0}")]
    Connection(String),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the broker's reply is malformed: {0}")]
    Malformed(String),
}

impl CallError {
    pub fn to_wire(&self) -> wire::Error {
        wire::Error::new(wire::ErrorCode::Unavailable, self.to_string())
    }
}

pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn call(conn: &quinn::Connection, req: &wire::Request) -> Result<wire::Response, CallError> {
    let io = |e: &dyn std::fmt::Display| CallError::Connection(e.to_string());
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io(&e))?;
        // The broker may answer (an error) and stop our stream before all of
        // a request is sent: its reply is read either way.
        let wrote = send.write_all(&frame::encode(req)).await;
        if wrote.is_ok() {
            send.finish().map_err(|e| io(&e))?;
        }
        let buf = match (recv.read_to_end(frame::MAX_FRAME_LEN + 16).await, wrote) {
            (Ok(buf), _) if !buf.is_empty() => buf,
            (_, Err(e)) => return Err(io(&e)),
            (Ok(buf), Ok(())) => buf,
            (Err(e), Ok(())) => return Err(io(&e)),
        };
        frame::decode::<wire::Response>(&buf).map_err(|e| CallError::Malformed(e.to_string()))
    };
    tokio::time::timeout(CALL_TIMEOUT, work).await.map_err(|_| CallError::Timeout(CALL_TIMEOUT))?
}
