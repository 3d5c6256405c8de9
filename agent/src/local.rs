//! The local socket API: workloads on the node ask the agent for credentials.
//! One request per connection: a length-delimited `LocalRequest`, answered by
//! a `LocalResponse`. The kernel tells us who is calling (SO_PEERCRED).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::slots::Slots;
use grantline_proto::{frame, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::principals::Principal;

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
    // An agent that refuses the connection (too many open) answers and
    // closes before reading: its answer is still there to read.
    let sent = async {
        s.write_all(&frame::encode(req)).await?;
        s.shutdown().await
    }
    .await;
    if let Err(e) = sent {
        if !matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) {
            return Err(e.into());
        }
    }
    let buf = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut s))
        .await
        .context("the agent did not answer within 60 s")??;
    frame::decode(&buf).context("the agent's answer is malformed")
}

/// The calling process: uid, gid and pid from SO_PEERCRED, then its
/// executable and systemd unit from /proc, read while a pidfd pins the
/// process, and the mark that tells it from whatever later holds its pid or
/// its socket. If the process exited meanwhile, or its pid now belongs to a
/// process of another user, the caller is refused (None): what /proc said
/// might describe another process.
///
/// Only /proc is read on the calling task. Checking the executable's path
/// ([`verified_exe`]) stats files the caller may control (a FUSE mount that
/// never answers), so it runs on a blocking thread, at most
/// [`VERIFYING_PER_UID`] per uid and [`MAX_VERIFYING`] in all, waited for at
/// most [`VERIFY_DEADLINE`]; past that the executable is unknown, which no
/// `exe` rule matches.
pub async fn attest(stream: &UnixStream) -> Option<(wire::Caller, ProcessMark)> {
    let cred = stream.peer_cred().ok()?;
    let pid = cred.pid().filter(|p| *p > 0)?;
    // Without pidfd_open (kernels before 5.3, some seccomp profiles) the
    // caller is read unpinned (`pidfd: false`): the local socket still
    // serves it as RFD 0006 says; the SPIFFE socket does not.
    let pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let unit = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|c| unit_of_cgroup(&c)).unwrap_or_default();
    let real_uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok()));
    if real_uid.is_some_and(|u| u != cred.uid()) {
        return None;
    }
    // Checks are shared out by uid, and by user namespace when the caller's
    // is not the agent's (a container's uids are one share).
    let share = match crate::principals::user_namespace(pid) {
        Some(ns) if crate::principals::own_user_namespace() != Some(ns) => Principal::Namespace(ns),
        _ => Principal::Uid(cred.uid()),
    };
    let check = async move {
        // A slot is normally free at once; callers of one share connecting
        // together wait their turn, within the deadline.
        let slot = loop {
            match VERIFYING.take(share, VERIFYING_PER_UID) {
                Some(slot) => break slot,
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let verified = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            verified_exe(pid)
        });
        verified.await.unwrap_or_default()
    };
    let exe = tokio::time::timeout(VERIFY_DEADLINE, check).await.unwrap_or_default();
    let mark = process_mark(u32::try_from(pid).ok()?)?;
    // Still running (a readable pidfd means it exited), and still the
    // program that was verified: no exec between the two reads.
    if let Some(pidfd) = &pidfd {
        let mut fds = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
        if !matches!(rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(0)) {
            return None;
        }
    }
    if !exe.is_empty() && mark.exe != exe {
        return None;
    }
    let pinned = pidfd.is_some();
    let caller =
        wire::Caller { uid: cred.uid(), gid: cred.gid(), pid: u32::try_from(pid).ok()?, exe, unit, pidfd: pinned };
    Some((caller, mark))
}

/// Executable checks in progress at once, in all and for one uid or foreign
/// user namespace (each may be stuck on a file system that does not
/// answer), and how long one is waited for, its turn included.
pub const MAX_VERIFYING: usize = 32;
pub const VERIFYING_PER_UID: usize = 4;
pub const VERIFY_DEADLINE: Duration = Duration::from_secs(1);
static VERIFYING: std::sync::LazyLock<std::sync::Arc<Slots<Principal>>> =
    std::sync::LazyLock::new(|| Slots::new(MAX_VERIFYING));

