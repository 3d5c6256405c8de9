//! Minting through Vault: `pki/sign/:role`, `ssh/sign/:role`,
//! `auth/token/create-orphan`, and leased reads such as `database/creds/:role`.
//! The Grantline role is the Vault role name; policy has already capped TTLs.

use grantline_proto::audit::event::certificate_fingerprint;
use std::sync::Arc;
use std::time::Duration;

use grantline_proto::audit::event::vault_fingerprint;
use grantline_proto::clock::now_unix;
use serde_json::{Map, Value};
use vaultrs::api::pki::requests::SignCertificateRequest;
use vaultrs::api::ssh::requests::SignSSHKeyRequest;

use super::endpoints::{CreateOrphanToken, LeasedRead};
use super::{Minted, Vault};
use crate::issuer::{CheckedCsr, IssueError, IssueFuture, Issued, Issuer, Order, What, WithdrawFuture};

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
                .call("pki sign", |c| {
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
            fingerprint: certificate_fingerprint(&der),
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
            .call("ssh sign", |c| {
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
            fingerprint: certificate_fingerprint(&blob),
            not_before: i64::try_from(cert.valid_after()).unwrap_or(0),
            not_after: i64::try_from(cert.valid_before()).unwrap_or(i64::MAX),
            ssh_certificate: r.signed_key.trim().to_owned(),
            ..Issued::default()
        })
    }

    async fn token(&self, order: &Order, policies: &[String], num_uses: u32) -> Result<Issued, IssueError> {
        let ttl = format!("{}s", order.ttl.as_secs());
        let body = serde_json::json!({
            "policies": policies,
            "ttl": ttl,
            "explicit_max_ttl": ttl,
            "num_uses": num_uses,
            "no_default_policy": true,
            "renewable": false,
            "display_name": format!("grantline-{}", order.node),
            "meta": { "node": order.node, "role": order.role },
        });
        let token = self
            .mint(
                "token create",
                || CreateOrphanToken { body: body.clone() },
                minted_token,
                |answer| read_token_answer(answer, policies),
            )
            .await?;
        let now = now_unix();
        Ok(Issued {
            fingerprint: vault_fingerprint("token-accessor", &token.accessor),
            not_before: now,
            not_after: now + i64::try_from(token.lease_duration).unwrap_or(0),
            vault_token: token.client_token,
            token_accessor: token.accessor,
            ..Issued::default()
        })
    }

    async fn secret(&self, path: &str, ttl: Duration) -> Result<Issued, IssueError> {
        let leased = self
            .mint("reading a leased secret", || LeasedRead { path: path.to_owned() }, minted_lease, read_lease_answer)
            .await?;
        let Some(leased) = leased else {
            return Err(IssueError::BadRequest(format!("{path} is not a leased secret (Vault returned no lease)")));
        };
        let mut lease = Duration::from_secs(leased.lease_duration);
        if lease > ttl {
            // Cap the lease at what policy allows; if Vault will not shorten
            // it, give the secret back rather than hand out more than allowed.
            match self.vault.renew_lease(&leased.lease_id, ttl).await {
                Ok(granted) if granted <= ttl => lease = granted,
                outcome => {
                    let lease = Minted::Lease { lease_id: leased.lease_id.clone() };
                    self.vault.withdraw(&lease, "reading a leased secret").await;
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
        let now = now_unix();
        Ok(Issued {
            fingerprint: vault_fingerprint("lease", &leased.lease_id),
            not_before: now,
            not_after: now + i64::try_from(lease.as_secs()).unwrap_or(0),
            secret_json: serde_json::Value::Object(leased.data).to_string(),
            lease_id: leased.lease_id,
            ..Issued::default()
        })
    }

    /// Sends the minting `endpoint` once ([`Vault::call_minting`]) and reads
    /// its answer with `read`. An answer `read` will not deliver is
    /// revoked (what `minted` names in it) and reported, with why, as an
    /// internal error: sending the request again would only repeat it.
    async fn mint<E, R>(
        &self,
        what: &'static str,
        endpoint: impl Fn() -> E,
        minted: fn(&Value) -> Option<Minted>,
        read: impl FnOnce(&Value) -> Result<R, String>,
    ) -> Result<R, IssueError>
    where
        E: rustify::endpoint::Endpoint<Response = Value> + Send + 'static,
    {
        let answer = self
            .vault
            .call_minting(
                what,
                |c| {
                    let e = endpoint();
                    async move { vaultrs::api::exec_with_no_result(&*c, e).await }
                },
                minted,
            )
            .await?;
        let why = match read(&answer) {
            Ok(r) => return Ok(r),
            Err(why) => why,
        };
        let fate = match minted(&answer) {
            Some(m) => {
                self.vault.withdraw(&m, what).await;
                "what Vault created was revoked"
            }
            None => "the answer names nothing the broker could revoke",
        };
        Err(IssueError::Internal(format!("{what}: Vault's answer is not usable ({why}); {fate}")))
    }
}

/// The token named in an answer to `auth/token/create-orphan`.
fn minted_token(answer: &Value) -> Option<Minted> {
    let accessor = answer.pointer("/auth/accessor")?.as_str()?;
    (!accessor.is_empty()).then(|| Minted::Token { accessor: accessor.to_owned() })
}

/// The lease named in an answer to a leased read.
fn minted_lease(answer: &Value) -> Option<Minted> {
    let lease_id = answer.get("lease_id")?.as_str()?;
    (!lease_id.is_empty()).then(|| Minted::Lease { lease_id: lease_id.to_owned() })
}

#[derive(Debug, PartialEq, Eq)]
struct CreatedToken {
    client_token: String,
    accessor: String,
    lease_duration: u64,
}

/// Reads a token creation's answer. The token must carry policies, and only
/// those asked for: a token without any (Vault answers one for a request of
/// `default` alone under `no_default_policy`) or with more is not delivered.
fn read_token_answer(answer: &Value, asked: &[String]) -> Result<CreatedToken, String> {
    let auth = answer.get("auth").filter(|a| a.is_object()).ok_or("it has no auth object")?;
    let text = |field: &str| {
        auth.get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or(format!("auth.{field} is missing"))
    };
    let (client_token, accessor) = (text("client_token")?, text("accessor")?);
    let lease_duration =
        auth.get("lease_duration").and_then(Value::as_u64).ok_or("auth.lease_duration is not a number")?;
    let policies: Vec<&str> = match auth.get("policies") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            list.iter().map(|p| p.as_str().ok_or("auth.policies holds a non-string")).collect::<Result<_, _>>()?
        }
        Some(_) => return Err("auth.policies is not a list".into()),
    };
    if policies.is_empty() {
        return Err("the token has no policies".into());
    }
    if let Some(extra) = policies.iter().find(|p| !asked.iter().any(|a| a == *p)) {
        return Err(format!("the token carries policy {extra:?}, which was not asked for"));
    }
    Ok(CreatedToken { client_token, accessor, lease_duration })
}

struct LeasedSecret {
    lease_id: String,
    lease_duration: u64,
    data: Map<String, Value>,
}

/// Reads a leased read's answer; `None` when the path is not leased.
fn read_lease_answer(answer: &Value) -> Result<Option<LeasedSecret>, String> {
    if minted_lease(answer).is_none() {
        return Ok(None);
    }
    let lease_id = answer["lease_id"].as_str().unwrap_or_default().to_owned();
    let lease_duration =
        answer.get("lease_duration").and_then(Value::as_u64).ok_or("lease_duration is not a number")?;
    let data = match answer.get("data") {
        Some(Value::Object(m)) => m.clone(),
        _ => return Err("it has no data object".into()),
    };
    Ok(Some(LeasedSecret { lease_id, lease_duration, data }))
}

impl Issuer for VaultIssuer {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a> {
        Box::pin(async move {
            match &order.what {
                What::X509 { csr, sans } => self.x509(&order.role, csr, sans, order.ttl).await,
                What::Ssh { public_key, principals, host } => self.ssh(order, public_key, principals, *host).await,
                What::VaultToken { policies, num_uses } => self.token(order, policies, *num_uses).await,
                What::Secret { path } => self.secret(path, order.ttl).await,
                What::X509Svid { .. } | What::JwtSvid { .. } => {
                    Err(IssueError::BadRequest("SVIDs are signed by the broker's trust domain, not by Vault".into()))
                }
            }
        })
    }

    fn withdraw<'a>(&'a self, issued: &'a Issued) -> WithdrawFuture<'a> {
        Box::pin(async move {
            if !issued.lease_id.is_empty() {
                self.vault.revoke_lease(&issued.lease_id).await
            } else if !issued.token_accessor.is_empty() {
                self.vault.revoke_accessor(&issued.token_accessor).await
            } else {
                Ok(())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn answer(auth: Value) -> Value {
        json!({ "request_id": "r", "auth": auth })
    }

    fn asked() -> Vec<String> {
        vec!["app-read".to_owned()]
    }

    #[test]
    fn a_complete_token_answer_is_read() {
        let a = answer(json!({ "client_token": "t", "accessor": "a", "lease_duration": 60, "policies": ["app-read"] }));
        let t = read_token_answer(&a, &asked()).unwrap();
        assert_eq!(t, CreatedToken { client_token: "t".into(), accessor: "a".into(), lease_duration: 60 });
    }

    #[test]
    fn a_token_answer_that_cannot_be_delivered_still_names_the_token_to_revoke() {
        let cases = [
            // What Vault answers for `default` alone under no_default_policy.
            (json!({ "client_token": "t", "accessor": "a", "lease_duration": 60, "policies": null }), "no policies"),
            (json!({ "client_token": "t", "accessor": "a", "lease_duration": 60, "policies": [] }), "no policies"),
            (
                json!({ "client_token": "t", "accessor": "a", "lease_duration": 60, "policies": ["app-read", "root"] }),
                "\"root\", which was not asked for",
            ),
            (json!({ "accessor": "a", "lease_duration": 60, "policies": ["app-read"] }), "client_token is missing"),
            (
                json!({ "client_token": "t", "accessor": "a", "lease_duration": "60", "policies": ["app-read"] }),
                "lease_duration",
            ),
            (
                json!({ "client_token": "t", "accessor": "a", "lease_duration": 60, "policies": "app-read" }),
                "not a list",
            ),
        ];
        for (auth, why) in cases {
            let a = answer(auth);
            let err = read_token_answer(&a, &asked()).unwrap_err();
            assert!(err.contains(why), "{err:?} should say {why:?}");
            assert_eq!(minted_token(&a), Some(Minted::Token { accessor: "a".into() }));
        }
        assert!(read_token_answer(&json!({ "data": {} }), &asked()).unwrap_err().contains("no auth"));
        assert_eq!(minted_token(&json!({ "auth": { "accessor": "" } })), None);
    }

    #[test]
    fn lease_answers_are_read_or_name_the_lease_to_revoke() {
        let good = json!({ "lease_id": "database/creds/ro/x", "lease_duration": 300, "data": { "username": "u" } });
        let l = read_lease_answer(&good).unwrap().unwrap();
        assert_eq!((l.lease_id.as_str(), l.lease_duration), ("database/creds/ro/x", 300));
        assert!(read_lease_answer(&json!({ "lease_id": "", "data": {} })).unwrap().is_none(), "not leased");
        let bad = json!({ "lease_id": "database/creds/ro/x", "lease_duration": 300, "data": "u" });
        assert!(read_lease_answer(&bad).is_err());
        assert_eq!(minted_lease(&bad), Some(Minted::Lease { lease_id: "database/creds/ro/x".into() }));
    }
}
