//! Secret files: created 0600 and atomically, refused at start when anyone but
//! the owner can read them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Writes `contents` to `path` with mode 0600, atomically (temp file + rename).
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Writes a file atomically with the given mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Reads a secret file, refusing it when group or others may read it.
pub fn read_secret(path: &Path) -> Result<String> {
    let meta =
        fs::metadata(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "key file {} has mode {mode:04o}, readable by others; run 'chmod 600 {}' (and consider the key exposed)",
            path.display(),
            path.display()
        );
    }
    fs::read_to_string(path).with_context(|| format!("cannot read key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_0600_and_loose_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_secret(&p, b"s3cret").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_secret(&p).unwrap(), "s3cret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&p).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
