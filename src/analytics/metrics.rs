//! Prometheus text exposition of a [`Snapshot`].
//!
//! [`render`] writes the classic Prometheus text format (version 0.0.4, served as
//! [`CONTENT_TYPE`]) through `prometheus-client`'s text encoder. The whole exposition is built
//! from one snapshot per scrape, so the figures in it are consistent with each other, and the
//! aggregator needs no locks or atomics.

use std::{borrow::Cow, collections::BTreeMap, fmt::Write as _};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelValue, LabelValueEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use super::snapshot::{JoinTime, Snapshot, StreamSnapshot};

/// HTTP `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a [`Metric`] only goes up or can go both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic total; the name should end in `_total` (it is appended if missing).
    Counter,
    /// A value that can go up and down.
    Gauge,
}

/// A metric the server adds to the exposition (connections, dropped datagrams, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Name, e.g. `quicast_connections_total`. Characters outside `[a-zA-Z0-9_:]` become `_`.
    pub name: String,
    /// One-line description.
    pub help: String,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// Current value.
    pub value: f64,
    /// Label names and values. Names are sanitized like metric names (without `:`); values
    /// may be anything and are escaped.
    pub labels: Vec<(String, String)>,
}

/// Renders `snapshot` and `extra` as Prometheus text, served as [`CONTENT_TYPE`].
///
/// Families (all per `stream` label unless noted):
///
/// | name | type | meaning |
/// |---|---|---|
/// | `quicast_viewers` | gauge | viewers watching now (0 after the last one left) |
/// | `quicast_viewers_peak` | gauge | most viewers at once |
/// | `quicast_all_streams_viewers_peak` | gauge | most viewers at once, all streams together (no label) |
/// | `quicast_joins_total`, `quicast_leaves_total` | counter | viewers that joined, left |
/// | `quicast_watch_seconds_total` | counter | summed viewer watch time |
/// | `quicast_stalls_total`, `quicast_stall_seconds_total` | counter | stalls, stalled time |
/// | `quicast_stall_ratio{window}` | gauge | stalled / watch time; `window` = `10s`, `60s`, `total`; absent for a window without watch time |
/// | `quicast_shards_sent_total`, `quicast_shards_lost_total` | counter | datagrams sent and lost before FEC |
/// | `quicast_blocks_delivered_total`, `_recovered_total`, `_lost_total` | counter | blocks delivered, rebuilt by FEC, lost after FEC |
/// | `quicast_loss_ratio{stage,window}` | gauge | `stage` = `before_fec` (shards), `after_fec` (blocks); absent for a window with nothing sent (delivered) |
/// | `quicast_qoe_score` | gauge | mean QoE of live viewers, 0..=100; absent when no live viewer has a score |
/// | `quicast_latency_seconds{reported,viewers}` | gauge | `viewers` quantile (`p50`, `p99`) across viewers of each one's `reported` latency quantile (`p50`, `p99`); absent when no live viewer reported a latency |
/// | `quicast_viewer_parity{k}` | gauge | mean parity shards per `k` data shards chosen for live viewers; absent without live viewers |
///
/// A gauge that describes viewers or a window has no sample at all when there is nothing to
/// describe (no live viewer, an empty window), rather than a 0 that a dashboard would draw as
/// quality collapsing or loss vanishing; its family's `# HELP` and `# TYPE` lines stay.
/// | `quicast_join_seconds` | histogram | viewers' time to first block |
/// | `quicast_app_events_total` | counter | application events |
/// | `quicast_analytics_events_applied_total` | counter | events applied (no label) |
/// | `quicast_analytics_events_ignored_total{reason}` | counter | events ignored (no stream label) |
/// | `quicast_analytics_viewers_tracked` | gauge | viewers with state (no label) |
///
/// Latency quantiles use `reported`/`viewers` labels rather than `quantile`, which Prometheus
/// reserves for summaries.
///
/// Several `extra` metrics with the same name form one family (the first one's help and kind
/// win). An extra whose name collides with a built-in family is skipped, since a duplicate
/// family would make the whole scrape fail to parse.
pub fn render(snapshot: &Snapshot, extra: &[Metric]) -> String {
    let mut families = Families::default();
    families.snapshot(snapshot);
    let builtin = families.0.len();
    for m in extra {
        families.extra(m, builtin);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(families));
    let mut out = String::new();
    // Writing into a String cannot fail, and our collector returns only the writer's errors.
    prometheus_client::encoding::text::encode_registry(&mut out, &registry)
        .expect("formatting into a String does not fail");
    out
}

