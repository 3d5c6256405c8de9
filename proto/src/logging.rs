//! Logging set-up shared by `grantlined`, `grantline-agent` and `grantline`:
//! structured records to journald when stderr is the journal (the
//! `JOURNAL_STREAM` check systemd documents), plain text otherwise. The level
//! comes from `GRANTLINE_LOG` (an `EnvFilter`), default `info`.

use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Whether stderr is the stream systemd connected to the journal: the
/// device and inode in `JOURNAL_STREAM` are those of file descriptor 2.
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Installs the global subscriber. In the journal, event fields become
/// journal fields of the same name in capitals (NODE, KIND, ROLE, SEQ, ...).
pub fn init(identifier: &str) {
    let filter = || EnvFilter::try_from_env("GRANTLINE_LOG").unwrap_or_else(|_| "info".into());
    if stderr_is_journal() {
        if let Ok(journal) = tracing_journald::layer() {
            let journal = journal.with_field_prefix(None).with_syslog_identifier(identifier.to_owned());
            tracing_subscriber::registry().with(filter()).with(journal).init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_stderr() {
        // Run without the variable, with garbage, and with another file's
        // identity: never the journal. (The positive case needs a journal
        // socket as fd 2; the packaging test runs the broker under systemd's
        // conventions for that.)
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", "not:numbers");
        assert!(!stderr_is_journal());
        let m = std::fs::metadata("/").unwrap();
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
        assert!(!stderr_is_journal());
        let fd2 = std::fs::metadata("/proc/self/fd/2").unwrap();
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", fd2.dev(), fd2.ino()));
        assert!(stderr_is_journal(), "the identity of fd 2 itself is accepted");
        std::env::remove_var("JOURNAL_STREAM");
    }
}
