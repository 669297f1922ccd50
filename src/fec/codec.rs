//! A small least-recently-used cache of Reed-Solomon codecs, one per `(k, m)`.
//!
//! Building a [`ReedSolomon`] inverts a `k × k` matrix (microseconds for
//! small `k`, milliseconds near 255), and each instance keeps its own LRU of
//! inverted decode matrices keyed by the loss pattern. Reusing the instance
//! across blocks keeps both: a stream whose losses repeat (one parity shard
//! short, the same viewer parity budget) never inverts a matrix twice.
//!
//! The cache is bounded because a peer chooses `k` and `m`: at most
//! [`MAX_CODECS`] entries and at most [`MAX_WEIGHT`] bytes of worst-case
//! memory, where an instance's worst case is its full decode-matrix cache.

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::wire::MAX_SHARDS;

/// Most codecs kept; a live stream uses one or two `(k, m)` pairs at a time.
pub(crate) const MAX_CODECS: usize = 64;

/// Most worst-case bytes the kept codecs may grow to (64 MiB).
pub(crate) const MAX_WEIGHT: usize = 64 << 20;

/// Decode matrices one `ReedSolomon` instance caches (the crate's
/// `DATA_DECODE_MATRIX_CACHE_CAPACITY`).
const DECODE_MATRICES_PER_CODEC: usize = 254;

/// Worst-case bytes a codec for `(k, m)` can hold: its encoding matrix plus a
/// full decode-matrix cache (each matrix is at least a 1 KiB inline buffer,
/// `k × k` bytes when larger, plus a key of up to `m` indices).
fn weight(k: usize, m: usize) -> usize {
    let matrix = (k * k).max(1024) + 64;
    (k + m) * k + DECODE_MATRICES_PER_CODEC * (matrix + m * size_of::<usize>())
}

struct Entry {
    k: usize,
    m: usize,
    weight: usize,
    // Boxed so move-to-front shifts pointers, not whole codecs.
    codec: Box<ReedSolomon>,
}

/// Codecs by `(k, m)`, most recently used first.
pub(crate) struct CodecCache {
    entries: Vec<Entry>,
    weight: usize,
    max_codecs: usize,
    max_weight: usize,
}

impl Default for CodecCache {
    fn default() -> Self {
        Self::with_limits(MAX_CODECS, MAX_WEIGHT)
    }
}

impl std::fmt::Debug for CodecCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodecCache")
            .field("entries", &self.entries.len())
            .field("weight", &self.weight)
            .finish()
    }
}

impl CodecCache {
    fn with_limits(max_codecs: usize, max_weight: usize) -> Self {
        Self {
            entries: Vec::new(),
            weight: 0,
            max_codecs,
            max_weight,
        }
    }

    /// The codec for `k` data and `m` parity shards, built on first use.
    ///
    /// `None` when no such code exists (`k` or `m` zero, or `k + m > 256`).
    pub(crate) fn get(&mut self, k: usize, m: usize) -> Option<&ReedSolomon> {
        if k == 0 || m == 0 || k + m > MAX_SHARDS {
            return None;
        }
        match self.entries.iter().position(|e| e.k == k && e.m == m) {
            // The common case: the same code as last time; nothing to move.
            Some(0) => {}
            Some(i) => self.entries[..=i].rotate_right(1),
            None => {
                let codec = Box::new(ReedSolomon::new(k, m).ok()?);
                let weight = weight(k, m);
                self.weight += weight;
                self.entries.insert(
                    0,
                    Entry {
                        k,
                        m,
                        weight,
                        codec,
                    },
                );
                // Evict from the cold end, always keeping the one just built.
                while self.entries.len() > 1
                    && (self.entries.len() > self.max_codecs || self.weight > self.max_weight)
                {
                    if let Some(old) = self.entries.pop() {
                        self.weight -= old.weight;
                        tracing::trace!(k = old.k, m = old.m, "evicted codec");
                    }
                }
            }
        }
        self.entries.first().map(|e| &*e.codec)
    }

    /// Codecs currently kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the codec for `(k, m)` is kept.
    #[cfg(test)]
    pub(crate) fn contains(&self, k: usize, m: usize) -> bool {
        self.entries.iter().any(|e| e.k == k && e.m == m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_moves_to_front() {
        let mut cache = CodecCache::default();
        let a = cache.get(10, 4).map(|c| c as *const ReedSolomon);
        cache.get(4, 1).unwrap();
        let again = cache.get(10, 4).map(|c| c as *const ReedSolomon);
        assert_eq!(
            a, again,
            "same instance, so its decode-matrix cache survives"
        );
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn rejects_impossible_codes() {
        let mut cache = CodecCache::default();
        assert!(cache.get(0, 1).is_none());
        assert!(cache.get(1, 0).is_none());
        assert!(cache.get(10, 247).is_none());
        assert!(cache.get(10, 246).is_some());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn bounded_by_count_lru() {
        let mut cache = CodecCache::default();
        for m in 2..=MAX_CODECS + 10 {
            cache.get(3, m).unwrap();
            // Touch (3, 1) every time: it stays hot and must survive.
            cache.get(3, 1).unwrap();
        }
        assert_eq!(cache.len(), MAX_CODECS);
        assert!(cache.contains(3, 1));
        assert!(cache.contains(3, MAX_CODECS + 10));
        assert!(!cache.contains(3, 2), "coldest entries evicted");
    }

    #[test]
    fn bounded_by_weight() {
        // Room for three (20, m) codecs by worst-case weight.
        let mut cache = CodecCache::with_limits(MAX_CODECS, 3 * weight(20, 10) + 1);
        for m in 1..=10 {
            cache.get(20, m).unwrap();
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.weight <= cache.max_weight);
        assert!(cache.contains(20, 10) && !cache.contains(20, 7));
        // One codec heavier than the whole budget is still kept alone.
        let mut cache = CodecCache::with_limits(MAX_CODECS, 1);
        cache.get(20, 1).unwrap();
        cache.get(20, 2).unwrap();
        assert_eq!(cache.len(), 1);
        // The defaults keep about seven codecs with k near 180.
        assert_eq!(MAX_WEIGHT / weight(180, 76), 7);
    }
}
