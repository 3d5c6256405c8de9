//! The local socket API: workloads on the node ask the agent for credentials.
//! One request per connection: a length-delimited `LocalRequest`, answered by
//! a `LocalResponse`. The kernel tells us who is calling (SO_PEERCRED).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::{frame, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Reads one frame to EOF, bounded.
pub async fn read_frame(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let limit = (frame::MAX_FRAME_LEN + 16) as u64;
    (&mut *stream).take(limit + 1).read_to_end(&mut buf).await?;
    Ok(buf)
}

/// Sends `req` to the agent at `socket` and returns its answer.
pub async fn request(socket: &Path, req: &wire::LocalRequest) -> Result<wire::LocalResponse> {
    let mut s = UnixStream::connect(socket).await.with_context(|| {
        format!("cannot reach the agent at {}; is 'grantline-agent run' running (see --socket)?", socket.display())
    })?;
    s.write_all(&frame::encode(req)).await?;
    s.shutdown().await?;
    let buf = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut s))
        .await
        .context("the agent did not answer within 60 s")??;
    frame::decode(&buf).context("the agent's answer is malformed")
}

/// The calling process, from SO_PEERCRED and /proc.
pub fn caller_of(stream: &UnixStream) -> Option<wire::Caller> {
    let cred = stream.peer_cred().ok()?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default();
    Some(wire::Caller { uid: cred.uid(), gid: cred.gid(), pid, exe })
}
