#![no_main]
//! grantlined.toml, agent.toml and /etc/subuid as the agent reads it (user
//! and group names resolve to fixed ids: no lookups while fuzzing).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(file) = toml::from_str::<grantline_daemon::config::ConfigFile>(text) {
            // What the `grantline` CLI reads of it: the [admin] section.
            if let Some(admin) = &file.admin {
                let _ = (admin.enabled(), admin.socket(), admin.group(), admin.mode());
            }
            // [state]: the PostgreSQL URL and pool as the broker checks them
            // (files named in it are not read while fuzzing).
            if let Some(state) = file.state {
                let url = state.url.unwrap_or_default();
                let _ = grantline_daemon::state::redacted(&url);
                let cfg = grantline_daemon::state::PgConfig {
                    url,
                    password_file: None,
                    ca_file: None,
                    pool_size: state.pool_size.unwrap_or(1),
                    max_staleness: std::time::Duration::from_secs(30),
                };
                let _ = cfg.target();
            }
        }
        let _ = grantline_agent::config::AgentConfigFile::parse(text, |_| Some(1000), |_| Some(1000));
        let principals = grantline_agent::principals::Principals::parse(text, |_| Some(1000));
        let _ = (principals.of(100_000, Some(1)), principals.of(u32::MAX, None));
    }
});