/// The path of process `pid`'s executable, if that path names, here, the
/// very file the process runs; otherwise empty (unknown). The kernel gives
/// the path as the process sees it: in a mount namespace of its own a user
/// can mount any program over `/usr/sbin/nginx`, and a deleted or replaced
/// file keeps its old name. Comparing the file behind `/proc/PID/exe` with
/// the file at that path in the agent's view catches both.
pub fn verified_exe(pid: i32) -> String {
    use std::os::unix::fs::MetadataExt;
    let link = format!("/proc/{pid}/exe");
    let Ok(path) = std::fs::read_link(&link) else { return String::new() };
    let (Ok(running), Ok(named)) = (std::fs::metadata(&link), std::fs::metadata(&path)) else {
        return String::new();
    };
    if (running.dev(), running.ino()) != (named.dev(), named.ino()) {
        return String::new();
    }
    path.display().to_string()
}

/// The agent itself as a caller (for its sinks).
pub fn own_caller() -> wire::Caller {
    let pid = std::process::id();
    wire::Caller {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        pid,
        exe: std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
        unit: std::fs::read_to_string("/proc/self/cgroup").map(|c| unit_of_cgroup(&c)).unwrap_or_default(),
        pidfd: false,
    }
}

/// The systemd unit (service or scope) in a /proc/PID/cgroup listing: the
/// outermost path component that names one. Only the system manager (and
/// logind, for sessions) names those; below a unit, a delegated subtree
/// (a user's own manager under `user@UID.service`, a container runtime's
/// scope) is named by whoever it was delegated to, so an inner name proves
/// nothing. A user's own units therefore all read as `user@UID.service`.
pub fn unit_of_cgroup(cgroup: &str) -> String {
    cgroup
        .lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .flat_map(|path| path.split('/'))
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .unwrap_or_default()
        .to_owned()
}

/// What SVIDs are keyed by: the caller's attested attributes, not its pid.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallerKey {
    pub uid: u32,
    pub gid: u32,
    pub exe: String,
    pub unit: String,
}

impl CallerKey {
    pub fn of(c: &wire::Caller) -> Self {
        Self { uid: c.uid, gid: c.gid, exe: c.exe.clone(), unit: c.unit.clone() }
    }
}

/// What tells one process from another over time: its start time (clock
/// ticks since boot, kept across exec, new for a reused pid) and its
/// executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessMark {
    start: u64,
    exe: String,
}

