//! SPIFFE (RFD 0011), the pure part: SPIFFE ID templates filled in from an
//! attested caller, the trust domain's JWT signing key, its JWKS and the
//! OIDC discovery document. The HTTPS endpoint that serves the last two is
//! `crate::server::oidc`; X509-SVIDs are signed by the embedded CA.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use grantline_proto::audit::event::{excerpt, CallerInfo};
use grantline_proto::files::{read_secret, write_secret};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The variables a SPIFFE ID template may use.
pub const TEMPLATE_VARIABLES: [&str; 6] = ["trust_domain", "node", "uid", "gid", "unit", "exe"];

/// The most audiences one JWT-SVID may name, and the longest one.
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_LEN: usize = 256;

/// Checks a policy's SPIFFE ID template: `spiffe://`, then text and known
/// `{variables}`.
pub fn check_template(t: &str) -> Result<(), String> {
    if !t.starts_with("spiffe://") {
        return Err(format!("spiffe_ids template {:?} does not start with \"spiffe://\"", excerpt(t, 80)));
    }
    if t.len() > 512 {
        return Err("a spiffe_ids template is longer than 512 bytes".into());
    }
    let TemplateParts { variables, tail } = template_parts(t)?;
    for (_, name) in variables {
        if !TEMPLATE_VARIABLES.contains(&name) {
            return Err(format!(
                "template {t:?} uses {{{name}}}; the variables are {}",
                TEMPLATE_VARIABLES.map(|v| format!("{{{v}}}")).join(", ")
            ));
        }
    }
    if tail.contains('}') {
        return Err(format!("template {t:?} has a '}}' without its '{{'"));
    }
    Ok(())
}

/// A template read once, left to right: each `{variable}` with the text
/// before it, and the text after the last one.
struct TemplateParts<'t> {
    /// (text before, variable name)
    variables: Vec<(&'t str, &'t str)>,
    tail: &'t str,
}

fn template_parts(t: &str) -> Result<TemplateParts<'_>, String> {
    let mut variables = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .ok_or_else(|| format!("template {:?} has an unclosed '{{'", excerpt(t, 512)))?;
        variables.push((&rest[..open], &rest[open + 1..close]));
        rest = &rest[close + 1..];
    }
    Ok(TemplateParts { variables, tail: rest })
}

/// The longest SPIFFE ID the broker signs: under the SPIFFE standard's
/// 2,048-byte advice, and short enough that the audit entry records the
/// whole ID (`MAX_FIELD_LEN`), never a cut one.
pub const MAX_SPIFFE_ID_LEN: usize = grantline_proto::audit::event::MAX_FIELD_LEN;

/// Fills in `template` for `caller` on `node` in `trust_domain`: the SPIFFE
/// ID it names, if it is a valid workload ID of that trust domain. Every
/// value but the executable is one path segment (a `/` in a node's claim
/// cannot reach another part of the namespace); the executable's path
/// gives one segment per directory. The template is read once, left to
/// right: a value is never read again as a template, so a caller's unit
/// named `{exe}` is just an invalid name, not a second variable.
pub fn expand(template: &str, trust_domain: &str, node: &str, caller: &CallerInfo) -> Result<String, String> {
    let segment = |what: &str, v: &str| -> Result<String, String> {
        if v.is_empty() || v.contains('/') {
            return Err(format!("the caller's {what} {:?} is not one SPIFFE ID path segment", excerpt(v, 80)));
        }
        Ok(v.to_owned())
    };
    let value = |name: &str| -> Result<String, String> {
        match name {
            "trust_domain" => Ok(trust_domain.to_owned()),
            "node" => segment("node name", node),
            "uid" => Ok(caller.uid.to_string()),
            "gid" => Ok(caller.gid.to_string()),
            "unit" => segment("systemd unit", &caller.unit),
            "exe" => match caller.exe.strip_prefix('/').unwrap_or(&caller.exe) {
                "" => Err("the caller's executable is unknown".into()),
                exe => Ok(exe.to_owned()),
            },
            other => Err(format!("template {:?} uses unknown variable {{{other}}}", excerpt(template, 80))),
        }
    };
    let TemplateParts { variables, tail } = template_parts(template)?;
    let mut id = String::with_capacity(template.len() + 64);
    for (text, name) in variables {
        id.push_str(text);
        id.push_str(&value(name)?);
        if id.len() > MAX_SPIFFE_ID_LEN {
            break;
        }
    }
    id.push_str(tail);
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err(format!("the SPIFFE ID {:?} would be longer than {MAX_SPIFFE_ID_LEN} bytes", excerpt(&id, 80)));
    }
    let parsed = spiffe::SpiffeId::new(&id).map_err(|e| format!("{:?} is not a SPIFFE ID: {e}", excerpt(&id, 120)))?;
    if parsed.trust_domain_name() != trust_domain {
        return Err(format!("{id:?} is not in this broker's trust domain {trust_domain:?}"));
    }
    if parsed.path().is_empty() {
        return Err(format!("{id:?} names the trust domain itself, not a workload"));
    }
    Ok(id)
}

