//! Which public keys the broker certifies: the ones OpenSSH and the Web PKI
//! still accept for new keys. Checked before policy, for every CSR (node
//! identities and X.509 leaves) and every SSH public key.
//!
//! | kind | accepted |
//! |---|---|
//! | X.509 (CSR) | Ed25519; ECDSA P-256, P-384, P-521; RSA 2048–8192 bits |
//! | SSH | Ed25519, ECDSA P-256/P-384/P-521 (also FIDO `sk-` keys); RSA 2048–8192 bits |
//!
//! DSA, RSA under 2048 bits (OpenSSH refuses them for new keys), RSA over
//! 8192 bits (slow to verify, no security gain) and anything else are refused.

use x509_parser::oid_registry as oid;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

pub const MIN_RSA_BITS: usize = 2048;
pub const MAX_RSA_BITS: usize = 8192;

/// The number of significant bits of a big-endian unsigned integer.
fn bits(be: &[u8]) -> usize {
    let be = match be.iter().position(|b| *b != 0) {
        Some(i) => &be[i..],
        None => return 0,
    };
    (be.len() - 1) * 8 + (8 - be[0].leading_zeros() as usize)
}

fn rsa_ok(bits: usize, what: &str) -> Result<(), String> {
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "the {what} is a {bits}-bit RSA key; use Ed25519, ECDSA or RSA of at least {MIN_RSA_BITS} bits"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!("the {what} is a {bits}-bit RSA key; at most {MAX_RSA_BITS} bits are certified"));
    }
    Ok(())
}

/// Checks the key of a CSR.
pub fn check_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), String> {
    let alg = &spki.algorithm.algorithm;
    if *alg == oid::OID_SIG_ED25519 {
        return Ok(());
    }
    if *alg == oid::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == oid::OID_EC_P256 || c == oid::OID_NIST_EC_P384 || c == oid::OID_NIST_EC_P521 => Ok(()),
            _ => Err("the CSR's ECDSA key is not on P-256, P-384 or P-521".into()),
        };
    }
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) if *alg == oid::OID_PKCS1_RSAENCRYPTION => rsa_ok(bits(rsa.modulus), "CSR's key"),
        Ok(PublicKey::DSA(_)) => {
            Err("the CSR's key is a DSA key; use Ed25519, ECDSA or RSA (2048 bits or more)".into())
        }
        _ => Err(format!(
            "the CSR's key algorithm {alg} is not certified; use Ed25519, ECDSA or RSA (2048 bits or more)"
        )),
    }
}

/// Checks an SSH public key.
pub fn check_ssh_key(key: &ssh_key::PublicKey) -> Result<(), String> {
    use ssh_key::public::KeyData;
    const ECDSA: &[&str] =
        &["ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "sk-ecdsa-sha2-nistp256@openssh.com"];
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::SkEd25519(_) => Ok(()),
        KeyData::Rsa(rsa) => rsa_ok(bits(rsa.n.as_bytes()), "SSH public key"),
        KeyData::Dsa(_) => Err("the SSH public key is a DSA key, which OpenSSH no longer accepts; use Ed25519".into()),
        other if ECDSA.contains(&other.algorithm().as_str()) => Ok(()),
        other => Err(format!(
            "the SSH public key type {} is not certified; use Ed25519",
            grantline_proto::audit::event::excerpt(other.algorithm().as_str(), 64)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_lengths() {
        assert_eq!(bits(&[]), 0);
        assert_eq!(bits(&[0, 0]), 0);
        assert_eq!(bits(&[1]), 1);
        assert_eq!(bits(&[0, 0x80, 0]), 16);
        assert_eq!(bits(&[0x7f; 256]), 2047);
        assert_eq!(bits(&[0xff; 256]), 2048);
    }

    #[test]
    fn ssh_keys_dsa_and_short_rsa_are_refused() {
        let ed = ssh_key::PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb2X0Yb+6Qf9V3Q2Hn0Bq7Z8yq6zG0cV7tJ0mYbPzqS",
        )
        .unwrap();
        assert!(check_ssh_key(&ed).is_ok());
        let rsa = |n: Vec<u8>| {
            let k = ssh_key::public::RsaPublicKey {
                e: ssh_key::Mpint::from_positive_bytes(&[1, 0, 1]).unwrap(),
                n: ssh_key::Mpint::from_positive_bytes(&n).unwrap(),
            };
            ssh_key::PublicKey::from(ssh_key::public::KeyData::Rsa(k))
        };
        let err = check_ssh_key(&rsa(vec![0xc1; 128])).unwrap_err();
        assert!(err.contains("1024-bit RSA"), "{err}");
        assert!(check_ssh_key(&rsa(vec![0xc1; 256])).is_ok());
        assert!(check_ssh_key(&rsa(vec![0xc1; 2048])).unwrap_err().contains("at most 8192"));
        let dsa = ssh_key::public::DsaPublicKey {
            p: ssh_key::Mpint::from_positive_bytes(&[0xc1; 128]).unwrap(),
            q: ssh_key::Mpint::from_positive_bytes(&[0xc1; 20]).unwrap(),
            g: ssh_key::Mpint::from_positive_bytes(&[2]).unwrap(),
            y: ssh_key::Mpint::from_positive_bytes(&[0xc1; 128]).unwrap(),
        };
        let err = check_ssh_key(&ssh_key::PublicKey::from(ssh_key::public::KeyData::Dsa(dsa))).unwrap_err();
        assert!(err.contains("DSA"), "{err}");
    }
}
