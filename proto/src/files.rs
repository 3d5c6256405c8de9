//! Files the broker and agent write: atomically (temp file, fsync, rename),
//! secrets with mode 0600, and secrets refused when others can read them.
//! The one piece of I/O in this crate, shared so both sides do it the same way.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

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
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o600)
        .open(&tmp)
        .map_err(|e| context(e, format!("cannot create {}", tmp.display())))?;
    let result = (|| {
        if owner.is_some() || group.is_some() {
            std::os::unix::fs::fchown(&f, owner, group)
                .map_err(|e| context(e, format!("cannot give {} to uid {owner:?} gid {group:?}", path.display())))?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path).map_err(|e| context(e, format!("cannot rename {} to {}", tmp.display(), path.display())))?;
    // Make the rename itself durable.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

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
    fs::read_to_string(path).map_err(|e| context(e, what()))
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
}
