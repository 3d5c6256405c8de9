//! grantline-loadgen: load against a broker or OpenBao, one JSON object out.
//!
//! ```text
//! grantline-loadgen grants --broker ADDR --ca-file CA --identity-dir AGENT_STATE --role R --san NAME \
//!     [--connections 4] [--concurrency 64] [--requests 5000] [--broker-pid PID]
//! grantline-loadgen vault-pki --vault URL --token T --role R --san NAME [--concurrency 64] [--requests 5000]
//!     [--vault-pid PID]
//! grantline-loadgen provision --state-dir BROKER_STATE --nodes N --out FIXTURE [--prefix load-] [--ttl-hours 24]
//! grantline-loadgen hold FLEET [--grant-rate 0] [--concurrency 64] [--seconds 10]
//! grantline-loadgen sweep FLEET [--start-rate 500] [--step-seconds 5]
//! grantline-loadgen storm FLEET --ready-file PATH [--limit-seconds 120] [--broker-pid-file PATH]
//! ```
//!
//! FLEET is `--broker ADDR --ca-file CA --fixture FIXTURE --agents N --role R --san NAME
//! [--endpoints 16] [--connect-concurrency 128] [--no-resumption] [--broker-pid PID]`.
//! Each agent keeps its TLS client and resumes its session on reconnects,
//! as `grantline-agent` does, unless `--no-resumption`.
//!
//! With a pid, `grants` and `vault-pki` report the server's CPU time per
//! credential from /proc (`broker_cpu_us_per_grant`, `vault_cpu_us_per_sign`);
//! `hold`, `sweep` and `storm` with `--broker-pid` report CPU per handshake,
//! per grant and per re-granted agent.
//! `provision` needs the broker stopped; it issues fixture identities and
//! audits them (RFD 0008). `hold` connects the fixture's agents, holds them,
//! asks for grants (at `--grant-rate` per second, or as fast as
//! `--concurrency` workers go), and reports the broker's RSS and CPU time.
//! `sweep` raises the grant rate until the broker falls behind and reports
//! the peak and the p99 at half of it. `storm` connects and grants once per
//! agent, creates `--ready-file`, waits for the broker to be restarted (all
//! connections cut), then times every agent's reconnection and new grant.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use grantline_tests::load::{broker_grants, vault_pki, BrokerLoad, VaultLoad};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn req_arg(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| {
        eprintln!("grantline-loadgen: {name} is required");
        std::process::exit(64)
    })
}

fn num(args: &[String], name: &str, default: usize) -> usize {
    arg(args, name).map_or(default, |v| {
        v.parse().unwrap_or_else(|_| {
            eprintln!("grantline-loadgen: {name} must be a number");
            std::process::exit(64)
        })
    })
}

fn fleet(args: &[String]) -> grantline_tests::load::FleetLoad {
    grantline_tests::load::FleetLoad {
        broker: req_arg(args, "--broker"),
        ca_pem: std::fs::read_to_string(req_arg(args, "--ca-file")).unwrap(),
        fixture: req_arg(args, "--fixture").into(),
        agents: num(args, "--agents", 1000),
        endpoints: num(args, "--endpoints", 16),
        connect_concurrency: num(args, "--connect-concurrency", 128),
        role: req_arg(args, "--role"),
        san: req_arg(args, "--san"),
        broker_pid: arg(args, "--broker-pid").map(|p| p.parse().unwrap()),
        resumption: !args.iter().any(|a| a == "--no-resumption"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = match args.get(1).map(String::as_str) {
        Some("grants") => broker_grants(
            &BrokerLoad {
                broker: req_arg(&args, "--broker"),
                ca_pem: std::fs::read_to_string(req_arg(&args, "--ca-file")).unwrap(),
                identity_dir: req_arg(&args, "--identity-dir").into(),
                role: req_arg(&args, "--role"),
                san: req_arg(&args, "--san"),
                connections: num(&args, "--connections", 4),
                concurrency: num(&args, "--concurrency", 64),
                requests: num(&args, "--requests", 5000),
                broker_pid: arg(&args, "--broker-pid").map(|p| p.parse().unwrap()),
            },
            "broker-grants",
        ),
        Some("vault-pki") => vault_pki(&VaultLoad {
            vault: req_arg(&args, "--vault"),
            token: req_arg(&args, "--token"),
            role: req_arg(&args, "--role"),
            san: req_arg(&args, "--san"),
            concurrency: num(&args, "--concurrency", 64),
            requests: num(&args, "--requests", 5000),
            vault_pid: arg(&args, "--vault-pid").map(|p| p.parse().unwrap()),
        }),
        Some("provision") => grantline_tests::load::provision(
            std::path::Path::new(&req_arg(&args, "--state-dir")),
            &arg(&args, "--prefix").unwrap_or_else(|| "load-".into()),
            num(&args, "--nodes", 1000),
            std::time::Duration::from_secs(3600 * num(&args, "--ttl-hours", 24) as u64),
            std::path::Path::new(&req_arg(&args, "--out")),
        ),
        Some("hold") => grantline_tests::load::hold(&grantline_tests::load::HoldLoad {
            fleet: fleet(&args),
            grant_rate: num(&args, "--grant-rate", 0) as f64,
            concurrency: num(&args, "--concurrency", 64),
            duration: Duration::from_secs(num(&args, "--seconds", 10) as u64),
        }),
        Some("sweep") => grantline_tests::load::sweep(
            &fleet(&args),
            num(&args, "--start-rate", 500) as f64,
            Duration::from_secs(num(&args, "--step-seconds", 5) as u64),
        ),
        Some("storm") => grantline_tests::load::storm(
            &fleet(&args),
            std::path::Path::new(&req_arg(&args, "--ready-file")),
            Duration::from_secs(num(&args, "--limit-seconds", 120) as u64),
            arg(&args, "--broker-pid-file").as_deref().map(std::path::Path::new),
        ),
        _ => {
            eprintln!(
                "usage: grantline-loadgen grants|vault-pki|provision|hold|sweep|storm ... (see the source header)"
            );
            std::process::exit(64);
        }
    };
    println!("{out}");
}
