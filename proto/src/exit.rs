//! The exit codes of every Grantline command (`grantlined`, `grantline`,
//! `grantline-agent`), from sysexits(3), so scripts and systemd read them
//! the same way whichever binary failed.

/// The command was used wrongly (bad flags, a missing argument).
pub const USAGE: u8 = 64;
/// The input was wrong: a refused request, a log that does not verify.
pub const DATAERR: u8 = 65;
/// An input file does not exist or cannot be read.
pub const NOINPUT: u8 = 66;
/// The thing named (a node, a grant) does not exist.
pub const NOUSER: u8 = 67;
/// A service (the broker, the agent, Vault) cannot be reached: retry.
pub const UNAVAILABLE: u8 = 69;
/// An internal error.
pub const SOFTWARE: u8 = 70;
/// A temporary failure: retry later.
pub const TEMPFAIL: u8 = 75;
/// Not allowed (refused by policy, revoked, not authenticated).
pub const NOPERM: u8 = 77;
/// The configuration is wrong; fix it before starting again.
pub const CONFIG: u8 = 78;
