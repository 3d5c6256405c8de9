#![no_main]
//! grantlined.toml and agent.toml (user and group names resolve to fixed ids:
//! no lookups while fuzzing).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = toml::from_str::<grantline_daemon::config::ConfigFile>(text);
        let _ = grantline_agent::config::AgentConfigFile::parse(text, |_| Some(1000), |_| Some(1000));
    }
});
