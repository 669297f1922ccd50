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
    use rand::{rngs::SmallRng, Rng, SeedableRng};

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

    /// The code exactly as PROTOCOL.md ("The Reed-Solomon code") specifies it,
    /// written from that text and nothing else, so that the document and the
    /// crate the codec comes from cannot drift apart unnoticed.
    mod spec {
        /// `exp[i] = 2^i` and `log[2^i] = i` in GF(2^8) modulo x^8+x^4+x^3+x^2+1.
        fn tables() -> &'static ([u8; 255], [u8; 256]) {
            static TABLES: std::sync::OnceLock<([u8; 255], [u8; 256])> = std::sync::OnceLock::new();
            TABLES.get_or_init(build_tables)
        }

        fn build_tables() -> ([u8; 255], [u8; 256]) {
            let (mut exp, mut log) = ([0u8; 255], [0u8; 256]);
            let mut x: u16 = 1;
            for (i, e) in exp.iter_mut().enumerate() {
                *e = x as u8;
                log[x as usize] = i as u8;
                x <<= 1;
                if x & 0x100 != 0 {
                    x ^= 0x11d;
                }
            }
            (exp, log)
        }

        fn mul(a: u8, b: u8) -> u8 {
            if a == 0 || b == 0 {
                return 0;
            }
            let (exp, log) = tables();
            exp[(usize::from(log[a as usize]) + usize::from(log[b as usize])) % 255]
        }

        /// `a^n`, with `0^0 = 1`.
        fn pow(a: u8, n: usize) -> u8 {
            match (a, n) {
                (_, 0) => 1,
                (0, _) => 0,
                _ => {
                    let (exp, log) = tables();
                    exp[usize::from(log[a as usize]) * n % 255]
                }
            }
        }

        fn inverse(a: u8) -> u8 {
            (1..=255).find(|&b| mul(a, b) == 1).expect("a != 0")
        }

        /// Gauss-Jordan inversion of a square matrix over the field.
        fn invert(mut a: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
            let n = a.len();
            let mut inv: Vec<Vec<u8>> = (0..n)
                .map(|r| (0..n).map(|c| u8::from(r == c)).collect())
                .collect();
            for col in 0..n {
                let pivot = (col..n).find(|&r| a[r][col] != 0).expect("invertible");
                a.swap(col, pivot);
                inv.swap(col, pivot);
                let f = inverse(a[col][col]);
                for c in 0..n {
                    a[col][c] = mul(a[col][c], f);
                    inv[col][c] = mul(inv[col][c], f);
                }
                for r in 0..n {
                    let f = a[r][col];
                    if r == col || f == 0 {
                        continue;
                    }
                    for c in 0..n {
                        a[r][c] ^= mul(f, a[col][c]);
                        inv[r][c] ^= mul(f, inv[col][c]);
                    }
                }
            }
            inv
        }

        /// Parity row `i` (0-based) for `k` data shards: row `k + i` of
        /// `V · T⁻¹`, `V[r][c] = r^c`, `T` the top `k × k` of `V`.
        pub(super) fn parity_rows(k: usize, m: usize) -> Vec<Vec<u8>> {
            let v = |r: usize| -> Vec<u8> { (0..k).map(|c| pow(r as u8, c)).collect() };
            let top = invert((0..k).map(v).collect());
            (k..k + m)
                .map(|r| {
                    let row = v(r);
                    (0..k)
                        .map(|c| (0..k).fold(0, |acc, j| acc ^ mul(row[j], top[j][c])))
                        .collect()
                })
                .collect()
        }

        /// Whether `rows` are the parity rows for `k` data shards, checked
        /// without inverting anything: `P = V_p · T⁻¹` exactly when
        /// `P · T = V_p`, `V_p` the Vandermonde rows `k..k + m`.
        pub(super) fn are_parity_rows(k: usize, rows: &[Vec<u8>]) -> bool {
            rows.iter().enumerate().all(|(i, row)| {
                (0..k).all(|c| {
                    let product = (0..k).fold(0, |acc, j| acc ^ mul(row[j], pow(j as u8, c)));
                    product == pow((k + i) as u8, c)
                })
            })
        }

        /// Parity shards of `data` (all one length), byte by byte.
        pub(super) fn encode(data: &[&[u8]], m: usize) -> Vec<Vec<u8>> {
            let rows = parity_rows(data.len(), m);
            rows.iter()
                .map(|row| {
                    (0..data[0].len())
                        .map(|b| {
                            row.iter()
                                .zip(data)
                                .fold(0, |acc, (&c, d)| acc ^ mul(c, d[b]))
                        })
                        .collect()
                })
                .collect()
        }
    }

    /// The crate's parity rows for `(k, m)`: data shard `j` is the unit vector
    /// `e_j`, so byte `j` of parity shard `i` is the coefficient of data shard
    /// `j` in parity row `i`.
    fn crate_rows(cache: &mut CodecCache, k: usize, m: usize) -> Vec<Vec<u8>> {
        let data: Vec<Vec<u8>> = (0..k)
            .map(|j| (0..k).map(|b| u8::from(b == j)).collect())
            .collect();
        let mut parity = vec![vec![0u8; k]; m];
        cache
            .get(k, m)
            .unwrap()
            .encode_sep(&data, &mut parity)
            .unwrap();
        parity
    }

    #[test]
    fn parity_rows_are_the_documented_matrix() {
        let mut cache = CodecCache::default();
        // PROTOCOL.md's table.
        assert_eq!(
            crate_rows(&mut cache, 3, 4),
            [[1, 1, 1], [15, 8, 6], [14, 9, 6], [14, 8, 7]]
        );
        assert_eq!(crate_rows(&mut cache, 1, 4), [[1], [1], [1], [1]]);
        assert_eq!(
            crate_rows(&mut cache, 2, 4),
            [[3, 2], [2, 3], [5, 4], [4, 5]]
        );
        let mut cases: Vec<(usize, usize)> = (1..=24).flat_map(|k| [(k, 1), (k, 7)]).collect();
        cases.extend([(32, 16), (64, 64)]);
        for (k, m) in cases {
            assert_eq!(
                crate_rows(&mut cache, k, m),
                spec::parity_rows(k, m),
                "k {k} m {m}"
            );
        }
        // Large codes (a debug-build inversion of 255 × 255 takes seconds).
        for (k, m) in [(128, 128), (255, 1)] {
            assert!(
                spec::are_parity_rows(k, &crate_rows(&mut cache, k, m)),
                "k {k} m {m}"
            );
        }
        assert!(!spec::are_parity_rows(3, &[vec![1, 1, 1], vec![15, 8, 7]]));
        // A parity row depends on k and its index, not on m: a viewer's
        // first parity shards are the same whatever the sender encoded.
        for k in [1, 5, 32] {
            let wide = crate_rows(&mut cache, k, 9);
            for m in 1..9 {
                assert_eq!(crate_rows(&mut cache, k, m), wide[..m], "k {k} m {m}");
            }
        }
    }

    /// The test vector in PROTOCOL.md, through the crate and through the
    /// specification.
    #[test]
    fn documented_test_vector() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let data = [hex("01020304"), hex("10203040"), hex("aabbccdd")];
        let want = [hex("bb99ff99"), hex("54be1ef2")];
        let mut parity = vec![vec![0u8; 4]; 2];
        CodecCache::default()
            .get(3, 2)
            .unwrap()
            .encode_sep(&data, &mut parity)
            .unwrap();
        assert_eq!(parity, want);
        let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        assert_eq!(spec::encode(&slices, 2), want);
    }

    /// Random shards of random codes: the crate (with its SIMD paths) and the
    /// byte-wise specification agree on every byte.
    #[test]
    fn random_shards_match_the_specification() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut cache = CodecCache::default();
        for _ in 0..40 {
            let k = rng.random_range(1..=20);
            let m = rng.random_range(1..=8);
            // Long enough for the vectorised loops and their tails.
            let len = rng.random_range(1..300);
            let data: Vec<Vec<u8>> = (0..k)
                .map(|_| (0..len).map(|_| rng.random()).collect())
                .collect();
            let mut parity = vec![vec![0u8; len]; m];
            cache
                .get(k, m)
                .unwrap()
                .encode_sep(&data, &mut parity)
                .unwrap();
            let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            assert_eq!(
                parity,
                spec::encode(&slices, m),
                "seed {seed}: k {k} m {m} len {len}"
            );
        }
    }
}
