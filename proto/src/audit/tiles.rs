//! The C2SP tlog-tiles layout (c2sp.org/tlog-tiles): where tiles and entry
//! bundles live, what they hold, and how a tree of a given size is cut into
//! them. Pure; the daemon writes them through `object_store`.
//!
//! A tile at level L holds up to 256 hashes of complete subtrees of height 8L:
//! Merkle level 8L in this crate's `(level, index)` naming.

use super::entry::Hash;

pub const TILE_WIDTH: u64 = 256;
/// Tile heights in Merkle levels.
pub const TILE_HEIGHT: u8 = 8;

/// `x001/x234/067` for 1234067: 3-digit groups, all but the last prefixed `x`.
pub fn index_path(index: u64) -> String {
    let digits = index.to_string();
    let pad = (3 - digits.len() % 3) % 3;
    let padded = format!("{}{digits}", "0".repeat(pad));
    let groups: Vec<&str> = padded.as_bytes().chunks(3).map(|c| std::str::from_utf8(c).unwrap_or("000")).collect();
    let last = groups.len() - 1;
    groups
        .iter()
        .enumerate()
        .map(|(i, g)| if i < last { format!("x{g}") } else { (*g).to_owned() })
        .collect::<Vec<_>>()
        .join("/")
}

fn suffix(width: u64) -> String {
    if width == TILE_WIDTH {
        String::new()
    } else {
        format!(".p/{width}")
    }
}

/// `tile/<L>/<N>[.p/<W>]`.
pub fn tile_path(level: u8, index: u64, width: u64) -> String {
    format!("tile/{level}/{}{}", index_path(index), suffix(width))
}

/// `tile/entries/<N>[.p/<W>]`.
pub fn bundle_path(index: u64, width: u64) -> String {
    format!("tile/entries/{}{}", index_path(index), suffix(width))
}

/// A tile (or bundle) of a tree: level, index, width (256 for a full one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileRef {
    pub level: u8,
    pub index: u64,
    pub width: u64,
}

/// The tiles at `level` that a tree of `size` leaves has and a tree of `old`
/// leaves did not (full ones that became full, and the new partial one).
pub fn new_tiles(level: u8, old: u64, size: u64) -> Vec<TileRef> {
    let span = |s: u64| s.checked_shr(u32::from(level) * 8).unwrap_or(0);
    let (old_n, new_n) = (span(old), span(size));
    let mut out = Vec::new();
    let first_incomplete_old = old_n / TILE_WIDTH;
    for index in first_incomplete_old..new_n / TILE_WIDTH {
        out.push(TileRef { level, index, width: TILE_WIDTH });
    }
    let width = new_n % TILE_WIDTH;
    if width > 0 && new_n != old_n {
        out.push(TileRef { level, index: new_n / TILE_WIDTH, width });
    }
    out
}

/// The tile levels a tree of `size` leaves has.
pub fn levels(size: u64) -> u8 {
    let mut l = 0u8;
    while l < 8 && size.checked_shr(u32::from(l) * 8).unwrap_or(0) > 0 {
        l += 1;
    }
    l
}

/// Concatenated hashes, as a tile is served.
pub fn tile_bytes(hashes: &[Hash]) -> Vec<u8> {
    hashes.iter().flatten().copied().collect()
}

/// An entry bundle: each entry prefixed by its length as big-endian u16.
pub fn bundle_bytes<E: AsRef<[u8]>>(entries: &[E]) -> Result<Vec<u8>, TileError> {
    let mut out = Vec::new();
    for e in entries {
        let e = e.as_ref();
        let len = u16::try_from(e.len()).map_err(|_| TileError::EntryTooLong(e.len()))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TileError {
    #[error("an entry of {0} bytes does not fit an entry bundle (at most 65535)")]
    EntryTooLong(usize),
    #[error("entry bundle is truncated")]
    Truncated,
    #[error("tile is {0} bytes, not a multiple of 32")]
    Ragged(usize),
}

/// Splits an entry bundle into its entries.
pub fn parse_bundle(bytes: &[u8]) -> Result<Vec<&[u8]>, TileError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 2 {
            return Err(TileError::Truncated);
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if rest.len() < 2 + len {
            return Err(TileError::Truncated);
        }
        out.push(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    Ok(out)
}

/// Splits a tile into its hashes.
pub fn parse_tile(bytes: &[u8]) -> Result<Vec<Hash>, TileError> {
    if !bytes.len().is_multiple_of(32) {
        return Err(TileError::Ragged(bytes.len()));
    }
    Ok(bytes.chunks(32).map(|c| c.try_into().unwrap_or([0; 32])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_spec() {
        assert_eq!(index_path(1_234_067), "x001/x234/067");
        assert_eq!(index_path(0), "000");
        assert_eq!(index_path(999), "999");
        assert_eq!(index_path(1000), "x001/000");
        assert_eq!(tile_path(0, 1_234_067, 256), "tile/0/x001/x234/067");
        assert_eq!(tile_path(1, 3, 17), "tile/1/003.p/17");
        assert_eq!(bundle_path(5, 256), "tile/entries/005");
    }

    /// The spec's example: a tree of 70,000 leaves.
    #[test]
    fn tiles_of_a_tree_match_the_spec_example() {
        let l0 = new_tiles(0, 0, 70_000);
        assert_eq!(l0.iter().filter(|t| t.width == 256).count(), 273);
        assert_eq!(l0.last(), Some(&TileRef { level: 0, index: 273, width: 112 }));
        assert_eq!(
            new_tiles(1, 0, 70_000),
            vec![TileRef { level: 1, index: 0, width: 256 }, TileRef { level: 1, index: 1, width: 17 }]
        );
        assert_eq!(new_tiles(2, 0, 70_000), vec![TileRef { level: 2, index: 0, width: 1 }]);
        assert_eq!(levels(70_000), 3);
        assert_eq!(new_tiles(1, 0, 256), vec![TileRef { level: 1, index: 0, width: 1 }]);
        // Growing from 300 to 600 adds the full tile 1 and partial tile 2.
        assert_eq!(
            new_tiles(0, 300, 600),
            vec![TileRef { level: 0, index: 1, width: 256 }, TileRef { level: 0, index: 2, width: 88 }]
        );
        assert!(new_tiles(1, 300, 400).is_empty(), "no new level-1 hash between 300 and 400");
    }

    #[test]
    fn bundles_round_trip() {
        let entries = [b"a".to_vec(), vec![], vec![7; 300]];
        let b = bundle_bytes(&entries).unwrap();
        assert_eq!(parse_bundle(&b).unwrap(), entries.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert!(parse_bundle(&b[..b.len() - 1]).is_err());
        assert!(bundle_bytes(&[vec![0; 70_000]]).is_err());
        assert!(parse_tile(&[0; 33]).is_err());
    }
}
