//! The `[admin]` section of `grantlined.toml`: where the broker's admin API
//! listens. The broker reads all of it; the `grantline` CLI reads only this
//! section, to find the socket, so both share this one definition.

use std::path::PathBuf;

use serde::Deserialize;

/// Where the admin API listens unless `[admin] socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/grantline/admin.sock";
/// The group whose members may call the admin API, unless `[admin] group`.
pub const DEFAULT_GROUP: &str = "grantline";

/// The largest `grantlined.toml` read, by the broker and by the CLI.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// `[admin]`: the admin API's Unix socket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Default true.
    pub enabled: Option<bool>,
    pub socket: Option<PathBuf>,
    /// Members may call the API; default "grantline".
    pub group: Option<String>,
    /// Octal file mode of the socket, default "0660".
    pub socket_mode: Option<String>,
}

impl AdminFile {
    /// Whether the admin API is served (`enabled`, default true).
    pub fn enabled(&self) -> bool {
        self.enabled != Some(false)
    }

    /// The socket path, or the default.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into())
    }

    /// The socket's file mode, default 0660; an error says what is wrong.
    pub fn mode(&self) -> Result<u32, String> {
        match self.socket_mode.as_deref() {
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| format!("admin.socket_mode {m:?} is not an octal file mode like \"0660\"")),
            None => Ok(0o660),
        }
    }

    /// The group allowed to call, default "grantline"; "" allows the
    /// socket's owner alone.
    pub fn group(&self) -> Option<String> {
        Some(self.group.clone().unwrap_or_else(|| DEFAULT_GROUP.into())).filter(|g| !g.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_and_at_most_0777() {
        let with = |m: &str| AdminFile { socket_mode: Some(m.into()), ..AdminFile::default() }.mode();
        assert_eq!(with("0660"), Ok(0o660));
        assert_eq!(with("0o600"), Ok(0o600));
        assert!(with("1777").is_err());
        assert!(with("rw").unwrap_err().contains("octal"));
        assert_eq!(AdminFile::default().mode(), Ok(0o660));
    }

    #[test]
    fn an_empty_group_means_the_owner_alone() {
        assert_eq!(AdminFile::default().group().as_deref(), Some(DEFAULT_GROUP));
        assert_eq!(AdminFile { group: Some(String::new()), ..AdminFile::default() }.group(), None);
        assert_eq!(AdminFile::default().socket(), PathBuf::from(DEFAULT_SOCKET));
    }
}
