//! The JWT-SVIDs (and refusals) the agent keeps for reuse (RFD 0011): per
//! caller, audiences and ID asked, until their half-life (a refusal for 30 s),
//! bounded in all and per principal.

use std::collections::HashMap;

use grantline_proto::wire;

use crate::local::CallerKey;
use crate::principals::Principal;

/// The most JWT-SVIDs (and refusals) kept for reuse, and kept for one
/// principal (see `crate::principals`).
pub(crate) const MAX_JWTS: usize = 4096;
pub(crate) const MAX_JWTS_PER_PRINCIPAL: usize = 256;

/// A cached JWT-SVID's key: the caller's principal, the caller, its sorted
/// audiences, the ID asked.
pub(crate) type JwtKey = (Principal, CallerKey, Vec<String>, String);

pub(crate) enum CachedJwt {
    Issued {
        spiffe_id: String,
        token: String,
        /// Reused until this time (unix seconds): its half-life.
        reuse_until: i64,
    },
    /// The broker's refusal, repeated without asking until this time: a
    /// refused caller asking again and again costs the broker and its log
    /// one denial per 30 s (`svids::REFUSED_RETRY`).
    Refused { error: wire::Error, until: i64 },
}

impl CachedJwt {
    /// Reused until this time (unix seconds).
    fn until(&self) -> i64 {
        match self {
            Self::Issued { reuse_until, .. } => *reuse_until,
            Self::Refused { until, .. } => *until,
        }
    }

    pub(crate) fn fresh(&self, now: i64) -> bool {
        self.until() > now
    }
}

/// Keeps a JWT-SVID (or a refusal) for reuse. One principal holds at most
/// [`MAX_JWTS_PER_PRINCIPAL`] entries and a full cache makes room by
/// dropping what expires soonest, so no caller can fill it and turn caching
/// off for the others.
pub(crate) fn cache_jwt(jwts: &mut HashMap<JwtKey, CachedJwt>, key: JwtKey, cached: CachedJwt, now: i64) {
    let principal = key.0;
    if jwts.len() >= MAX_JWTS {
        jwts.retain(|_, c| c.fresh(now));
    }
    let soonest = |jwts: &HashMap<JwtKey, CachedJwt>, mine: bool| {
        jwts.iter().filter(|(k, _)| !mine || k.0 == principal).min_by_key(|(_, c)| c.until()).map(|(k, _)| k.clone())
    };
    if jwts.keys().filter(|k| k.0 == principal).count() >= MAX_JWTS_PER_PRINCIPAL {
        if let Some(k) = soonest(jwts, true) {
            jwts.remove(&k);
        }
    }
    if jwts.len() >= MAX_JWTS {
        if let Some(k) = soonest(jwts, false) {
            jwts.remove(&k);
        }
    }
    jwts.insert(key, cached);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second review: one uid minting tokens for new audiences filled the
    /// shared cache, after which nobody's JWT-SVIDs were cached.
    #[test]
    fn one_principal_cannot_fill_the_jwt_cache_for_the_others() {
        let mut jwts = HashMap::new();
        let issued = |until: i64| CachedJwt::Issued { spiffe_id: "s".into(), token: "t".into(), reuse_until: until };
        let jwt_key = |uid: u32, aud: usize| {
            let caller = CallerKey { uid, gid: 0, exe: String::new(), unit: String::new() };
            (Principal::Uid(uid), caller, vec![format!("a{aud}")], String::new())
        };
        for a in 0..MAX_JWTS + 10 {
            cache_jwt(&mut jwts, jwt_key(1000, a), issued(100 + i64::try_from(a).unwrap()), 0);
        }
        assert_eq!(jwts.len(), MAX_JWTS_PER_PRINCIPAL, "one principal holds its share, its oldest going first");
        assert!(jwts.contains_key(&jwt_key(1000, MAX_JWTS + 9)) && !jwts.contains_key(&jwt_key(1000, 0)));
        for uid in 0..20u32 {
            for a in 0..MAX_JWTS_PER_PRINCIPAL {
                cache_jwt(&mut jwts, jwt_key(2000 + uid, a), issued(5000), 0);
            }
        }
        assert!(jwts.len() <= MAX_JWTS);
        cache_jwt(&mut jwts, jwt_key(7, 0), issued(9000), 0);
        assert!(jwts.contains_key(&jwt_key(7, 0)), "a full cache still takes a newcomer's entry");
    }
}
