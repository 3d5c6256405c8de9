//! Routes each credential kind to the issuer configured for it.

use std::sync::Arc;

use super::{IssueError, IssueFuture, Issued, Issuer, Order, What, WithdrawFuture};

pub struct Backends {
    pub x509: Arc<dyn Issuer>,
    pub ssh: Arc<dyn Issuer>,
    /// Vault tokens and dynamic secrets; None without a `[vault]` section.
    pub vault: Option<Arc<dyn Issuer>>,
    /// SVIDs; None without a trust domain (`[spiffe]`).
    pub spiffe: Option<Arc<dyn Issuer>>,
}

impl Issuer for Backends {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a> {
        match &order.what {
            What::X509 { .. } => self.x509.issue(order),
            What::Ssh { .. } => self.ssh.issue(order),
            What::VaultToken { .. } | What::Secret { .. } => match &self.vault {
                Some(v) => v.issue(order),
                None => Box::pin(async {
                    Err(IssueError::BadRequest(
                        "this broker has no Vault backend; add a [vault] section to grantlined.toml".into(),
                    ))
                }),
            },
            What::X509Svid { .. } | What::JwtSvid { .. } => match &self.spiffe {
                Some(s) => s.issue(order),
                None => Box::pin(async {
                    Err(IssueError::BadRequest(
                        "this broker has no SPIFFE trust domain; add a [spiffe] section to grantlined.toml".into(),
                    ))
                }),
            },
        }
    }

    /// Only Vault hands out what can be taken back (a lease, a token); it
    /// leaves alone a credential that names neither.
    fn withdraw<'a>(&'a self, issued: &'a Issued) -> WithdrawFuture<'a> {
        match &self.vault {
            Some(v) => v.withdraw(issued),
            None => Box::pin(std::future::ready(Ok(()))),
        }
    }
}