/// Checks a trust domain name from the configuration.
pub fn check_trust_domain(name: &str) -> Result<()> {
    let td =
        spiffe::TrustDomain::new(name).with_context(|| format!("trust_domain {name:?} is not a trust domain name"))?;
    anyhow::ensure!(td.as_str() == name, "trust_domain {name:?}: write the bare name, e.g. \"example.org\"");
    Ok(())
}

/// Checks an audience a JWT-SVID is asked for.
pub fn check_audience(a: &str) -> Result<(), String> {
    if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || a.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "audience {:?} is not valid: 1-{MAX_AUDIENCE_LEN} printable characters without spaces",
            excerpt(a, 80)
        ));
    }
    Ok(())
}

/// The trust domain's JWT-SVID signing key: ECDSA P-256 (ES256, which the
/// JWT-SVID standard allows and every SPIFFE library verifies), in
/// `jwt-svid.key` (PKCS#8 PEM, 0600). Its key id is its RFC 7638 thumbprint.
pub struct JwtKey {
    encoding: jsonwebtoken::EncodingKey,
    kid: String,
    x: String,
    y: String,
}

/// What a JWT-SVID carries besides its signature.
#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: i64,
    iat: i64,
    jti: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    iss: &'a str,
}

impl JwtKey {
    pub const FILE: &'static str = "jwt-svid.key";

    /// Loads `dir/jwt-svid.key`, creating it if it is missing.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        let key = if path.exists() {
            let pem = read_secret(&path)?;
            rcgen::KeyPair::from_pem(&pem).with_context(|| format!("{} is not a PEM private key", path.display()))?
        } else {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            write_secret(&path, key.serialize_pem().as_bytes())?;
            key
        };
        Self::from_key(&key).with_context(|| format!("{}: the JWT-SVID key must be ECDSA P-256", path.display()))
    }

    fn from_key(key: &rcgen::KeyPair) -> Result<Self> {
        anyhow::ensure!(key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256, "not a P-256 key");
        // The SEC1 uncompressed point: 0x04, x, y.
        let point = key.public_key_raw();
        anyhow::ensure!(point.len() == 65 && point[0] == 4, "unexpected public key encoding");
        let (x, y) = (B64URL.encode(&point[1..33]), B64URL.encode(&point[33..]));
        let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = B64URL.encode(Sha256::digest(thumbprint.as_bytes()));
        Ok(Self { encoding: jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()), kid, x, y })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A JWT-SVID for `sub`, bound to `aud`, valid from `now` for `ttl`; `jti`
    /// names it in the audit log (the token itself is never logged).
    pub fn sign(&self, sub: &str, aud: &[String], now: i64, ttl: Duration, jti: &str, iss: &str) -> Result<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let exp = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        let claims = Claims { sub, aud, exp, iat: now, jti, iss };
        jsonwebtoken::encode(&header, &claims, &self.encoding).context("signing the JWT-SVID failed")
    }

    /// The public key as a JWK; `usage` is `jwt-svid` in a SPIFFE bundle,
    /// `sig` in the JWKS an OIDC relying party reads.
    pub fn jwk(&self, usage: &str) -> Value {
        json!({"kty": "EC", "crv": "P-256", "x": self.x, "y": self.y, "kid": self.kid, "alg": "ES256", "use": usage})
    }

    /// The JWKS of the trust domain's JWT authorities.
    pub fn jwks(&self, usage: &str) -> String {
        json!({ "keys": [self.jwk(usage)] }).to_string()
    }
}

