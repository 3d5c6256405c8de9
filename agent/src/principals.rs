//! Whom a local caller answers to, for the SPIFFE socket's shares (RFD
//! 0011): the ids a user was delegated in `/etc/subuid` (rootless
//! containers) are one principal, that user's delegation, however many of
//! them the user commands, and apart from the user's own uid (a range owned
//! by root is not root). A caller in a user namespace other than the
//! agent's, on ids nobody was delegated (a pod's or a container's own
//! range), is one principal per namespace, however many uids it switches
//! between. Every other uid is its own principal: a directory user with a
//! high uid is not lumped with others. `/etc/subuid` is read when the agent
//! starts.

use std::path::Path;

/// The largest `/etc/subuid` read (a larger one is ignored: no delegation),
/// and the most ranges kept from it.
const MAX_FILE: u64 = 1024 * 1024;
const MAX_RANGES: usize = 4096;

/// What shares are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// A uid of the agent's own user namespace, no one's delegation.
    Uid(u32),
    /// The ids delegated to this owner uid.
    Delegated(u32),
    /// A user namespace other than the agent's (its inode).
    Namespace(u64),
}

/// The user namespace of process `pid` (its nsfs inode), from /proc.
pub fn user_namespace(pid: impl std::fmt::Display) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()?;
    link.to_str()?.strip_prefix("user:[")?.strip_suffix(']')?.parse().ok()
}

/// The agent's own user namespace, read once: it does not change.
pub fn own_user_namespace() -> Option<u64> {
    static OWN: std::sync::LazyLock<Option<u64>> = std::sync::LazyLock::new(|| user_namespace("self"));
    *OWN
}

/// Delegated uid ranges and their owners.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Principals {
    /// (first uid, count, owner uid), as listed.
    ranges: Vec<(u32, u32, u32)>,
    /// The agent's own user namespace.
    own_namespace: Option<u64>,
}

impl Principals {
    /// Reads `path` (normally `/etc/subuid`); a missing or unreadable file
    /// delegates nothing. Owners given by name are looked up once, here.
    pub fn load(path: &Path) -> Self {
        let text = match grantline_proto::files::read_bounded(path, MAX_FILE) {
            Ok(t) => t,
            Err(e) => {
                if path.exists() {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read delegated uid ranges; none assumed");
                }
                return Self::default();
            }
        };
        let mut p =
            Self::parse(&text, |name| nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw()));
        p.own_namespace = own_user_namespace();
        p
    }

    /// Parses `/etc/subuid` lines `OWNER:FIRST:COUNT` (OWNER a name or a
    /// uid); lines that do not parse, or whose owner is unknown, are skipped.
    pub fn parse(text: &str, uid_of: impl Fn(&str) -> Option<u32>) -> Self {
        let ranges = text
            .lines()
            .filter_map(|line| {
                let mut f = line.trim().splitn(3, ':');
                let (owner, first, count) = (f.next()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
                let owner = owner.parse().ok().or_else(|| uid_of(owner))?;
                Some((first, count, owner))
            })
            .take(MAX_RANGES)
            .collect();
        Self { ranges, own_namespace: None }
    }

    /// The principal of a caller with `uid` in user namespace `namespace`:
    /// the delegation of the range `uid` falls in, else the caller's user
    /// namespace when it is not the agent's, else the uid.
    pub fn of(&self, uid: u32, namespace: Option<u64>) -> Principal {
        let delegated = self
            .ranges
            .iter()
            .find(|(first, count, _)| uid >= *first && u64::from(uid) < u64::from(*first) + u64::from(*count));
        match (delegated, namespace) {
            (Some((_, _, owner)), _) => Principal::Delegated(*owner),
            (None, Some(ns)) if self.own_namespace.is_some_and(|own| own != ns) => Principal::Namespace(ns),
            _ => Principal::Uid(uid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second review: every uid from 65,536 up shared one pool, so directory
    /// users and pods starved each other; only delegated ranges are one user.
    #[test]
    fn delegated_ranges_answer_to_their_owner_and_other_uids_to_themselves() {
        let mut p = Principals::parse(
            "alice:100000:65536\n1001:165536:65536\nmallory:x:1\nghost:300000:10\nroot:1000000:1000000000\n",
            |n| match n {
                "alice" => Some(1000),
                "root" => Some(0),
                _ => None,
            },
        );
        p.own_namespace = Some(1);
        let of = |uid| p.of(uid, Some(1));
        assert_eq!(of(100_000), Principal::Delegated(1000));
        assert_eq!(of(165_535), Principal::Delegated(1000));
        assert_eq!(of(165_536), Principal::Delegated(1001), "a numeric owner");
        assert_eq!(of(231_072), Principal::Uid(231_072), "past every range: itself");
        assert_eq!(of(300_001), Principal::Uid(300_001), "an unknown owner delegates nothing");
        assert_eq!(of(1000), Principal::Uid(1000), "a user's own uid is not its delegation");
        // Third review: a range owned by root (LXD's) is not root's share.
        assert_eq!(of(1_000_001), Principal::Delegated(0));
        assert_ne!(of(1_000_001), of(0));
        // A pod's or container's own range: one principal per namespace,
        // whichever of its uids it switches to.
        assert_eq!(p.of(500_000_000, Some(77)), Principal::Delegated(0), "a delegation wins over the namespace");
        assert_eq!(p.of(400_000, Some(77)), Principal::Namespace(77));
        assert_eq!(p.of(400_001, Some(77)), Principal::Namespace(77));
        assert_ne!(p.of(400_000, Some(78)), Principal::Namespace(77));
        assert_eq!(p.of(33, Some(1)), Principal::Uid(33), "the agent's own namespace: the uid");
        assert_eq!(Principals::parse("", |_| None).of(100_000, None), Principal::Uid(100_000));
    }

    #[test]
    fn a_process_user_namespace_is_read_from_proc() {
        assert!(user_namespace("self").is_some());
        assert_eq!(user_namespace("self"), user_namespace(std::process::id()));
    }
}