#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    fn encode(self, metric: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Value::Int(v) => metric.encode_gauge(&v),
            Value::Float(v) => metric.encode_gauge(&v),
        }
    }
}

#[derive(Debug)]
enum Samples {
    Scalar(Vec<(Labels, Value)>),
    Histogram(Vec<HistogramSample>),
}

#[derive(Debug)]
struct HistogramSample {
    labels: Labels,
    sum: f64,
    count: u64,
    /// `(le, count)` per bucket, not cumulative; the last `le` is `f64::MAX`, for `+Inf`.
    buckets: Vec<(f64, u64)>,
}

type Labels = Vec<(Cow<'static, str>, String)>;

#[derive(Debug)]
struct Family {
    /// Full sample name; for counters it ends in `_total`.
    name: String,
    help: String,
    kind: MetricType,
    samples: Samples,
}

/// The families of one exposition, in order.
#[derive(Debug, Default)]
struct Families(Vec<Family>);

fn stream_label(name: &str) -> Labels {
    vec![(Cow::Borrowed("stream"), name.to_owned())]
}

fn with(mut labels: Labels, extra: &[(&'static str, &str)]) -> Labels {
    labels.extend(extra.iter().map(|&(k, v)| (Cow::Borrowed(k), v.to_owned())));
    labels
}

impl Families {
    fn scalar(&mut self, name: &str, help: &str, kind: MetricType, samples: Vec<(Labels, Value)>) {
        self.0.push(Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples: Samples::Scalar(samples),
        });
    }

    /// A family with one sample per stream.
    fn per_stream(
        &mut self,
        streams: &BTreeMap<String, StreamSnapshot>,
        name: &str,
        help: &str,
        kind: MetricType,
        value: impl Fn(&StreamSnapshot) -> Value,
    ) {
        let samples = streams
            .iter()
            .map(|(n, s)| (stream_label(n), value(s)))
            .collect();
        self.scalar(name, help, kind, samples);
    }

    fn snapshot(&mut self, snap: &Snapshot) {
        use MetricType::{Counter, Gauge};
        use Value::{Float, Int};
        let st = &snap.streams;
        self.per_stream(st, "quicast_viewers", "Viewers watching now.", Gauge, |s| {
            Int(s.viewers)
        });
        self.per_stream(
            st,
            "quicast_viewers_peak",
            "Most viewers at once.",
            Gauge,
            |s| Int(s.viewers_peak),
        );
        self.scalar(
            "quicast_all_streams_viewers_peak",
            "Most viewers at once, all streams together.",
            Gauge,
            vec![(Labels::new(), Int(snap.overall.viewers_peak))],
        );
        self.per_stream(
            st,
            "quicast_joins_total",
            "Viewers that joined.",
            Counter,
            |s| Int(s.joins),
        );
        self.per_stream(
            st,
            "quicast_leaves_total",
            "Viewers that left.",
            Counter,
            |s| Int(s.leaves),
        );
        self.per_stream(
            st,
            "quicast_watch_seconds_total",
            "Summed watch time of all viewers, live viewers up to now.",
            Counter,
            |s| Float(s.watch_seconds),
        );
        self.per_stream(
            st,
            "quicast_stalls_total",
            "Playback stalls.",
            Counter,
            |s| Int(s.stalls),
        );
        self.per_stream(
            st,
            "quicast_stall_seconds_total",
            "Stalled playback time.",
            Counter,
            |s| Float(s.stall_seconds),
        );
        let mut ratios = Vec::new();
        for (n, s) in st {
            for (window, r, watched) in [
                (
                    "10s",
                    s.windows.s10.stall_ratio,
                    s.windows.s10.watch_seconds,
                ),
                (
                    "60s",
                    s.windows.s60.stall_ratio,
                    s.windows.s60.watch_seconds,
                ),
                ("total", s.stall_ratio, s.watch_seconds),
            ] {
                if watched <= 0.0 {
                    continue;
                }
                ratios.push((with(stream_label(n), &[("window", window)]), Float(r)));
            }
        }
        self.scalar(
            "quicast_stall_ratio",
            "Stalled time over watch time.",
            Gauge,
            ratios,
        );
        self.per_stream(
            st,
            "quicast_shards_sent_total",
            "Datagrams sent over measured report intervals.",
            Counter,
            |s| Int(s.shards_sent),
        );
        self.per_stream(
            st,
            "quicast_shards_lost_total",
            "Datagrams never received (loss before FEC).",
            Counter,
            |s| Int(s.shards_lost),
        );
        self.per_stream(
            st,
            "quicast_blocks_delivered_total",
            "Blocks delivered to viewers.",
            Counter,
            |s| Int(s.blocks_delivered),
        );
        self.per_stream(
            st,
            "quicast_blocks_recovered_total",
            "Delivered blocks that FEC rebuilt.",
            Counter,
            |s| Int(s.blocks_recovered),
        );
        self.per_stream(
            st,
            "quicast_blocks_lost_total",
            "Blocks lost after FEC.",
            Counter,
            |s| Int(s.blocks_lost),
        );
        let mut loss = Vec::new();
        for (n, s) in st {
            let w = &s.windows;
            let blocks = |w: &super::snapshot::Window| w.blocks_delivered + w.blocks_lost;
            for (stage, window, r, den) in [
                (
                    "before_fec",
                    "10s",
                    w.s10.loss_before_fec,
                    w.s10.shards_sent,
                ),
                (
                    "before_fec",
                    "60s",
                    w.s60.loss_before_fec,
                    w.s60.shards_sent,
                ),
                ("before_fec", "total", s.loss_before_fec, s.shards_sent),
                ("after_fec", "10s", w.s10.loss_after_fec, blocks(&w.s10)),
                ("after_fec", "60s", w.s60.loss_after_fec, blocks(&w.s60)),
                (
                    "after_fec",
                    "total",
                    s.loss_after_fec,
                    s.blocks_delivered + s.blocks_lost,
                ),
            ] {
                if den == 0 {
                    continue;
                }
                let labels = with(stream_label(n), &[("stage", stage), ("window", window)]);
                loss.push((labels, Float(r)));
            }
        }
        self.scalar(
            "quicast_loss_ratio",
            "Loss ratio: shards before FEC, blocks after FEC.",
            Gauge,
            loss,
        );
        let qoe = st
            .iter()
            .filter(|(_, s)| s.qoe.viewers > 0)
            .map(|(n, s)| (stream_label(n), Float(s.qoe.mean)))
            .collect();
        self.scalar(
            "quicast_qoe_score",
            "Mean quality-of-experience score of live viewers, 0 to 100; absent without any.",
            Gauge,
            qoe,
        );
        let mut latency = Vec::new();
        for (n, s) in st {
            let l = &s.latency;
            if l.viewers == 0 {
                continue;
            }
            for (reported, viewers, us) in [
                ("p50", "p50", l.reported_p50_us.p50),
                ("p50", "p99", l.reported_p50_us.p99),
                ("p99", "p50", l.reported_p99_us.p50),
                ("p99", "p99", l.reported_p99_us.p99),
            ] {
                let labels = with(
                    stream_label(n),
                    &[("reported", reported), ("viewers", viewers)],
                );
                latency.push((labels, Float(us as f64 / 1e6)));
            }
        }
        self.scalar(
            "quicast_latency_seconds",
            "Block latency: the viewers quantile across viewers of each one's reported quantile.",
            Gauge,
            latency,
        );
        let mut parity = Vec::new();
        for (n, s) in st {
            if s.parity.viewers == 0 {
                continue;
            }
            let labels = with(stream_label(n), &[("k", &s.parity.k.to_string())]);
            parity.push((labels, Float(s.parity.mean)));
        }
        self.scalar(
            "quicast_viewer_parity",
            "Mean parity shards per k data shards chosen for live viewers.",
            Gauge,
            parity,
        );
        let joins = st
            .iter()
            .map(|(n, s)| join_histogram(stream_label(n), &s.join_time))
            .collect();
        self.0.push(Family {
            name: "quicast_join_seconds".into(),
            help: "Viewers' time from connecting to the first block.".into(),
            kind: MetricType::Histogram,
            samples: Samples::Histogram(joins),
        });
        self.per_stream(
            st,
            "quicast_app_events_total",
            "Application events from viewers.",
            Counter,
            |s| Int(s.app_events),
        );
        self.scalar(
            "quicast_analytics_events_applied_total",
            "Events applied by the analytics aggregator.",
            Counter,
            vec![(Labels::new(), Int(snap.applied))],
        );
        let i = &snap.ignored;
        let ignored = [
            ("joins_over_viewer_cap", i.joins_over_viewer_cap),
            ("joins_over_stream_cap", i.joins_over_stream_cap),
            ("duplicate_join", i.duplicate_joins),
            ("unknown_viewer", i.unknown_viewer),
        ]
        .into_iter()
        .map(|(reason, n)| (with(Labels::new(), &[("reason", reason)]), Int(n)))
        .collect();
        self.scalar(
            "quicast_analytics_events_ignored_total",
            "Events the aggregator counted and ignored.",
            Counter,
            ignored,
        );
        self.scalar(
            "quicast_analytics_viewers_tracked",
            "Viewers the aggregator holds state for.",
            Gauge,
            vec![(Labels::new(), Int(snap.viewers_tracked))],
        );
    }

    fn extra(&mut self, m: &Metric, builtin: usize) {
        let mut name = sanitize(&m.name, true);
        let kind = match m.kind {
            MetricKind::Counter => {
                if !name.ends_with("_total") {
                    name.push_str("_total");
                }
                MetricType::Counter
            }
            MetricKind::Gauge => MetricType::Gauge,
        };
        let labels = m
            .labels
            .iter()
            .map(|(k, v)| (Cow::Owned(sanitize(k, false)), v.clone()))
            .collect();
        let sample = (labels, Value::Float(m.value));
        // Histogram families also own `_sum`, `_count` and `_bucket` names.
        let taken = |f: &Family| match f.samples {
            Samples::Histogram(_) => ["", "_sum", "_count", "_bucket"]
                .iter()
                .any(|s| name == format!("{}{s}", f.name)),
            Samples::Scalar(_) => name == f.name,
        };
        if self.0[..builtin].iter().any(taken) {
            return;
        }
        match self.0[builtin..].iter_mut().find(|f| f.name == name) {
            Some(Family {
                samples: Samples::Scalar(samples),
                ..
            }) => samples.push(sample),
            Some(_) => {}
            None => self.0.push(Family {
                name,
                help: m.help.clone(),
                kind,
                samples: Samples::Scalar(vec![sample]),
            }),
        }
    }
}

fn join_histogram(labels: Labels, j: &JoinTime) -> HistogramSample {
    let mut buckets: Vec<(f64, u64)> = j.buckets.iter().map(|b| (b.le_seconds, b.count)).collect();
    let finite: u64 = buckets.iter().map(|b| b.1).sum();
    // The encoder writes `le="+Inf"` for an upper bound of f64::MAX.
    buckets.push((f64::MAX, j.count.saturating_sub(finite)));
    HistogramSample {
        labels,
        sum: j.sum_seconds,
        count: j.count,
        buckets,
    }
}

/// A valid metric (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or label (no `:`) name.
fn sanitize(name: &str, metric: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A label value escaped for the text format: `\`, `"` and newline.
///
/// `prometheus-client` writes label values verbatim, and stream names come from viewers.
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// HELP text escaped for the text format: `\` and newline.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            // prometheus-client follows OpenMetrics, where a counter family `x` has samples
            // named `x_total`. The classic text format that promtool and text/plain scrapers
            // parse wants the family itself named `x_total`, so counters are described by
            // their full name and their samples written with the plain value encoder (which
            // adds no suffix). Both formats spell gauge and histogram lines the same way.
            let help = escape_help(&f.help);
            let mut metric = encoder.encode_descriptor(&f.name, &help, None, f.kind)?;
            match &f.samples {
                Samples::Scalar(samples) => {
                    for (labels, value) in samples {
                        let labels: Vec<(&str, Escaped)> = labels
                            .iter()
                            .map(|(k, v)| (k.as_ref(), Escaped(v)))
                            .collect();
                        // An empty label set would be written as `name{}`; skip the braces.
                        if labels.is_empty() {
                            value.encode(&mut metric)?;
                        } else {
                            value.encode(&mut metric.encode_family(&labels)?)?;
                        }
                    }
                }
                Samples::Histogram(samples) => {
                    for h in samples {
                        let labels: Vec<(&str, Escaped)> = h
                            .labels
                            .iter()
                            .map(|(k, v)| (k.as_ref(), Escaped(v)))
                            .collect();
                        metric
                            .encode_family(&labels)?
                            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::{Aggregator, AggregatorConfig, Input, InputKind};
    use crate::wire::Report;
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    use std::{
        collections::{HashMap, HashSet},
        io::Write as _,
        process::{Command, Stdio},
        time::{Duration, Instant},
    };

    const ODD: &str = "odd \"name\"\\ with\nnewline";

    /// A snapshot with a busy stream, a stream everybody left, and a hostile stream name.
    fn snapshot(seed: u64) -> Snapshot {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut agg = Aggregator::new(AggregatorConfig::default());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let ev = |viewer, stream: &str, kind| Input {
            viewer,
            stream: stream.into(),
            kind,
        };
        for v in 0..20 {
            let stream = ["live", "gone", ODD][v as usize % 3];
            agg.apply(&ev(v, stream, InputKind::Join { agent: "t".into() }), at(0));
        }
        let mut state = vec![(Report::default(), 0u64); 20];
        for t in 1..=30 {
            for (v, (r, sent)) in state.iter_mut().enumerate() {
                *sent += 1_000;
                r.shards_received += 1_000 - rng.random_range(0..100);
                r.blocks_delivered += 30;
                r.blocks_recovered += rng.random_range(0..5);
                r.blocks_lost += rng.random_range(0..2);
                r.startup_ms = rng.random_range(50..3_000);
                r.latency_p50_us = rng.random_range(10_000..50_000);
                r.latency_p99_us = r.latency_p50_us + rng.random_range(0..100_000);
                let kind = InputKind::Report {
                    report: *r,
                    sent_shards: *sent,
                };
                agg.apply(&ev(v as u64, "", kind), at(t));
            }
        }
        agg.apply(&ev(0, "", InputKind::Stall), at(31));
        for v in (1..20).step_by(3) {
            let reason = "bye".into();
            agg.apply(&ev(v, "", InputKind::Leave { reason }), at(32));
        }
        agg.snapshot(at(33))
    }

    fn extras() -> Vec<Metric> {
        vec![
            Metric {
                name: "quicast_connections".into(),
                help: "Connections accepted.\nSecond line \\ here.".into(),
                kind: MetricKind::Counter,
                value: 12.0,
                labels: vec![("listener".into(), "0.0.0.0:4433".into())],
            },
            Metric {
                name: "quicast_connections_total".into(),
                help: "ignored: same family".into(),
                kind: MetricKind::Counter,
                value: 3.0,
                labels: vec![("listener".into(), "[::]:4433".into())],
            },
            Metric {
                name: "quicast-send queue".into(),
                help: "Datagrams queued.".into(),
                kind: MetricKind::Gauge,
                value: 0.5,
                labels: vec![("bad label!".into(), "a\"b".into())],
            },
            // Collides with built-in families: dropped, or the scrape would not parse.
            Metric {
                name: "quicast_viewers".into(),
                help: "dup".into(),
                kind: MetricKind::Gauge,
                value: 1.0,
                labels: vec![],
            },
            Metric {
                name: "quicast_join_seconds_count".into(),
                help: "dup".into(),
                kind: MetricKind::Gauge,
                value: 1.0,
                labels: vec![],
            },
        ]
    }

    /// Checks the text-format rules promtool would, for machines without promtool: every
    /// sample belongs to the family declared just before it, families are declared once with
    /// help, counters end in `_total`, histograms end at `+Inf` with the count, and values
    /// parse.
    fn check_format(text: &str) {
        let mut declared = HashSet::new();
        let mut family: Option<(String, String)> = None;
        let mut helped = None;
        let mut inf_buckets = HashMap::new();
        let mut counts = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect(line);
                assert!(!help.is_empty(), "{line}");
                helped = Some(name.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert_eq!(helped.as_deref(), Some(name), "TYPE without HELP: {line}");
                assert!(declared.insert(name.to_owned()), "declared twice: {name}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                family = Some((name.to_owned(), kind.to_owned()));
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment {line}");
            let (series, value) = line.rsplit_once(' ').expect(line);
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            assert!(value.is_finite(), "{line}");
            let name = series.split('{').next().unwrap();
            let (fam, kind) = family.as_ref().expect("sample before any TYPE");
            let ok = match kind.as_str() {
                "histogram" => ["_sum", "_count", "_bucket"]
                    .iter()
                    .any(|s| name == format!("{fam}{s}")),
                _ => name == fam,
            };
            assert!(ok, "{name} under {fam}");
            let labels = series.strip_prefix(name).unwrap();
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                assert!(labels.len() > 2, "empty braces: {line}");
            }
            if name.ends_with("_bucket") && series.contains("le=\"+Inf\"") {
                let key = series
                    .replace("le=\"+Inf\",", "")
                    .replacen("_bucket", "", 1);
                inf_buckets.insert(key, value);
            }
            if name.ends_with("_count") {
                counts.insert(series.replacen("_count", "", 1), value);
            }
        }
        assert!(!counts.is_empty());
        assert_eq!(inf_buckets, counts, "+Inf bucket must equal _count");
    }

    #[test]
    fn renders_valid_prometheus_text() {
        let seed = crate::testing::seed();
        let text = render(&snapshot(seed), &extras());
        check_format(&text);
        // Everyone left "gone": it still renders, at zero, with its history.
        assert!(
            text.contains("quicast_viewers{stream=\"gone\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("quicast_viewers_peak{stream=\"gone\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("quicast_viewers{stream=\"live\"} 7\n"),
            "{text}"
        );
        // The hostile name is escaped, not breaking the line.
        let odd = r#"quicast_viewers{stream="odd \"name\"\\ with\nnewline"} 6"#;
        assert!(text.contains(&format!("{odd}\n")), "{text}");
        assert!(text
            .contains("quicast_loss_ratio{stream=\"live\",stage=\"before_fec\",window=\"10s\"}"));
        assert!(text
            .contains("quicast_latency_seconds{stream=\"live\",reported=\"p99\",viewers=\"p50\"}"));
        assert!(text.contains("quicast_join_seconds_bucket{le=\"+Inf\",stream=\"live\"} 7\n"));
        // Extras: merged under one family, `_total` added, names sanitized, help escaped.
        assert!(text.contains(
            "# HELP quicast_connections_total Connections accepted.\\nSecond line \\\\ here.\n"
        ));
        assert!(text.contains("quicast_connections_total{listener=\"[::]:4433\"} 3.0\n"));
        assert!(text.contains("quicast_send_queue{bad_label_=\"a\\\"b\"} 0.5\n"));
        assert_eq!(text.matches("# TYPE quicast_viewers ").count(), 1);

        let mut child = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            // CI installs promtool (.ci/run); only a developer machine may skip it.
            Err(e) if std::env::var_os("CI").is_some() => panic!("promtool is required in CI: {e}"),
            Err(e) => {
                println!("promtool check skipped: cannot run promtool ({e}); format checked by the test alone");
                return;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.trim().is_empty(),
            "promtool: {report}\n{text}"
        );
        println!("promtool check metrics: no problems");
    }

    #[test]
    fn empty_snapshot_renders() {
        let agg = Aggregator::new(AggregatorConfig::default());
        let text = render(&agg.snapshot(Instant::now()), &[]);
        assert!(
            text.contains("quicast_analytics_events_applied_total 0\n"),
            "{text}"
        );
        // Families without streams still declare themselves, which the format allows.
        assert!(text.contains("# TYPE quicast_viewers gauge\n"));
    }

    #[test]
    fn viewer_gauges_are_absent_once_the_last_viewer_left() {
        let mut agg = Aggregator::new(AggregatorConfig::default());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ev = |kind| Input {
            viewer: 1,
            stream: "live".into(),
            kind,
        };
        agg.apply(&ev(InputKind::Join { agent: "t".into() }), at(0));
        let report = Report {
            blocks_delivered: 40,
            shards_received: 800,
            latency_p50_us: 20_000,
            latency_p99_us: 30_000,
            ..Report::default()
        };
        for (i, sent) in [(1u64, 0u64), (2, 800)] {
            let kind = InputKind::Report {
                report: Report {
                    blocks_delivered: report.blocks_delivered * i,
                    shards_received: report.shards_received * i,
                    ..report
                },
                sent_shards: sent + 800,
            };
            agg.apply(&ev(kind), at(i * 1000));
        }
        let live = render(&agg.snapshot(at(2500)), &[]);
        for family in [
            "quicast_qoe_score{",
            "quicast_latency_seconds{",
            "quicast_viewer_parity{",
        ] {
            assert!(
                live.contains(family),
                "{family} missing while watched:\n{live}"
            );
        }
        agg.apply(
            &ev(InputKind::Leave {
                reason: "viewer left".into(),
            }),
            at(3000),
        );
        let gone = render(&agg.snapshot(at(3500)), &[]);
        check_format(&gone);
        assert!(
            gone.contains("quicast_viewers{stream=\"live\"} 0\n"),
            "{gone}"
        );
        for family in [
            "quicast_qoe_score{",
            "quicast_latency_seconds{",
            "quicast_viewer_parity{",
        ] {
            assert!(!gone.contains(family), "{family} still there:\n{gone}");
        }
        // Declared still, so a scrape keeps its shape.
        assert!(gone.contains("# TYPE quicast_qoe_score gauge\n"), "{gone}");
    }
}
