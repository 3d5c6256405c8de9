// Shared by the targets: a fixed verifier key, so that notes and logs signed
// in the seed corpus open (the seeds were made with the matching private key).
#![allow(dead_code)]

use grantline_proto::audit::{SignerKey, VerifierKey};

/// The seed corpus's signing key (not a secret: fuzzing only).
pub const SEED_KEY: &str = "PRIVATE+KEY+fuzz.grantline/log+078d474f+AfuMv/pyepEoJnKuauh9AHK7JDV2OjtnYTQJXRzleRoh";

pub fn signer() -> SignerKey {
    SignerKey::parse(SEED_KEY).expect("the fuzzing seed key parses")
}

pub fn verifier() -> VerifierKey {
    signer().verifier().clone()
}
