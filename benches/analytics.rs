//! Aggregator throughput on a realistic event mix.
//!
//! 1000 viewers over 10 streams, each reporting once a second for 200 simulated seconds:
//! about 96% reports, the rest stalls and resumes, application events, and churn (a viewer
//! leaves and a new one joins in its place). Every batch starts from a fresh aggregator, so
//! reports carry the same cumulative counters they would in a real run. The figure to read
//! is `thrpt`, in events per second on one core.
//!
//! Also measured: a snapshot and a Prometheus render over the same 1000 viewers, the work of
//! one scrape.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use quicast::{
    analytics::{render, Aggregator, AggregatorConfig, Input, InputKind},
    wire::{ClientEvent, Report},
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const VIEWERS: u64 = 1_000;
const STREAMS: u64 = 10;
const SECONDS: u64 = 200;
/// Datagrams a viewer receives per second: 8 Mbit/s of 1200-byte shards.
const SHARDS_PER_SECOND: u64 = 833;

/// One viewer seat: whoever occupies it now and that viewer's cumulative counters.
struct Seat {
    id: u64,
    stream: String,
    report: Report,
    sent: u64,
    stalled: bool,
}

/// The event sequence, with each event's offset from the start.
fn workload(seed: u64) -> Vec<(Input, Duration)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut events = Vec::new();
    let mut next_id = 0;
    let mut seats: Vec<Seat> = (0..VIEWERS)
        .map(|i| {
            next_id += 1;
            Seat {
                id: next_id,
                stream: format!("stream-{}", i % STREAMS),
                report: Report::default(),
                sent: 0,
                stalled: false,
            }
        })
        .collect();
    let input = |seat: &Seat, kind| Input {
        viewer: seat.id,
        stream: seat.stream.clone(),
        kind,
    };
    for seat in &seats {
        let agent = "quicast-client/0.1".into();
        events.push((input(seat, InputKind::Join { agent }), Duration::ZERO));
    }
    for sec in 1..=SECONDS {
        for (i, seat) in seats.iter_mut().enumerate() {
            let at = Duration::from_secs(sec) + Duration::from_micros(i as u64 * 1_000);
            let r = &mut seat.report;
            // Per-viewer loss between 0 and 4%, drawn per second.
            let lost = rng.random_range(0..SHARDS_PER_SECOND / 25);
            seat.sent += SHARDS_PER_SECOND;
            r.shards_received += SHARDS_PER_SECOND - lost;
            r.shards_missing += lost;
            r.blocks_delivered += 25;
            r.blocks_recovered += rng.random_range(0..4);
            r.blocks_lost += u64::from(rng.random_ratio(1, 50));
            r.latency_p50_us = rng.random_range(15_000..40_000);
            r.latency_p99_us = r.latency_p50_us + rng.random_range(0..60_000);
            r.buffer_ms = rng.random_range(20..120);
            r.bitrate_bps = 8_000_000;
            r.startup_ms = 250;
            let kind = InputKind::Report {
                report: *r,
                sent_shards: seat.sent,
            };
            events.push((input(seat, kind), at));
            let roll = rng.random_range(0..1_000);
            let later = at + Duration::from_micros(500);
            if seat.stalled {
                seat.stalled = false;
                seat.report.stalls += 1;
                seat.report.stall_ms += 400;
                events.push((input(seat, InputKind::Resume), later));
            } else if roll < 10 {
                seat.stalled = true;
                events.push((input(seat, InputKind::Stall), later));
            } else if roll < 15 {
                let event = ClientEvent {
                    name: "quality".into(),
                    value: "720p".into(),
                };
                events.push((input(seat, InputKind::App(event)), later));
            } else if roll < 20 {
                let reason = "bye".into();
                events.push((input(seat, InputKind::Leave { reason }), later));
                next_id += 1;
                *seat = Seat {
                    id: next_id,
                    stream: seat.stream.clone(),
                    report: Report::default(),
                    sent: 0,
                    stalled: false,
                };
                let agent = "quicast-client/0.1".into();
                events.push((input(seat, InputKind::Join { agent }), later));
            }
        }
    }
    events
}

fn bench(c: &mut Criterion) {
    let events = workload(1);
    let reports = events
        .iter()
        .filter(|(e, _)| matches!(e.kind, InputKind::Report { .. }))
        .count();
    println!(
        "workload: {} events, {:.1}% reports, {VIEWERS} viewers over {STREAMS} streams",
        events.len(),
        100.0 * reports as f64 / events.len() as f64
    );
    let config = AggregatorConfig::default();

    let mut group = c.benchmark_group("aggregator");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("apply", |b| {
        b.iter_batched_ref(
            || (Aggregator::new(config.clone()), Instant::now()),
            |(agg, t0)| {
                for (input, at) in &events {
                    agg.apply(input, *t0 + *at);
                }
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    // One scrape over the state the workload leaves behind.
    let t0 = Instant::now();
    let mut agg = Aggregator::new(config);
    for (input, at) in &events {
        agg.apply(input, t0 + *at);
    }
    let end = t0 + Duration::from_secs(SECONDS);
    let mut group = c.benchmark_group("scrape");
    group.sample_size(20);
    group.bench_function("snapshot_1000_viewers", |b| b.iter(|| agg.snapshot(end)));
    let snapshot = agg.snapshot(end);
    group.bench_function("render_10_streams", |b| b.iter(|| render(&snapshot, &[])));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
