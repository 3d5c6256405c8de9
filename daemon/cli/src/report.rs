//! How a command's outcome is printed: a verdict or an error, as text for
//! people or JSON for scripts, with its sysexits exit code.

use std::process::ExitCode;

use grantline_proto::exit;

pub(crate) fn report_verdict(
    json: bool,
    verdict: Result<grantline_proto::audit::Summary, grantline_proto::audit::Failure>,
) -> ExitCode {
    match verdict {
        Ok(s) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "entries": s.entries, "origin": s.origin, "head": s.head, "root": s.root, "first_time_ms": s.first_time_ms, "last_time_ms": s.last_time_ms})
                );
            } else {
                println!("OK: {} entries in log {}, head {}, root {}", s.entries, s.origin, s.head, s.root);
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "seq": f.seq, "reason": f.reason}));
            } else {
                println!("FAILED at seq {}: {}", f.seq, f.reason);
            }
            ExitCode::from(exit::DATAERR)
        }
    }
}

pub(crate) fn report_error(json: bool, code: u8, e: &anyhow::Error) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({"ok": false, "error": format!("{e:#}")}));
    } else {
        eprintln!("grantline: {e:#}");
    }
    ExitCode::from(code)
}
