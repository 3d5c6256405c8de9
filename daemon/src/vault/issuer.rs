//! Minting through Vault: `pki/sign/:role`, `ssh/sign/:role`,
//! `auth/token/create-orphan`, and leased reads such as `database/creds/:role`.
//! The Grantline role is the Vault role name; policy has already capped TTLs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use grantline_proto::audit::event::vault_fingerprint;
use sha2::{Digest, Sha256};
use vaultrs::api::pki::requests::SignCertificateRequest;
use vaultrs::api::ssh::requests::SignSSHKeyRequest;
use vaultrs::api::token::requests::CreateOrphanTokenRequest;

use super::endpoints::LeasedRead;
use super::{Retry, Vault};
use crate::issuer::embedded::unix;
use crate::issuer::{CheckedCsr, IssueError, IssueFuture, Issued, Issuer, Order, What};

pub struct VaultIssuer {
    vault: Arc<Vault>,
}

impl VaultIssuer {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    async fn x509(&self, role: &str, csr: &CheckedCsr, sans: &[String], ttl: Duration) -> Result<Issued, IssueError> {
        let csr_pem = grantline_proto::pem::encode("CERTIFICATE REQUEST", &csr.der);
        let (ips, dns): (Vec<&String>, Vec<&String>) = sans.iter().partition(|s| s.parse::<std::net::IpAddr>().is_ok());
        let common_name = dns.first().or(ips.first()).map(|s| s.as_str()).unwrap_or_default().to_owned();
        let mount = &self.vault.config.pki_mount;
        let r =
            self.vault
                .call("pki sign", Retry::Idempotent, |c| {
                    let mut opts = SignCertificateRequest::builder();
                    opts.alt_names(dns.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","))
                        .ip_sans(ips.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","))
                        .ttl(format!("{}s", ttl.as_secs()));
                    let (csr_pem, common_name) = (csr_pem.clone(), common_name.clone());
                    async move {
                        vaultrs::pki::cert::ca::sign(&*c, mount, role, &csr_pem, &common_name, Some(&mut opts)).await
                    }
                })
                .await?;
        let der = rustls_pemfile::certs(&mut r.certificate.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| IssueError::Internal("Vault returned no certificate".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| IssueError::Internal(format!("Vault returned an unreadable certificate: {e}")))?;
        let chain = match &r.ca_chain {
            Some(chain) if !chain.is_empty() => chain.iter().map(|c| format!("{}\n", c.trim_end())).collect(),
            _ => format!("{}\n", r.issuing_ca.trim_end()),
        };
        Ok(Issued {
            serial: r.serial_number.replace(':', ""),
            fingerprint: hex::encode(Sha256::digest(&der)),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            cert_pem: format!("{}\n", r.certificate.trim_end()),
            chain_pem: chain,
            ..Issued::default()
        })
    }

    async fn ssh(
        &self,
        order: &Order,
        key: &ssh_key::PublicKey,
        principals: &[String],
        host: bool,
    ) -> Result<Issued, IssueError> {
        let public = key.to_openssh().map_err(|e| IssueError::BadRequest(e.to_string()))?;
        let mount = &self.vault.config.ssh_mount;
        let r = self
            .vault
            .call("ssh sign", Retry::Idempotent, |c| {
                let mut opts = SignSSHKeyRequest::builder();
                opts.cert_type(if host { "host" } else { "user" })
                    .valid_principals(principals.join(","))
                    .ttl(format!("{}s", order.ttl.as_secs()));
                let public = public.clone();
                async move { vaultrs::ssh::ca::sign(&*c, mount, &order.role, &public, Some(&mut opts)).await }
            })
            .await?;
        let cert = ssh_key::Certificate::from_openssh(r.signed_key.trim())
            .map_err(|e| IssueError::Internal(format!("Vault returned an unreadable SSH certificate: {e}")))?;
        let blob = cert.to_bytes().map_err(|e| IssueError::Internal(e.to_string()))?;
        Ok(Issued {
            serial: cert.serial().to_string(),
            fingerprint: hex::encode(Sha256::digest(&blob)),
            not_before: i64::try_from(cert.valid_after()).unwrap_or(0),
            not_after: i64::try_from(cert.valid_before()).unwrap_or(i64::MAX),
            ssh_certificate: r.signed_key.trim().to_owned(),
            ..Issued::default()
        })
    }

    async fn token(&self, order: &Order, policies: &[String], num_uses: u32) -> Result<Issued, IssueError> {
        let ttl = format!("{}s", order.ttl.as_secs());
        let auth = self
            .vault
            .call("token create", Retry::Once, |c| {
                let mut opts = CreateOrphanTokenRequest::builder();
                opts.policies(policies.to_vec())
                    .ttl(ttl.clone())
                    .explicit_max_ttl(ttl.clone())
                    .num_uses(u64::from(num_uses))
                    .no_default_policy(true)
                    .renewable(false)
                    .display_name(format!("grantline-{}", order.node))
                    .meta(std::collections::HashMap::from([
                        ("node".to_owned(), order.node.clone()),
                        ("role".to_owned(), order.role.clone()),
                    ]));
                async move { vaultrs::token::new_orphan(&*c, Some(&mut opts)).await }
            })
            .await?;
        let now = unix(SystemTime::now());
        Ok(Issued {
            fingerprint: vault_fingerprint("token-accessor", &auth.accessor),
            not_before: now,
            not_after: now + i64::try_from(auth.lease_duration).unwrap_or(0),
            vault_token: auth.client_token,
            token_accessor: auth.accessor,
            ..Issued::default()
        })
    }

    async fn secret(&self, path: &str, ttl: Duration) -> Result<Issued, IssueError> {
        let r = self
            .vault
            .call("reading a leased secret", Retry::Once, |c| {
                let e = LeasedRead { path: path.to_owned() };
                async move { vaultrs::api::exec_with_no_result(&*c, e).await }
            })
            .await?;
        if r.lease_id.is_empty() {
            return Err(IssueError::BadRequest(format!("{path} is not a leased secret (Vault returned no lease)")));
        }
        let mut lease = Duration::from_secs(u64::from(r.lease_duration));
        if lease > ttl {
            // Cap the lease at what policy allows; if Vault will not shorten
            // it, give the secret back rather than hand out more than allowed.
            match self.vault.renew_lease(&r.lease_id, ttl).await {
                Ok(granted) if granted <= ttl => lease = granted,
                outcome => {
                    let _ = self.vault.revoke_lease(&r.lease_id).await;
                    let why = match outcome {
                        Ok(granted) => format!("Vault kept its TTL at {granted:?}"),
                        Err(e) => e.to_string(),
                    };
                    return Err(IssueError::BadRequest(format!(
                        "the lease on {path} is longer than policy allows ({ttl:?}) and could not be shortened: {why}; lower the Vault role's default_ttl"
                    )));
                }
            }
        }
        let data = r.data.unwrap_or_default();
        let now = unix(SystemTime::now());
        Ok(Issued {
            fingerprint: vault_fingerprint("lease", &r.lease_id),
            not_before: now,
            not_after: now + i64::try_from(lease.as_secs()).unwrap_or(0),
            secret_json: serde_json::Value::Object(data).to_string(),
            lease_id: r.lease_id,
            ..Issued::default()
        })
    }
}

impl Issuer for VaultIssuer {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a> {
        Box::pin(async move {
            match &order.what {
                What::X509 { csr, sans } => self.x509(&order.role, csr, sans, order.ttl).await,
                What::Ssh { public_key, principals, host } => self.ssh(order, public_key, principals, *host).await,
                What::VaultToken { policies, num_uses } => self.token(order, policies, *num_uses).await,
                What::Secret { path } => self.secret(path, order.ttl).await,
            }
        })
    }
}