/// The mark of process `pid`, or None if it is gone. Only /proc is read. A
/// program replaced on disk while it runs (a package upgrade) reads as
/// `PATH (deleted)`; it is still the same process running the same program,
/// so the suffix is not part of the mark.
pub fn process_mark(pid: u32) -> Option<ProcessMark> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    let start = after.split_whitespace().nth(19)?.parse().ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default();
    let exe = exe.strip_suffix(" (deleted)").map(str::to_owned).unwrap_or(exe);
    Some(ProcessMark { start, exe })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review defect 6 (units): a user with a delegated cgroup named one
    /// `nginx.service` under their own manager and passed a `units` rule.
    #[test]
    fn units_come_from_the_outermost_cgroup_component() {
        assert_eq!(unit_of_cgroup("0::/system.slice/nginx.service\n"), "nginx.service");
        assert_eq!(unit_of_cgroup("0::/user.slice/user-1000.slice/session-4.scope\n"), "session-4.scope");
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service\n"),
            "user@1000.service",
            "a user's own manager names what is below it"
        );
        assert_eq!(
            unit_of_cgroup("0::/system.slice/docker-1.scope/app.service/init\n"),
            "docker-1.scope",
            "a container names what is below its scope"
        );
        assert_eq!(unit_of_cgroup("1:name=systemd:/system.slice/evil.service\n0::/\n"), "", "cgroup v2 only");
        assert_eq!(unit_of_cgroup("0::/\n"), "");
        assert_eq!(unit_of_cgroup(""), "");
    }

    #[test]
    fn a_process_mark_is_stable_for_a_process_and_absent_when_it_is_gone() {
        let me = process_mark(std::process::id()).unwrap();
        assert_eq!(process_mark(std::process::id()), Some(me.clone()));
        assert_eq!(me.exe, std::env::current_exe().unwrap().display().to_string());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(process_mark(pid), None, "a reaped process has no mark");
    }

    #[tokio::test]
    async fn a_caller_is_identified_by_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (c, mark) = attest(&server).await.unwrap();
        assert_eq!(Some(mark), process_mark(std::process::id()));
        assert_eq!(c.pid, std::process::id());
        assert_eq!(c.uid, nix::unistd::getuid().as_raw());
        assert_eq!(c.exe, std::env::current_exe().unwrap().display().to_string());
        assert!(c.pidfd, "this kernel offers pidfd_open");
        drop(client);
    }

    /// Found by the SPIFFE bench: with one executable check per uid at a
    /// time, callers of one uid connecting together were attested with an
    /// unknown executable, and refused by every `exe` rule.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_of_one_uid_connecting_together_are_all_attested() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..16 {
            clients.push(UnixStream::connect(&path).await.unwrap());
            servers.push(listener.accept().await.unwrap().0);
        }
        let mut attesting = tokio::task::JoinSet::new();
        for server in servers {
            attesting.spawn(async move { attest(&server).await.map(|(c, _)| c.exe) });
        }
        let me = std::env::current_exe().unwrap().display().to_string();
        let mut n = 0;
        while let Some(exe) = attesting.join_next().await {
            assert_eq!(exe.unwrap().as_deref(), Some(me.as_str()));
            n += 1;
        }
        assert_eq!(n, 16);
        drop(clients);
    }

    /// Waits (bounded) until process `pid` runs the program at `path`.
    fn running(pid: i32, path: &std::path::Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_deref() != Some(path) {
            assert!(std::time::Instant::now() < deadline, "{pid} never ran {}", path.display());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Review finding: the executable's path was taken as the kernel gave
    /// it, as the process sees it. In a mount namespace of its own a user
    /// mounted another program over an allowed path and was attested as it;
    /// a deleted program kept its name.
    #[test]
    fn an_executable_path_naming_another_file_is_not_attested() {
        let dir = tempfile::tempdir().unwrap();
        let (real, decoy) = (dir.path().join("real"), dir.path().join("frontend"));
        std::fs::copy("/bin/sleep", &real).unwrap();
        std::fs::copy("/bin/true", &decoy).unwrap();

        let mut child = std::process::Command::new(&real).arg("30").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        running(pid, &real);
        assert_eq!(verified_exe(pid), real.display().to_string(), "a program at its own path is attested");
        let mark = process_mark(u32::try_from(pid).unwrap()).unwrap();
        std::fs::remove_file(&real).unwrap();
        assert_eq!(verified_exe(pid), "", "a deleted program is not");
        // Second review: a package upgrade replaces a running program on
        // disk; the process is still the one that connected.
        assert_eq!(process_mark(u32::try_from(pid).unwrap()), Some(mark), "the mark survives the upgrade");
        child.kill().unwrap();
        child.wait().unwrap();

        // sleep, mounted over `frontend` in a namespace of its own.
        let ns = if nix::unistd::getuid().is_root() { "-m" } else { "-Urm" };
        let script = format!("mount --bind /bin/sleep {0} && exec {0} 30", decoy.display());
        let mut child = std::process::Command::new("unshare").args([ns, "sh", "-c", &script]).spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        running(pid, &decoy);
        assert_eq!(verified_exe(pid), "", "a program mounted over an allowed path is not that path");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
