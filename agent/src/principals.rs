//! Who a local uid answers to, for the SPIFFE socket's shares (RFD 0011):
//! the ids a user was delegated in `/etc/subuid` (rootless containers, user
//! namespaces) are that user's, so however many of them a user commands, it
//! is one user with one share of connections and one budget of broker
//! requests. Every other uid is its own principal: a directory user with a
//! high uid, or a Kubernetes pod's mapped range, is not lumped with others.

use std::path::Path;

/// The largest `/etc/subuid` read; a larger one is ignored (no delegation).
const MAX_FILE: u64 = 1024 * 1024;

/// Delegated uid ranges and their owners.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Principals {
    /// (first uid, count, owner uid), as listed.
    ranges: Vec<(u32, u32, u32)>,
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
        Self::parse(&text, |name| nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw()))
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
            .collect();
        Self { ranges }
    }

    /// The principal `uid` answers to: the owner of the delegated range it
    /// falls in, else itself.
    pub fn of(&self, uid: u32) -> u32 {
        self.ranges
            .iter()
            .find(|(first, count, _)| uid >= *first && u64::from(uid) < u64::from(*first) + u64::from(*count))
            .map_or(uid, |(_, _, owner)| *owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second review: every uid from 65,536 up shared one pool, so directory
    /// users and pods starved each other; only delegated ranges are one user.
    #[test]
    fn delegated_ranges_answer_to_their_owner_and_other_uids_to_themselves() {
        let p = Principals::parse("alice:100000:65536\n1001:165536:65536\nmallory:x:1\nghost:300000:10\n", |n| {
            (n == "alice").then_some(1000)
        });
        assert_eq!(p.of(100_000), 1000);
        assert_eq!(p.of(165_535), 1000);
        assert_eq!(p.of(165_536), 1001, "a numeric owner");
        assert_eq!(p.of(231_071), 1001);
        assert_eq!(p.of(231_072), 231_072, "past every range: itself");
        assert_eq!(p.of(200_000 + 65_536 * 3), 200_000 + 65_536 * 3, "a pod's range is not lumped");
        assert_eq!(p.of(300_001), 300_001, "an unknown owner delegates nothing");
        assert_eq!(p.of(0), 0);
        assert_eq!(Principals::parse("", |_| None).of(100_000), 100_000);
    }
}