/// The OpenID Provider metadata a cloud provider reads to federate with the
/// trust domain (OIDC Discovery 1.0 §3), at `{issuer}/.well-known/openid-configuration`.
pub fn discovery_document(issuer: &str) -> String {
    let issuer = issuer.trim_end_matches('/');
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/keys"),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(unit: &str, exe: &str) -> CallerInfo {
        CallerInfo { uid: 33, gid: 44, pid: 7, exe: exe.into(), unit: unit.into() }
    }

    #[test]
    fn templates_fill_in_the_attested_caller() {
        let c = caller("nginx.service", "/usr/sbin/nginx");
        let td = "example.org";
        let e = |t: &str, c: &CallerInfo| expand(t, td, "web-1", c);
        assert_eq!(e("spiffe://{trust_domain}/unit/{unit}", &c).unwrap(), "spiffe://example.org/unit/nginx.service");
        assert_eq!(
            e("spiffe://example.org/node/{node}/uid/{uid}/gid/{gid}", &c).unwrap(),
            "spiffe://example.org/node/web-1/uid/33/gid/44"
        );
        assert_eq!(e("spiffe://{trust_domain}/exe/{exe}", &c).unwrap(), "spiffe://example.org/exe/usr/sbin/nginx");
        // What no valid ID can hold is refused, never rewritten.
        for (unit, want) in
            [("", "segment"), ("a/b", "segment"), ("user@1000.service", "not a SPIFFE ID"), ("A%2e", "not a SPIFFE ID")]
        {
            let err = e("spiffe://{trust_domain}/unit/{unit}", &caller(unit, "/x")).unwrap_err();
            assert!(err.contains(want), "{unit:?}: {err}");
        }
        assert!(e("spiffe://{trust_domain}/exe/{exe}", &caller("u", "/a/../b")).is_err(), "dot segments");
        assert!(e("spiffe://{trust_domain}/exe/{exe}", &caller("u", "")).unwrap_err().contains("unknown"));
        assert!(e("spiffe://other.org/{uid}", &c).unwrap_err().contains("trust domain"));
        assert!(e("spiffe://{trust_domain}", &c).unwrap_err().contains("itself"));
        assert!(expand("spiffe://{trust_domain}/n/{node}", td, "a/b", &c).is_err());
    }

    /// Review finding: values were substituted one after another into the
    /// growing ID, so a unit named `{exe}` was filled in again with the
    /// executable's path, adding segments the template never allowed.
    #[test]
    fn a_value_is_never_read_as_a_template() {
        let td = "example.org";
        let smuggler = caller("{exe}", "/postgres.service/db/db-1");
        let err = expand("spiffe://{trust_domain}/svc/{unit}", td, "web-1", &smuggler).unwrap_err();
        assert!(err.contains("not a SPIFFE ID"), "{err}");
        let node_smuggler = caller("nginx.service", "/a/b");
        assert!(expand("spiffe://{trust_domain}/n/{node}", td, "{exe}", &node_smuggler).is_err());
        assert!(expand("spiffe://{trust_domain}/n/{node}", td, "{trust_domain}", &node_smuggler).is_err());
    }

    /// Review finding: an executable path of kilobytes gave an ID longer than
    /// the audit entry records, so the log named a cut ID.
    #[test]
    fn ids_longer_than_the_audit_field_are_refused() {
        let long = format!("/{}", ["seg"; 400].join("/"));
        let err = expand("spiffe://{trust_domain}/exe/{exe}", "example.org", "n", &caller("u", &long)).unwrap_err();
        assert!(err.contains("longer than 1024"), "{err}");
        let fits = format!("/{}", ["seg"; 200].join("/"));
        assert!(expand("spiffe://{trust_domain}/exe/{exe}", "example.org", "n", &caller("u", &fits)).is_ok());
    }

    #[test]
    fn templates_are_checked_when_the_policy_is_read() {
        assert!(check_template("spiffe://{trust_domain}/unit/{unit}").is_ok());
        for bad in ["https://x/{unit}", "spiffe://x/{pid}", "spiffe://x/{unit", "spiffe://x/unit}", "spiffe://x/{}"] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trust_domains_and_audiences() {
        assert!(check_trust_domain("grantline.dev").is_ok());
        for bad in ["", "Example.org", "spiffe://example.org", "a b", "ex/ample"] {
            assert!(check_trust_domain(bad).is_err(), "{bad:?}");
        }
        assert!(check_audience("https://sts.amazonaws.com").is_ok());
        for bad in ["", "a b", "a\nb", &"a".repeat(257)] {
            assert!(check_audience(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn jwt_key_signs_what_its_jwk_verifies_and_is_kept_0600() {
        let dir = tempfile::tempdir().unwrap();
        let key = JwtKey::load_or_create(dir.path()).unwrap();
        let again = JwtKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.kid(), again.kid(), "the key is kept");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(JwtKey::FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let aud = vec!["https://a.example".to_owned()];
        let now = grantline_proto::clock::unix(std::time::SystemTime::now());
        let token = key.sign("spiffe://example.org/w", &aud, now, Duration::from_secs(60), "j1", "").unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.jwk("sig")).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&aud);
        let decoded =
            jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &v).unwrap();
        assert_eq!(decoded.claims["sub"], "spiffe://example.org/w");
        assert_eq!(decoded.header.kid.as_deref(), Some(key.kid()));
        v.set_audience(&["https://b.example"]);
        assert!(jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &v).is_err());
        let doc: Value = serde_json::from_str(&discovery_document("https://oidc.example.org/")).unwrap();
        assert_eq!(doc["jwks_uri"], "https://oidc.example.org/keys");
        assert_eq!(doc["issuer"], "https://oidc.example.org");
    }
}
