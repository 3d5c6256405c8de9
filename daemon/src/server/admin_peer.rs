//! Who is at the other end of an admin connection, fixed when it connected.
//!
//! The kernel records a Unix socket client's credentials at `connect()`:
//! SO_PEERCRED gives its uid, gid and pid, SO_PEERGROUPS its supplementary
//! groups. Reading the groups from `/proc/<pid>/status` at call time instead
//! would judge whatever process holds that pid by then: the client may have
//! passed its socket on and exited, and its pid been reused by a process in
//! the admin group.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// Linux's NGROUPS_MAX: no process has more supplementary groups.
const MAX_GROUPS: usize = 65_536;

/// An accepted admin connection, with its client's groups read at accept.
pub(crate) struct AdminStream {
    inner: UnixStream,
    groups: Arc<[u32]>,
}

/// What a request on an [`AdminStream`] knows of its caller.
#[derive(Clone, Debug)]
pub(crate) struct AdminPeer {
    pub uds: UdsConnectInfo,
    /// Supplementary groups at `connect()`; empty if the kernel would not
    /// say (then only the uid and primary gid can admit the caller).
    pub groups: Arc<[u32]>,
}

impl AdminStream {
    pub(crate) fn new(inner: UnixStream) -> Self {
        let groups = peer_groups(inner.as_fd()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read an admin caller's groups (SO_PEERGROUPS); judging it by uid and gid");
            Vec::new()
        });
        Self { inner, groups: groups.into() }
    }
}

impl Connected for AdminStream {
    type ConnectInfo = AdminPeer;

    fn connect_info(&self) -> AdminPeer {
        AdminPeer { uds: self.inner.connect_info(), groups: self.groups.clone() }
    }
}

/// `getsockopt(SO_PEERGROUPS)`: the groups the peer held at `connect()`.
/// Neither nix nor rustix offers this option, so it is called here, once.
#[allow(unsafe_code)]
fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * GID).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` owns `len` writable bytes, properly aligned for
        // gid_t; the kernel writes at most `len` bytes and sets `len` to the
        // size it wrote (or, with ERANGE, to the size it needs).
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = usize::try_from(len).unwrap_or(usize::MAX) / GID;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() || needed > MAX_GROUPS {
            return Err(e);
        }
        groups.resize(needed, 0);
    }
}

impl AsyncRead for AdminStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_groups_are_the_connecting_process_s() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups().unwrap().into_iter().map(|g| g.as_raw()).collect();
        let mut seen = peer_groups(a.as_fd()).unwrap();
        ours.sort_unstable();
        seen.sort_unstable();
        assert_eq!(seen, ours);
    }
}
