//! The RFC 6962 / RFC 9162 Merkle tree over the log's entries: subtree hashes
//! from stored nodes, inclusion and consistency proofs, and their
//! verification. Pure: storage is behind [`HashSource`].
//!
//! Nodes are named by `(level, index)`: level 0 holds the leaf hashes, and the
//! node `(l, i)` is the hash of the complete subtree over leaves
//! `[i * 2^l, (i + 1) * 2^l)`. Only complete subtrees are stored; every other
//! hash is computed from them in O(log n) lookups.

use sha2::{Digest, Sha256};

use super::entry::Hash;

/// RFC 6962 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The hash of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Where complete-subtree hashes come from.
pub trait HashSource {
    type Error;
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error>;
}

/// The largest power of two strictly less than `n` (n >= 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[start..end]) where `start` is a multiple of the largest power of two
/// not exceeding `end - start` — true of every subtree the RFC's proofs visit.
pub fn subtree_hash<S: HashSource>(src: &S, start: u64, end: u64) -> Result<Hash, S::Error> {
    let n = end - start;
    if n == 0 {
        return Ok(empty_root());
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        // At most 63: fits.
        #[allow(clippy::cast_possible_truncation)]
        let level = n.trailing_zeros() as u8;
        return src.node(level, start >> level);
    }
    let k = split(n);
    let left = subtree_hash(src, start, start + k)?;
    let right = subtree_hash(src, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// The root of the tree of the first `size` leaves.
pub fn root<S: HashSource>(src: &S, size: u64) -> Result<Hash, S::Error> {
    subtree_hash(src, 0, size)
}

/// RFC 9162 §2.1.3.1: the inclusion proof of leaf `index` in the tree of `size`.
pub fn inclusion_proof<S: HashSource>(src: &S, index: u64, size: u64) -> Result<Vec<Hash>, S::Error> {
    assert!(index < size, "inclusion proof of leaf {index} in a tree of {size}");
    let mut proof = Vec::new();
    path(src, index, 0, size, &mut proof)?;
    Ok(proof)
}

fn path<S: HashSource>(src: &S, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) -> Result<(), S::Error> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path(src, m, start, start + k, out)?;
        out.push(subtree_hash(src, start + k, end)?);
    } else {
        path(src, m - k, start + k, end, out)?;
        out.push(subtree_hash(src, start, start + k)?);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.1: the consistency proof between the trees of `old` and
/// `new` leaves (0 < old <= new).
pub fn consistency_proof<S: HashSource>(src: &S, old: u64, new: u64) -> Result<Vec<Hash>, S::Error> {
    assert!(0 < old && old <= new, "consistency proof from {old} to {new}");
    let mut proof = Vec::new();
    subproof(src, old, 0, new, true, &mut proof)?;
    Ok(proof)
}

fn subproof<S: HashSource>(
    src: &S,
    m: u64,
    start: u64,
    end: u64,
    whole: bool,
    out: &mut Vec<Hash>,
) -> Result<(), S::Error> {
    let n = end - start;
    if m == n {
        if !whole {
            out.push(subtree_hash(src, start, end)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(src, m, start, start + k, whole, out)?;
        out.push(subtree_hash(src, start + k, end)?);
    } else {
        subproof(src, m - k, start + k, end, false, out)?;
        out.push(subtree_hash(src, start, start + k)?);
    }
    Ok(())
}

/// RFC 9162 §2.1.3.2: does `proof` show leaf `index` with `leaf` hash in the
/// tree of `size` with `root`?
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: does `proof` show the tree of `old` leaves with
/// `old_root` is a prefix of the tree of `new` leaves with `new_root`?
pub fn verify_consistency(old: u64, new: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if old == 0 || old > new {
        return false;
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    let mut proof: Vec<Hash> = proof.to_vec();
    if old.is_power_of_two() {
        proof.insert(0, *old_root);
    }
    let Some((first, rest)) = proof.split_first() else { return false };
    let (mut f_n, mut s_n) = (old - 1, new - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (*first, *first);
    for c in rest {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    f_r == *old_root && s_r == *new_root && s_n == 0
}

/// The right edge of a growing tree: the hashes of its maximal complete
/// subtrees, left to right. Appending a leaf returns every complete node it
/// finishes, so a writer can store them; the root is computed from the edge
/// alone, with no lookups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (level, hash) of the complete subtrees, largest first.
    edge: Vec<(u8, Hash)>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Rebuilds the frontier of a tree of `size` leaves from stored nodes.
    pub fn load<S: HashSource>(src: &S, size: u64) -> Result<Self, S::Error> {
        let mut edge = Vec::new();
        let mut start = 0;
        for level in (0..64u8).rev() {
            if size & (1 << level) != 0 {
                edge.push((level, src.node(level, start >> level)?));
                start += 1 << level;
            }
        }
        Ok(Self { size, edge })
    }

    /// Adds a leaf; returns the complete nodes `(level, index, hash)` it
    /// creates, the leaf first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(u8, u64, Hash)> {
        let index = self.size;
        let mut created = vec![(0, index, leaf)];
        let mut hash = leaf;
        let mut level = 0u8;
        while let Some(&(l, left)) = self.edge.last() {
            if l != level {
                break;
            }
            self.edge.pop();
            hash = node_hash(&left, &hash);
            level += 1;
            created.push((level, index >> level, hash));
        }
        self.edge.push((level, hash));
        self.size += 1;
        created
    }

    pub fn root(&self) -> Hash {
        let mut it = self.edge.iter().rev();
        let Some(&(_, mut acc)) = it.next() else { return empty_root() };
        for (_, h) in it {
            acc = node_hash(h, &acc);
        }
        acc
    }
}

/// Complete-subtree hashes in memory: for tests, the verifier, and tiles.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
    frontier: Frontier,
}

impl MemoryTree {
    pub fn push(&mut self, leaf: Hash) {
        for (level, index, hash) in self.frontier.push(leaf) {
            let level = usize::from(level);
            if self.levels.len() <= level {
                self.levels.push(Vec::new());
            }
            debug_assert_eq!(self.levels[level].len() as u64, index);
            self.levels[level].push(hash);
        }
    }

    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    pub fn root(&self) -> Hash {
        self.frontier.root()
    }

    /// The stored nodes of one level.
    pub fn level(&self, level: u8) -> &[Hash] {
        self.levels.get(usize::from(level)).map_or(&[], Vec::as_slice)
    }
}

/// A node that is not (yet) in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the tree has no node at level {0}, index {1}")]
pub struct MissingNode(pub u8, pub u64);

impl HashSource for MemoryTree {
    type Error = MissingNode;
    fn node(&self, level: u8, index: u64) -> Result<Hash, MissingNode> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.levels.get(usize::from(level))?.get(i))
            .copied()
            .ok_or(MissingNode(level, index))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::audit::entry::leaf_hash;

    /// MTH straight from RFC 6962 §2.1, over all leaves: the reference.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn tree(n: u64) -> (MemoryTree, Vec<Hash>) {
        let mut t = MemoryTree::default();
        let mut leaves = Vec::new();
        for i in 0..n {
            let l = leaf_hash(format!("entry {i}").as_bytes());
            leaves.push(l);
            t.push(l);
        }
        (t, leaves)
    }

    #[test]
    fn roots_match_the_rfc_definition() {
        let (t, leaves) = tree(130);
        for n in 0..=130u64 {
            let expect = mth(&leaves[..n as usize]);
            assert_eq!(root(&t, n).unwrap(), expect, "size {n}");
        }
        assert_eq!(t.root(), mth(&leaves));
        // RFC 6962 test vector: the empty tree.
        assert_eq!(hex::encode(empty_root()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn every_inclusion_proof_verifies_and_tampering_fails() {
        let (t, leaves) = tree(71);
        for n in 1..=70u64 {
            let r = root(&t, n).unwrap();
            for i in 0..n {
                let p = inclusion_proof(&t, i, n).unwrap();
                assert!(verify_inclusion(&leaves[i as usize], i, n, &p, &r), "leaf {i} of {n}");
                let other_root = root(&t, n + 1).unwrap();
                assert!(
                    !verify_inclusion(&leaves[i as usize], i, n, &p, &other_root),
                    "leaf {i} of {n} under the root of {}",
                    n + 1
                );
                if n > 1 {
                    let other = (i + 1) % n;
                    assert!(!verify_inclusion(&leaves[i as usize], other, n, &p, &r), "leaf {i} proved at {other}");
                    let mut bad = p.clone();
                    bad[0][0] ^= 1;
                    assert!(!verify_inclusion(&leaves[i as usize], i, n, &bad, &r));
                }
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_forks_fail() {
        let (t, _) = tree(70);
        let (fork, _) = {
            let mut f = MemoryTree::default();
            let mut leaves = Vec::new();
            for i in 0..70u64 {
                let l = leaf_hash(format!("{} {i}", if i == 20 { "forked" } else { "entry" }).as_bytes());
                leaves.push(l);
                f.push(l);
            }
            (f, leaves)
        };
        for m in 1..=70u64 {
            for n in m..=70u64 {
                let p = consistency_proof(&t, m, n).unwrap();
                let (rm, rn) = (root(&t, m).unwrap(), root(&t, n).unwrap());
                assert!(verify_consistency(m, n, &rm, &rn, &p), "{m} -> {n}");
                if m > 20 || n > 20 {
                    let forked_new = root(&fork, n).unwrap();
                    if forked_new != rn {
                        assert!(!verify_consistency(m, n, &rm, &forked_new, &p), "fork accepted {m} -> {n}");
                    }
                }
                if m < n {
                    assert!(!verify_consistency(m, n, &rn, &rn, &p));
                }
            }
        }
    }

    #[test]
    fn frontier_reload_matches() {
        let (t, _) = tree(1000);
        for n in [0u64, 1, 2, 3, 255, 256, 257, 999, 1000] {
            let f = Frontier::load(&t, n).unwrap();
            assert_eq!(f.root(), root(&t, n).unwrap(), "size {n}");
        }
    }

    /// Property test: random appends, random pairs of sizes.
    #[test]
    fn random_sizes_always_prove() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(6962);
        let (t, leaves) = tree(5000);
        for _ in 0..2000 {
            let n = rng.gen_range(1..=5000u64);
            let m = rng.gen_range(1..=n);
            let i = rng.gen_range(0..n);
            let (rm, rn) = (root(&t, m).unwrap(), root(&t, n).unwrap());
            assert!(verify_consistency(m, n, &rm, &rn, &consistency_proof(&t, m, n).unwrap()));
            assert!(verify_inclusion(&leaves[i as usize], i, n, &inclusion_proof(&t, i, n).unwrap(), &rn));
        }
    }
}
