//! Seeded property tests of the wire decoders and the receiver.
//!
//! Each property lives in its own file under `props/` as a `check(&[u8])`
//! function that the matching fuzz target in `fuzz/` also runs, so `cargo
//! test` on stable covers the same properties as `cargo +nightly fuzz run`.
//! Here the input bytes come from a seeded generator that shapes them to get
//! past the first checks (valid headers and frames, then damaged); the fuzzer
//! finds its own way from coverage.
//!
//! The seed is `QUICAST_SEED` when set, else taken from the clock; it is
//! printed at the start of each test and is in every assertion message.
//! Replay a failure with `QUICAST_SEED=N cargo test --test it props::`.

mod control;
mod header;
mod receiver;

use bytes::Bytes;
use quicast::wire::{
    group_span, ClientEvent, ControlMessage, Encode, Flags, Report, ShardHeader, Summary,
    MAX_VARINT, VERSION,
};
use rand::{rngs::SmallRng, seq::SliceRandom, Rng, RngCore, SeedableRng};

fn seed() -> u64 {
    let seed = std::env::var("QUICAST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    println!("seed {seed} (replay with QUICAST_SEED={seed})");
    seed
}

/// Runs `check` on `cases` inputs from `gen`.
fn run(
    cases: usize,
    mut gen: impl FnMut(&mut SmallRng) -> Vec<u8>,
    check: fn(&[u8]) -> Result<(), String>,
) {
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    for case in 0..cases {
        let input = gen(&mut rng);
        let result = check(&input);
        assert!(
            result.is_ok(),
            "seed {seed}, case {case}: {}\ninput: {input:?}",
            result.unwrap_err()
        );
    }
}

/// A value of random size class, within the varint range.
fn varint(rng: &mut SmallRng) -> u64 {
    (rng.random::<u64>() >> rng.random_range(2..64)).min(MAX_VARINT)
}

/// Flips, overwrites, cuts or extends `v` at random, or leaves it alone.
fn damage(rng: &mut SmallRng, v: &mut Vec<u8>) {
    if v.is_empty() || rng.random_bool(0.4) {
        return;
    }
    let at = rng.random_range(0..v.len());
    match rng.random_range(0..4) {
        0 => v[at] ^= 1 << rng.random_range(0..8),
        1 => v[at] = rng.random(),
        2 => v.truncate(at),
        _ => {
            let extra: [u8; 4] = rng.random();
            let n = rng.random_range(1..=4);
            v.splice(at..at, extra[..n].iter().copied());
        }
    }
}

/// A header whose `k` fits its block length, shard size and group, followed
/// by one shard of payload; then maybe damaged. One in four is random bytes.
fn header_input(rng: &mut SmallRng) -> Vec<u8> {
    if rng.random_bool(0.25) {
        let mut v = vec![0u8; rng.random_range(0..48)];
        rng.fill_bytes(&mut v);
        if let (Some(b), true) = (v.first_mut(), rng.random_bool(0.5)) {
            *b = VERSION;
        }
        return v;
    }
    let groups: u8 = if rng.random_bool(0.7) {
        1
    } else {
        rng.random_range(2..=255)
    };
    let shard = rng.random_range(1..=64usize);
    let total = rng.random_range(usize::from(groups)..=usize::from(groups) * 255);
    let block_len = if total == 1 {
        rng.random_range(0..=shard)
    } else {
        rng.random_range((total - 1) * shard + 1..=total * shard)
    };
    let group = rng.random_range(0..groups);
    let k = group_span(total, groups.into(), group.into()).1;
    let m = rng.random_range(0..=256 - k);
    let flags = [Flags::empty(), Flags::SYNC];
    let h = ShardHeader {
        flags: flags[rng.random_range(0..2)],
        stream_id: rng.random::<u32>() >> rng.random_range(0..32),
        seq: varint(rng),
        timestamp_us: rng.random(),
        k: k as u8,
        m: m as u8,
        index: rng.random_range(0..k + m) as u8,
        block_len: block_len as u32,
        group,
        groups,
    };
    let mut v = Vec::new();
    h.encode(&mut v);
    v.extend((0..shard).map(|_| rng.random::<u8>()));
    damage(rng, &mut v);
    v
}

fn string(rng: &mut SmallRng) -> String {
    let chars = ['a', 'Z', '0', ' ', 'é', '€', '𝄞'];
    (0..rng.random_range(0..300))
        .map(|_| chars[rng.random_range(0..chars.len())])
        .collect()
}

fn message(rng: &mut SmallRng) -> ControlMessage {
    match rng.random_range(0..11) {
        // Another version's Hello decodes to its version alone, so only this
        // one round-trips.
        0 => ControlMessage::Hello {
            version: VERSION,
            stream: string(rng),
            token: Bytes::from(
                (0..rng.random_range(0..600))
                    .map(|_| rng.random::<u8>())
                    .collect::<Vec<_>>(),
            ),
            agent: string(rng),
            latency_ms: rng.random_range(1..=quicast::wire::MAX_LATENCY_MS),
        },
        1 => ControlMessage::Welcome {
            stream_id: rng.random(),
            clock_us: varint(rng),
            report_interval_ms: varint(rng),
        },
        2 => ControlMessage::Reject {
            code: varint(rng),
            reason: string(rng),
        },
        3 => {
            let mut f = [0u64; 13];
            f.iter_mut().for_each(|v| *v = varint(rng));
            ControlMessage::Report(Report {
                blocks_delivered: f[0],
                blocks_recovered: f[1],
                blocks_lost: f[2],
                shards_late: f[3],
                shards_received: f[4],
                shards_missing: f[5],
                latency_p50_us: f[6],
                latency_p99_us: f[7],
                buffer_ms: f[8],
                bitrate_bps: f[9],
                startup_ms: f[10],
                stalls: f[11],
                stall_ms: f[12],
            })
        }
        4 => ControlMessage::Stall,
        5 => ControlMessage::Resume,
        6 => ControlMessage::Event(ClientEvent {
            name: string(rng),
            value: string(rng),
        }),
        7 => ControlMessage::Leave,
        8 => ControlMessage::EndOfStream {
            last_seq: varint(rng),
        },
        9 => ControlMessage::Summary(Summary {
            viewer_qoe: rng.random_range(0..=100),
            stream_qoe: rng.random_range(0..=100),
            stream_viewers: varint(rng),
            parity: varint(rng),
            loss_ppm: varint(rng),
            stream_residual_loss_ppm: varint(rng),
        }),
        _ => ControlMessage::Goodbye {
            code: varint(rng),
            reason: string(rng),
        },
    }
}

/// A few valid frames, maybe damaged, behind the split point and cap bytes.
fn control_input(rng: &mut SmallRng) -> Vec<u8> {
    let mut v = vec![0u8; control::HEADER_LEN];
    rng.fill_bytes(&mut v);
    if rng.random_bool(0.7) {
        v[control::HEADER_LEN - 1] &= 0x7f; // the cap byte: the default cap
    }
    let mut stream = Vec::new();
    for _ in 0..rng.random_range(0..6) {
        message(rng).encode_frame(&mut stream);
    }
    damage(rng, &mut stream);
    v.append(&mut stream);
    v
}

/// Scripts in the format `props/receiver.rs` reads: one in five random
/// bytes; the rest set up a stream and deliver most of each block's shards in
/// a shuffled order, with clock steps, damaged and raw datagrams, and often
/// an end of stream, so that blocks are rebuilt, delivered and lost.
fn receiver_input(rng: &mut SmallRng) -> Vec<u8> {
    if rng.random_bool(0.2) {
        let mut v = vec![0u8; rng.random_range(16..600)];
        rng.fill_bytes(&mut v);
        return v;
    }
    let blocks = rng.random_range(1..=8u8);
    // Shard sizes 64, 300 and 1100 mostly; 1 and 7 (many shards) sometimes.
    let shard = [2u8, 3, 4, 2, 3, 4, 0, 1][rng.random_range(0..8)];
    let latency = rng.random_range(5..=60u8); // 21..=241 ms
    let mut v = vec![blocks - 1, shard, rng.random(), rng.random(), latency];
    v.extend(rng.random::<[u8; 8]>()); // window, cap, first seq, ts0
    v.push(rng.random_range(20..50)); // ms between blocks, about the clock steps
    v.push(rng.random()); // END flag on the last block
    v.extend((0..blocks).flat_map(|_| rng.random::<[u8; 2]>())); // lengths
    let clock: u8 = rng.random();
    v.push(clock);
    if clock % 2 == 1 {
        v.push([0, 1, 2, 255, 254][rng.random_range(0..5)]); // skew, ±20 ms
    }
    for block in 0..blocks {
        // Indices wrap modulo the block's datagrams (repeats are duplicates);
        // blocks of 1- and 7-byte shards have up to 512.
        let n = if shard < 2 { 512 } else { 128 };
        let mut shards: Vec<u16> = (0..n).collect();
        shards.shuffle(rng);
        shards.truncate(rng.random_range(n / 2..=n).into());
        // Per block, about: one damaged or raw datagram, three clock steps
        // of up to 10 ms, and sometimes a step to `poll_timeout`.
        let kept = shards.len() as f64;
        for j in shards {
            let r = rng.random::<f64>() * kept;
            if r < 0.5 {
                // Damaged: pick, position, kind, then what the kind reads.
                v.extend([4, block]);
                v.extend(j.to_le_bytes());
                v.extend(rng.random::<[u8; 2]>());
                let kind = rng.random_range(0..4u8);
                v.push(kind);
                let args = [1, 0, 3, 1][usize::from(kind)];
                v.extend((0..args).map(|_| rng.random::<u8>()));
            } else if r < 1.0 {
                let len = rng.random_range(0..40u8);
                v.extend([5, len << 2 | rng.random_range(0..4)]);
                v.extend((0..len).map(|_| rng.random::<u8>()));
            } else if r < 4.0 {
                v.extend([6, rng.random_range(0..10)]);
            } else if r < 4.3 {
                v.extend([6, rng.random_range(200..=249)]);
            }
            v.extend([0, block]);
            v.extend(j.to_le_bytes());
        }
        v.extend([6, rng.random_range(0..20)]);
    }
    if rng.random_bool(0.5) {
        let last = if rng.random_bool(0.9) {
            blocks - 1
        } else {
            253
        };
        v.extend([7, last]);
    }
    v.extend([6, rng.random_range(200..=255)]);
    v
}

#[test]
fn header_decoders_accept_only_consistent_headers_and_round_trip() {
    run(100_000, header_input, header::check);
}

#[test]
fn control_frames_decode_the_same_however_split_and_round_trip() {
    run(20_000, control_input, control::check);
}

#[test]
fn receiver_keeps_its_invariants_under_any_script() {
    run(200, receiver_input, receiver::check);
}

/// Found by the `receiver` fuzz target: one block's shard, then an
/// EndOfStream whose `last_seq` is 2^62 - 1; at the end deadline the receiver
/// walked every sequence number up to it and ran out of memory.
#[test]
fn regression_end_of_stream_far_ahead() {
    let input = [
        0, 255, 255, 255, 64, 255, 0, 0, 133, 0, 0, 221, 221, 221, 221, 32, 0, 21, 235, 80, 29, 63,
        255, 255, 255,
    ];
    let result = receiver::check(&input);
    assert!(result.is_ok(), "{}", result.unwrap_err());
}
