//! QUIC client configuration: TLS 1.3, the broker's trust anchor, ALPN
//! `grantline/1`, and the node identity as client certificate once enrolled.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::ALPN;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::state::Identity;

/// How often an idle agent pings the broker: well inside the broker's 60 s
/// idle timeout (one lost ping is survived) and NAT bindings' 30 s and up.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// With several brokers to fail over to, a dead broker must be noticed
/// sooner than the 60 s idle timeout: the connection is given up after
/// `FLEET_IDLE_TIMEOUT` without a reply, with pings every `FLEET_KEEP_ALIVE`
/// (a third of the budget, so two lost pings are survived). The cost is a
/// ping per agent every 5 s instead of 15 s (RFD 0010).
pub const FLEET_KEEP_ALIVE: Duration = Duration::from_secs(5);
pub const FLEET_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// aws-lc with TLS_AES_128_GCM_SHA256 first (rustls puts AES-256 first):
/// its keys match the 128-bit strength of the P-256 identities and the
/// X25519 exchange, and SHA-256 has hardware where SHA-384 may not (aws-lc's
/// SHA-512 has no accelerated path on AMD), so the broker's key schedule per
/// handshake costs a fraction (RFD 0008 § A handshake's CPU). The broker
/// follows the client's order; every suite stays allowed.
pub fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

pub fn client_config(ca_pem: &str, identity: Option<&Identity>) -> Result<quinn::ClientConfig> {
    client_config_with(ca_pem, identity, false)
}

/// [`client_config`], with the shorter liveness budget of an agent that has
/// other brokers to fail over to when `fleet`.
pub fn client_config_with(ca_pem: &str, identity: Option<&Identity>, fleet: bool) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(provider());
    let mut roots = rustls::RootCertStore::empty();
    let mut pinned = Vec::new();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        let cert = cert.context("the CA file is not valid PEM")?;
        roots.add(cert.clone()).context("the CA file holds an unusable certificate")?;
        pinned.push(cert);
    }
    anyhow::ensure!(!pinned.is_empty(), "the CA file holds no certificate");
    let verifier = crate::broker_cert::BrokerVerifier::new(roots, &pinned, provider.clone())?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut tls = match identity {
        Some(id) => {
            let key = rcgen::KeyPair::from_pem(&id.key_pem).context("node.key is not a PEM private key")?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            builder.with_client_auth_cert(id.chain.clone(), key).context("the node identity is not usable")?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(if fleet { FLEET_KEEP_ALIVE } else { KEEP_ALIVE }))
        .max_idle_timeout(Some((if fleet { FLEET_IDLE_TIMEOUT } else { Duration::from_secs(60) }).try_into()?))
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        // No path-MTU probes, as at the broker: messages are a few
        // kilobytes, and QUIC's 1,200 bytes carry them (RFD 0008).
        .mtu_discovery_config(None);
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A client endpoint on an ephemeral UDP port of the right address family.
pub fn endpoint_for(broker: std::net::SocketAddr) -> Result<quinn::Endpoint> {
    let bind: std::net::SocketAddr = if broker.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
    quinn::Endpoint::client(bind).context("cannot open a UDP socket")
}

/// The name to check the broker's certificate against: the host part of ADDR.
pub fn server_name(broker: &str) -> String {
    match broker.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().to_string(),
        Err(_) => broker.rsplit_once(':').map_or(broker, |(h, _)| h).trim_matches(['[', ']']).to_owned(),
    }
}

/// The most brokers an agent is given (`--broker A,B,…`).
pub const MAX_BROKERS: usize = 32;

/// Every address to try, in order, for `brokers`: a comma-separated list
/// of HOST:PORT, each name resolved to all its records (a fleet behind one
/// DNS name), with the name to check each certificate against.
pub fn targets(brokers: &str) -> Result<Vec<(std::net::SocketAddr, String)>> {
    use std::net::ToSocketAddrs;
    let entries: Vec<&str> = brokers.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    anyhow::ensure!(!entries.is_empty(), "no broker address given; use --broker HOST:PORT[,HOST:PORT…]");
    anyhow::ensure!(entries.len() <= MAX_BROKERS, "{} broker addresses given; at most {MAX_BROKERS}", entries.len());
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for entry in entries {
        match entry.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs.take(MAX_BROKERS) {
                    if !out.iter().any(|(b, _)| *b == a) {
                        out.push((a, server_name(entry)));
                    }
                }
            }
            Err(e) => failures.push(format!("{entry}: {e}")),
        }
    }
    if out.is_empty() {
        anyhow::bail!("no broker address resolves ({}); use HOST:PORT", failures.join("; "));
    }
    // One UDP socket serves every target: keep the address family of the
    // first (a name with A and AAAA records gives both).
    let family = out[0].0.is_ipv6();
    let skipped = out.iter().filter(|(a, _)| a.is_ipv6() != family).count();
    if skipped > 0 {
        tracing::warn!(skipped, "broker addresses of the other IP family are not used; list one family");
        out.retain(|(a, _)| a.is_ipv6() == family);
    }
    for f in failures {
        tracing::warn!(broker = %f, "a broker address does not resolve; using the others");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;

    /// The agent asks for AES-128-GCM/SHA-256 first and still offers every
    /// suite rustls does, so any broker finds one it takes.
    #[test]
    fn the_agent_prefers_aes_128_gcm_and_offers_every_suite() {
        let ours = super::provider();
        assert_eq!(ours.cipher_suites[0].suite(), TLS13_AES_128_GCM_SHA256);
        let mut ours: Vec<_> = ours.cipher_suites.iter().map(|s| u16::from(s.suite())).collect();
        let mut all: Vec<_> =
            rustls::crypto::aws_lc_rs::default_provider().cipher_suites.iter().map(|s| u16::from(s.suite())).collect();
        ours.sort_unstable();
        all.sort_unstable();
        assert_eq!(ours, all);
    }
}
