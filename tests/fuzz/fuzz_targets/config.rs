#![no_main]
//! grantlined.toml and agent.toml (user and group names resolve to fixed ids:
//! no lookups while fuzzing).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(file) = toml::from_str::<grantline_daemon::config::ConfigFile>(text) {
            // What the `grantline` CLI reads of it: the [admin] section.
            if let Some(admin) = &file.admin {
                let _ = (admin.enabled(), admin.socket(), admin.group(), admin.mode());
            }
        }
        let _ = grantline_agent::config::AgentConfigFile::parse(text, |_| Some(1000), |_| Some(1000));
    }
});
