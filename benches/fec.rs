//! FEC throughput: encode and rebuild, ours against the raw codec.
//!
//! For each shard size (1100, 1200) and code (4+1, 10+2, 10+4, 20+5, 32+8),
//! with `Throughput::Bytes(k × shard)` so criterion reports MB/s of block data:
//!
//! - `encode`: `Encoder::encode` of one `k × shard` block: one buffer, headers,
//!   copy in, parity, `Bytes` views.
//! - `encode_raw`: `ReedSolomon::encode_sep` alone over preallocated shards.
//! - `rebuild`: the first `m` data shards lost (the most a group can lose);
//!   the other `k` shards go through `Decoder::insert` and the block comes out
//!   of `poll_outcome`. The loss pattern repeats, so the codec's decode-matrix
//!   cache hits, as it does when a viewer's losses repeat.
//! - `rebuild_raw`: `ReedSolomon::reconstruct_data` alone for the same loss.
//! - `rebuild_new_pattern` (10+4 only): like `rebuild`, but every block loses a
//!   different set of 4 of its 14 shards, so the decode matrix is mostly
//!   inverted afresh.
//!
//! `cargo bench --bench fec` runs everything in about two minutes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quicast::fec::{BlockResult, Decoder, DecoderConfig, EncodedBlock, Encoder, FecConfig};
use quicast::wire::{Flags, ShardHeader};
use reed_solomon_erasure::galois_8::ReedSolomon;

const SHARD_SIZES: [usize; 2] = [1100, 1200];
const CODES: [(usize, usize); 5] = [(4, 1), (10, 2), (10, 4), (20, 5), (32, 8)];

fn config(shard: usize, k: usize, m: usize) -> FecConfig {
    let mut c = FecConfig::default();
    c.set_shard_size(shard)
        .and_then(|c| c.set_max_data_shards(k))
        .and_then(|c| c.set_redundancy(m as f64 / k as f64))
        .expect("valid bench config");
    assert_eq!(c.parity_shards(k), m);
    c
}

fn block(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn encode_one(shard: usize, k: usize, m: usize) -> (Vec<u8>, EncodedBlock) {
    let data = block(k * shard);
    let out = Encoder::new(1, config(shard, k, m))
        .encode(0, 0, Flags::empty(), &data)
        .expect("block fits");
    assert_eq!(out.groups().len(), 1);
    (data, out)
}

fn parsed(out: &EncodedBlock) -> Vec<(ShardHeader, Bytes)> {
    out.datagrams()
        .iter()
        .map(|d| ShardHeader::decode_datagram(d).expect("valid datagram"))
        .collect()
}

fn bench(c: &mut Criterion) {
    for shard in SHARD_SIZES {
        let mut g = c.benchmark_group(format!("fec/{shard}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for (k, m) in CODES {
            let id = format!("{k}+{m}");
            g.throughput(Throughput::Bytes((k * shard) as u64));

            let data = block(k * shard);
            let mut enc = Encoder::new(1, config(shard, k, m));
            let mut seq = 0u64;
            g.bench_function(BenchmarkId::new("encode", &id), |b| {
                b.iter(|| {
                    seq += 1;
                    black_box(enc.encode(seq, 0, Flags::empty(), black_box(&data)))
                })
            });

            let rs = ReedSolomon::new(k, m).expect("valid code");
            let mut flat = vec![0u8; (k + m) * shard];
            flat[..k * shard].copy_from_slice(&data);
            g.bench_function(BenchmarkId::new("encode_raw", &id), |b| {
                b.iter(|| {
                    let (d, p) = flat.split_at_mut(k * shard);
                    let d: Vec<&[u8]> = d.chunks_exact(shard).collect();
                    let mut p: Vec<&mut [u8]> = p.chunks_exact_mut(shard).collect();
                    rs.encode_sep(&d, &mut p).expect("shard sizes match");
                })
            });

            let (original, out) = encode_one(shard, k, m);
            let survivors: Vec<(ShardHeader, Bytes)> = parsed(&out).split_off(m);
            let mut dec = Decoder::new(DecoderConfig::default());
            let deadline = Instant::now() + Duration::from_secs(3600);
            let mut seq = 0u64;
            g.bench_function(BenchmarkId::new("rebuild", &id), |b| {
                b.iter(|| {
                    for (h, p) in &survivors {
                        let h = ShardHeader { seq, ..*h };
                        dec.insert(&h, p.clone(), deadline);
                    }
                    seq += 1;
                    match dec.poll_outcome().map(|o| o.result) {
                        Some(BlockResult::Recovered { data, rebuilt }) if rebuilt == m => {
                            black_box(data)
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                })
            });
            // Check once, outside the timing, that the rebuild is exact.
            for (h, p) in &survivors {
                let h = ShardHeader { seq, ..*h };
                dec.insert(&h, p.clone(), deadline);
            }
            match dec.poll_outcome().map(|o| o.result) {
                Some(BlockResult::Recovered { data, .. }) => assert!(data[..] == original[..]),
                other => panic!("unexpected {other:?}"),
            }

            // The codec reads the shards it has through `&mut`; reset the lost
            // ones' flags each time (their bytes are simply overwritten).
            let mut flat: Vec<u8> = parsed(&out).iter().flat_map(|(_, p)| p.to_vec()).collect();
            g.bench_function(BenchmarkId::new("rebuild_raw", &id), |b| {
                b.iter(|| {
                    let mut shards: Vec<(&mut [u8], bool)> = flat
                        .chunks_exact_mut(shard)
                        .enumerate()
                        .map(|(i, s)| (s, i >= m))
                        .collect();
                    rs.reconstruct_data(&mut shards).expect("enough shards");
                })
            });

            if (k, m) == (10, 4) {
                let all = parsed(&out);
                let patterns = loss_patterns(k + m, m);
                let mut dec = Decoder::new(DecoderConfig::default());
                let mut seq = 0u64;
                g.bench_function(BenchmarkId::new("rebuild_new_pattern", &id), |b| {
                    b.iter(|| {
                        let lost = patterns[seq as usize % patterns.len()];
                        for (i, (h, p)) in all.iter().enumerate() {
                            if lost & (1 << i) == 0 {
                                let h = ShardHeader { seq, ..*h };
                                dec.insert(&h, p.clone(), deadline);
                            }
                        }
                        seq += 1;
                        black_box(dec.poll_outcome().expect("finished"))
                    })
                });
            }
        }
        g.finish();
    }
}

/// Every set of `lose` out of `n` shard indices, as bit masks, in an order
/// that changes pattern every block (more patterns than the codec caches).
fn loss_patterns(n: usize, lose: usize) -> Vec<u32> {
    (0u32..1 << n)
        .filter(|p| p.count_ones() as usize == lose)
        .collect()
}

criterion_group!(benches, bench);
criterion_main!(benches);
