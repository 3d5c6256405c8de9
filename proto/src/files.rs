//! Files the broker and agent write: atomically (temp file, fsync, rename),
//! secrets with mode 0600, and secrets refused when others can read them;
//! files they read: regular files only, bounded in size.
//! The one piece of I/O in this crate, shared so both sides do it the same way.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand_core::RngCore;

fn context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Writes `contents` to `path` with mode 0600, atomically.
pub fn write_secret(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Writes a file atomically with the given mode: readers see the old file or
/// the new one, never a part.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_owned(path, contents, mode, None, None)
}

/// Writes a file atomically with the given mode, owner and group. The new
/// file is private (0600) until it has its owner, then gets `mode`, then
/// replaces `path`.
pub fn write_owned(path: &Path, contents: &[u8], mode: u32, owner: Option<u32>, group: Option<u32>) -> io::Result<()> {
    stage_owned(path, contents, mode, owner, group)?.commit()
}

/// A file written in full beside its destination, not yet in its place:
/// [`Staged::commit`] renames it there; dropped uncommitted, it is removed.
/// Staging every file of a set before committing any means a failure while
/// writing (a full disk) replaces none of them.
#[must_use = "a staged file is removed unless committed"]
pub struct Staged {
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    committed: bool,
}

impl Staged {
    /// Puts the file in its place and makes the rename durable. A directory
    /// at the destination is refused before anything moves.
    pub fn commit(mut self) -> io::Result<()> {
        self.destination_is_free()?;
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| context(e, format!("cannot rename {} to {}", self.tmp.display(), self.path.display())))?;
        self.committed = true;
        if let Ok(d) = fs::File::open(self.tmp.parent().unwrap_or(Path::new("."))) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Whether the destination can take the file (nothing there, or not a
    /// directory): checked for a whole set before committing any.
    pub fn destination_is_free(&self) -> io::Result<()> {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.is_dir() => Err(io::Error::other(format!("{} is a directory", self.path.display()))),
            _ => Ok(()),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `contents` to an unpredictable temporary name beside `path`, with
/// `mode`, `owner` and `group`, synced to disk; see [`Staged`].
pub fn stage_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> io::Result<Staged> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // The temporary name is unpredictable and created exclusively, never
    // followed: whoever else can write `dir` (a sink's owner) cannot plant a
    // symlink there that makes this write, or the chown below, land on
    // another file.
    let mut nonce = [0u8; 12];
    rand_core::OsRng.try_fill_bytes(&mut nonce).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(nonce)));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode & 0o600)
        .open(&tmp)
        .map_err(|e| context(e, format!("cannot create {}", tmp.display())))?;
    let staged = Staged { tmp, path: path.to_path_buf(), committed: false };
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::fchown(&f, owner, group)
            .map_err(|e| context(e, format!("cannot give {} to uid {owner:?} gid {group:?}", path.display())))?;
    }
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(staged)
}

/// Reads a UTF-8 file of at most `max` bytes. Only a regular file is read (a
/// FIFO, device or directory is refused without blocking on it), and never
/// more than `max + 1` bytes of it, so a huge or endless file cannot exhaust
/// memory.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<String> {
    let bytes = read_bounded_bytes(path, max)?;
    String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{} is not UTF-8 text", path.display())))
}

/// [`read_bounded`] for bytes.
pub fn read_bounded_bytes(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| context(e, format!("cannot open {}", path.display())))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file; give the path of a file", path.display()),
        ));
    }
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes, the most this file may hold", path.display()),
        )
    };
    if meta.len() > max {
        return Err(too_big());
    }
    let mut out = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    f.take(max.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(too_big());
    }
    Ok(out)
}

/// The most a key or secret file may hold.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret file, refusing it when group or others may read it.
pub fn read_secret(path: &Path) -> io::Result<String> {
    let what = || format!("cannot read key file {}", path.display());
    let meta = fs::metadata(path).map_err(|e| context(e, what()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "key file {} has mode {mode:04o}, readable by others; run 'chmod 600 {}' (and consider the key exposed)",
                path.display(),
                path.display()
            ),
        ));
    }
    read_bounded(path, MAX_SECRET_FILE).map_err(|e| context(e, what()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_0600_and_loose_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_secret(&p, b"s3cret").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_secret(&p).unwrap(), "s3cret");
        write_secret(&p, b"new").unwrap();
        assert_eq!(read_secret(&p).unwrap(), "new");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&p).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    /// The review's attack on sinks: whoever can write the directory plants
    /// symlinks at the names a write might use. None is followed: the target
    /// keeps its contents and nothing but `path` changes.
    #[test]
    fn a_planted_symlink_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"root's file").unwrap();
        let path = dir.path().join("key.pem");
        // The names the old code used, and the target itself.
        std::os::unix::fs::symlink(&victim, dir.path().join(format!(".key.pem.tmp{}", std::process::id()))).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_secret(&path, b"the key").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"root's file");
        assert!(!fs::symlink_metadata(&path).unwrap().file_type().is_symlink(), "the symlink itself was replaced");
        assert_eq!(fs::read(&path).unwrap(), b"the key");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary file left: {leftovers:?}");
    }

    #[test]
    fn bounded_reads_refuse_big_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, vec![b'a'; 100]).unwrap();
        assert_eq!(read_bounded(&p, 100).unwrap().len(), 100);
        let err = read_bounded(&p, 99).unwrap_err().to_string();
        assert!(err.contains("larger than 99 bytes"), "{err}");
        let err = read_bounded(Path::new("/dev/zero"), 1000).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let err = read_bounded(dir.path(), 1000).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let err = read_bounded(&fifo, 1000).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(read_bounded(&p, 10).unwrap_err().to_string().contains("not UTF-8"));
    }
}
