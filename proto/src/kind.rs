//! The credential kinds: the one vocabulary of the wire, policy files,
//! audit events, the agent's configuration and the CLI.

use crate::wire;

/// What a credential is. The wire carries it as [`wire::CredentialKind`],
/// whose zero value (`Unspecified`) is not a kind: [`Kind::from_wire`]
/// turns it away, so nothing past the parsers handles a kind-less request.
/// Its discriminants are the wire's numbers, so that even a stray `as i32`
/// says the same as [`Kind::wire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    X509 = 1,
    SshUser = 2,
    SshHost = 3,
    VaultToken = 4,
    DynamicSecret = 5,
    X509Svid = 6,
    JwtSvid = 7,
}

impl Kind {
    /// Every kind, in the order the wire numbers them.
    pub const ALL: [Self; 7] = [
        Self::X509,
        Self::SshUser,
        Self::SshHost,
        Self::VaultToken,
        Self::DynamicSecret,
        Self::X509Svid,
        Self::JwtSvid,
    ];

    /// The name used in policy files, audit events and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::SshUser => "ssh-user",
            Self::SshHost => "ssh-host",
            Self::VaultToken => "vault-token",
            Self::DynamicSecret => "secret",
            Self::X509Svid => "x509-svid",
            Self::JwtSvid => "jwt-svid",
        }
    }

    /// The kind called `name` in a policy or configuration file.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Every kind's name, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// What a request's names are for this kind, for messages.
    pub fn names_are(self) -> &'static str {
        match self {
            Self::X509 => "SAN",
            Self::SshUser | Self::SshHost => "principal",
            Self::VaultToken => "Vault policy",
            Self::DynamicSecret => "name",
            Self::X509Svid | Self::JwtSvid => "SPIFFE ID",
        }
    }

    /// A SPIFFE SVID (RFD 0011): issued to a local caller, never to a
    /// node as such.
    pub fn is_svid(self) -> bool {
        matches!(self, Self::X509Svid | Self::JwtSvid)
    }

    /// A kind as the wire numbers it.
    pub fn wire(self) -> wire::CredentialKind {
        match self {
            Self::X509 => wire::CredentialKind::X509,
            Self::SshUser => wire::CredentialKind::SshUser,
            Self::SshHost => wire::CredentialKind::SshHost,
            Self::VaultToken => wire::CredentialKind::VaultToken,
            Self::DynamicSecret => wire::CredentialKind::DynamicSecret,
            Self::X509Svid => wire::CredentialKind::X509Svid,
            Self::JwtSvid => wire::CredentialKind::JwtSvid,
        }
    }

    /// The kind a wire number names; None for `Unspecified` and for
    /// numbers this version does not know.
    pub fn from_wire(number: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.wire() as i32 == number)
    }

    /// The kind's name, or "unknown" for a number that is not a kind (for
    /// logs and metrics labels, which must stay a small set).
    pub fn name_of_wire(number: i32) -> &'static str {
        Self::from_wire(number).map_or("unknown", Self::name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_its_name_and_its_number_and_nothing_else_is() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
            assert_eq!(Kind::from_wire(k.wire() as i32), Some(k));
            assert_eq!(k as i32, k.wire() as i32);
        }
        for name in ["unspecified", "", "X509", "ssh", "*"] {
            assert_eq!(Kind::parse(name), None, "{name}");
        }
        for number in [wire::CredentialKind::Unspecified as i32, -1, 8, i32::MAX] {
            assert_eq!(Kind::from_wire(number), None, "{number}");
            assert_eq!(Kind::name_of_wire(number), "unknown");
        }
        assert_eq!(Kind::names(), "x509, ssh-user, ssh-host, vault-token, secret, x509-svid, jwt-svid");
    }
}
