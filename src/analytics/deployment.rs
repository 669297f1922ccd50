//! Analytics across servers: the pure parts of publishing every server's events to one
//! NATS JetStream stream and aggregating them in one place.
//!
//! The NATS client lives in the shell (`net::nats`); everything that decides something is
//! here, without I/O or clock reads, and unit-tested:
//!
//! - **Naming** ([`Names`]): deployment `D`, quicast stream `S` →
//!   subject `quicast.D.events.S'` (`S'` is `S` with every byte outside
//!   `[A-Za-z0-9_-]` written `%XX`, see [`subject_token`]) in the JetStream stream
//!   `QUICAST_D`, which holds `quicast.D.events.>`.
//! - **Message ids** ([`MessageId`]): `server:run:seq` in the `Nats-Msg-Id` header, so a
//!   resend inside the stream's duplicate window is dropped by JetStream.
//! - **Message body** ([`ServerRecord`]): one event-log line ([`LogRecord`]) with the
//!   server id added, e.g.
//!   `{"server":"edge-1","run":"19ad4b2e1f0-3a1c","unix_ms":1764700000123,"at_ms":5012,"viewer":7,"stream":"live","kind":{"type":"stall"}}`;
//!   the aggregator orders events by `unix_ms`, the server's wall clock.
//! - **The publisher's buffer** ([`Outbox`]): bounded, counted, numbered on entry.
//! - **The aggregator** ([`DeploymentAggregator`]): puts each server run's events back in
//!   sequence (holding a few that arrive early, skipping duplicates), gives every
//!   `(server run, viewer)` its own viewer id, and feeds one [`Aggregator`].

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt,
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{
    aggregator::{Aggregator, AggregatorConfig},
    event::{Input, InputKind, LogRecord},
    metrics::{Metric, MetricKind},
    snapshot::Snapshot,
};

/// Longest deployment name or server id, in bytes.
pub const MAX_NAME: usize = 64;
/// Default [`Outbox`] limit: events a server keeps while NATS is unreachable. At about 250
/// bytes an event that is about 16 MiB, or two minutes of 500 viewers reporting every second.
pub const DEFAULT_OUTBOX_LIMIT: usize = 65_536;
/// Duplicate window the stream is created with: a resend up to this long after the first
/// copy was stored is dropped by JetStream (its default is two minutes). An event can only
/// be resent after its acknowledgment was lost, so this bounds how long an outage the
/// server side alone deduplicates; the aggregator's sequence check covers the rest.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// Default events a [`DeploymentAggregator`] holds per server run while waiting for an
/// earlier one that is missing; past that the missing ones are counted as a gap. A held
/// event is a few hundred bytes; the aggregator shell's redelivery delay (5 s) at 1,600
/// events/s of one server run fits.
pub const DEFAULT_HOLD: usize = 8_192;
/// Default most server runs a [`DeploymentAggregator`] tracks (a server restart is a new run).
pub const DEFAULT_MAX_SOURCES: usize = 4_096;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty or longer than [`MAX_NAME`].
    #[error("{what} must be 1 to {MAX_NAME} bytes long")]
    Length {
        /// Which name.
        what: &'static str,
    },
    /// A character outside the allowed set.
    #[error("{what} may contain only ASCII letters, digits, '-' and '_'")]
    Character {
        /// Which name.
        what: &'static str,
    },
}

/// Checks a deployment name or server id: 1 to [`MAX_NAME`] bytes of `[A-Za-z0-9_-]`, so it
/// is one subject token, part of a stream name, and unambiguous in a [`MessageId`].
pub fn check_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(NameError::Length { what });
    }
    if !name.bytes().all(plain) {
        return Err(NameError::Character { what });
    }
    Ok(())
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A quicast stream name as one NATS subject token: bytes of `[A-Za-z0-9_-]` as they are,
/// every other byte (`.`, `*`, `>`, `%`, spaces, non-ASCII) as `%XX`, and the empty name as
/// `%`. Distinct names give distinct tokens.
pub fn subject_token(stream: &str) -> String {
    if stream.is_empty() {
        return "%".into();
    }
    let mut out = String::with_capacity(stream.len());
    for b in stream.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Subjects and the JetStream stream of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    deployment: String,
}

impl Names {
    /// Names for `deployment` (checked with [`check_name`]).
    pub fn new(deployment: &str) -> Result<Names, NameError> {
        check_name("deployment", deployment)?;
        Ok(Names {
            deployment: deployment.into(),
        })
    }

    /// The deployment name.
    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// The JetStream stream holding the deployment's events: `QUICAST_<deployment>`.
    pub fn stream(&self) -> String {
        format!("QUICAST_{}", self.deployment)
    }

    /// Subject of the events of quicast stream `stream`:
    /// `quicast.<deployment>.events.<token>` (see [`subject_token`]).
    pub fn subject(&self, stream: &str) -> String {
        format!(
            "quicast.{}.events.{}",
            self.deployment,
            subject_token(stream)
        )
    }

    /// The wildcard the JetStream stream captures: `quicast.<deployment>.events.>`.
    pub fn wildcard(&self) -> String {
        format!("quicast.{}.events.>", self.deployment)
    }
}

/// The `Nats-Msg-Id` of one event: `server:run:seq`, with `run` in hex.
///
/// `run` tells one start of a server from the next (viewer ids and sequences restart), and
/// `seq` numbers the events of one run from 1 with no gaps (see [`Outbox::push`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// The server's id.
    pub server: String,
    /// The server run.
    pub run: u64,
    /// The event's number in the run, from 1.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:x}:{}", self.server, self.run, self.seq)
    }
}

impl MessageId {
    /// Reads an id written by [`Display`](fmt::Display); `None` for anything else.
    pub fn parse(s: &str) -> Option<MessageId> {
        let mut parts = s.split(':');
        let server = parts.next()?;
        let run = parts.next()?;
        let seq = parts.next()?;
        if parts.next().is_some() || check_name("server id", server).is_err() {
            return None;
        }
        // from_str_radix accepts a leading '+': insist on digits only.
        if run.is_empty() || run.len() > 16 || !run.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(MessageId {
            server: server.into(),
            run: u64::from_str_radix(run, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// One message body: an event-log line with the id of the server that accepted the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord<'a> {
    /// The server's id.
    pub server: Cow<'a, str>,
    /// The event-log line: the event and when the server accepted it.
    #[serde(flatten)]
    pub record: LogRecord<'a>,
}

/// Refused by [`Outbox::push`]: the buffer is at its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A server's bounded buffer of events not yet acknowledged by JetStream.
///
/// An event gets its sequence number when it enters, so the numbers of a run have no gaps
/// (an event refused at the limit never had one) and an aggregator can tell an event that
/// is late from one that will never come. It leaves only when acknowledged.
///
/// `T` is what the shell resends: the body, and whatever else it needs (its subject).
#[derive(Debug)]
pub struct Outbox<T = Bytes> {
    limit: usize,
    next: u64,
    pending: BTreeMap<u64, T>,
    refused: u64,
}

impl<T> Outbox<T> {
    /// An empty buffer of at most `limit` events (at least 1).
    pub fn new(limit: usize) -> Outbox<T> {
        Outbox {
            limit: limit.max(1),
            next: 1,
            pending: BTreeMap::new(),
            refused: 0,
        }
    }

    /// Adds an event and returns its sequence number, or [`Full`] (counted in
    /// [`refused`](Self::refused)).
    pub fn push(&mut self, body: T) -> Result<u64, Full> {
        if self.pending.len() >= self.limit {
            self.refused += 1;
            return Err(Full);
        }
        let seq = self.next;
        self.next += 1;
        self.pending.insert(seq, body);
        Ok(seq)
    }

    /// Up to `n` unacknowledged events, oldest first: what to (re)send.
    pub fn oldest(&self, n: usize) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.pending.iter().take(n).map(|(s, b)| (*s, b))
    }

    /// Removes an acknowledged event; false if it was not pending.
    pub fn ack(&mut self, seq: u64) -> bool {
        self.pending.remove(&seq).is_some()
    }

    /// Events waiting for an acknowledgment.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Events refused because the buffer was full.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

/// What [`DeploymentAggregator::apply`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This many events were applied: this one and the held ones it let through (in the
    /// rare case of a gap skipped after the hold, possibly not this one yet).
    Applied(usize),
    /// Arrived ahead of an earlier event of its run; held until that one comes.
    Held,
    /// Already applied (a redelivery or a resend stored twice); skipped.
    Duplicate,
    /// From a server run beyond [`DEFAULT_MAX_SOURCES`] (or the configured cap); skipped.
    OverSourceCap,
}

/// Per-server figures of a [`DeploymentAggregator`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerFigures {
    /// Events applied, all runs.
    pub applied: u64,
    /// Viewers that joined and have not left.
    pub viewers: u64,
    /// Joins applied.
    pub joins: u64,
    /// Messages skipped as already applied.
    pub duplicates: u64,
    /// Events never seen: sequence numbers skipped after [`DEFAULT_HOLD`] later ones waited.
    pub gaps: u64,
    /// Runs seen (starts of the server).
    pub runs: u64,
}

#[derive(Debug)]
struct Source {
    server: String,
    /// Next sequence number to apply.
    next: u64,
    held: BTreeMap<u64, (Input, Instant)>,
}

/// One [`Aggregator`] fed by every server of a deployment.
///
/// Each server numbers its events per run ([`MessageId`]). Messages are applied in that
/// order per run: one that arrives early is held until the ones before it come (JetStream
/// may store a resend after a later event), one already applied is skipped. So a message
/// delivered twice, by a redelivery or by a resend stored twice, is counted once, and the
/// figures equal the sum of the servers' accepted events exactly.
///
/// Viewer ids are per server run; each `(run, viewer)` gets its own id in the inner
/// aggregator, so the deployment's per-stream figures are the sum of the servers'.
/// Per-server figures come from [`servers`](Self::servers) and, as metrics with a `server`
/// label, from [`metrics`](Self::metrics).
#[derive(Debug)]
pub struct DeploymentAggregator {
    inner: Aggregator,
    hold: usize,
    max_sources: usize,
    max_viewers: usize,
    sources: HashMap<(String, u64), Source>,
    viewers: HashMap<(u64, u64, String), u64>,
    next_viewer: u64,
    servers: BTreeMap<String, ServerFigures>,
    over_source_cap: u64,
    malformed: u64,
}

impl DeploymentAggregator {
    /// An empty aggregator; `config` is the inner [`Aggregator`]'s (its viewer cap also caps
    /// the viewer-id map).
    pub fn new(config: AggregatorConfig) -> DeploymentAggregator {
        let max_viewers = config.viewer_cap();
        DeploymentAggregator {
            inner: Aggregator::new(config),
            hold: DEFAULT_HOLD,
            max_sources: DEFAULT_MAX_SOURCES,
            max_viewers,
            sources: HashMap::new(),
            viewers: HashMap::new(),
            next_viewer: 1,
            servers: BTreeMap::new(),
            over_source_cap: 0,
            malformed: 0,
        }
    }

    /// Events held per run while an earlier one is missing (default [`DEFAULT_HOLD`]).
    /// More tolerates longer reordering; past it the missing events are counted as a gap.
    pub fn hold(&mut self, events: usize) -> &mut Self {
        self.hold = events.max(1);
        self
    }

    /// Most server runs tracked (default [`DEFAULT_MAX_SOURCES`]); events of further runs
    /// are skipped and counted.
    pub fn max_sources(&mut self, runs: usize) -> &mut Self {
        self.max_sources = runs.max(1);
        self
    }

    /// Applies one message: `id` from its `Nats-Msg-Id`, `record` its body, `at` the instant
    /// its `at_ms` stands for (see [`EventClock`]).
    pub fn apply(&mut self, id: &MessageId, record: Input, at: Instant) -> Outcome {
        let key = (id.server.clone(), id.run);
        if !self.sources.contains_key(&key) {
            if self.sources.len() >= self.max_sources {
                self.over_source_cap += 1;
                return Outcome::OverSourceCap;
            }
            self.servers.entry(id.server.clone()).or_default().runs += 1;
            self.sources.insert(
                key.clone(),
                Source {
                    server: id.server.clone(),
                    next: 1,
                    held: BTreeMap::new(),
                },
            );
        }
        let source = self.sources.get_mut(&key).expect("inserted above");
        if id.seq < source.next || source.held.contains_key(&id.seq) {
            self.servers
                .entry(id.server.clone())
                .or_default()
                .duplicates += 1;
            return Outcome::Duplicate;
        }
        if id.seq > source.next {
            source.held.insert(id.seq, (record, at));
            if source.held.len() <= self.hold {
                return Outcome::Held;
            }
            // Waited long enough: what is missing before the oldest held is lost.
            let (&first, _) = source.held.first_key_value().expect("not empty");
            let skipped = first - source.next;
            source.next = first;
            self.servers.entry(id.server.clone()).or_default().gaps += skipped;
            return Outcome::Applied(self.release(&key));
        }
        source.next += 1;
        self.apply_in_order(&key, record, at);
        Outcome::Applied(1 + self.release(&key))
    }

    /// Applies held events of `key` that are next in sequence; returns how many.
    fn release(&mut self, key: &(String, u64)) -> usize {
        let mut n = 0;
        loop {
            let source = self.sources.get_mut(key).expect("known source");
            let Some(entry) = source.held.first_entry() else {
                break;
            };
            if *entry.key() != source.next {
                break;
            }
            let (input, at) = entry.remove();
            source.next += 1;
            self.apply_in_order(key, input, at);
            n += 1;
        }
        n
    }

    fn apply_in_order(&mut self, key: &(String, u64), mut input: Input, at: Instant) {
        let source = &self.sources[key];
        let figures = self.servers.entry(source.server.clone()).or_default();
        figures.applied += 1;
        let vkey = (key.1, input.viewer, source.server.clone());
        match input.kind {
            InputKind::Join { .. } => {
                figures.joins += 1;
                if !self.viewers.contains_key(&vkey) && self.viewers.len() < self.max_viewers {
                    figures.viewers += 1;
                    self.viewers.insert(vkey.clone(), self.next_viewer);
                    self.next_viewer += 1;
                }
            }
            InputKind::Leave { .. } if self.viewers.contains_key(&vkey) => {
                figures.viewers = figures.viewers.saturating_sub(1);
            }
            _ => {}
        }
        // A viewer not in the map (over the cap) gets id 0, which the inner aggregator
        // never sees joined, so it counts the event as from an unknown viewer.
        input.viewer = self.viewers.get(&vkey).copied().unwrap_or(0);
        self.inner.apply(&input, at);
        if matches!(input.kind, InputKind::Leave { .. }) {
            self.viewers.remove(&vkey);
        }
    }

    /// Counts a message that could not be read (no or bad id, bad body); it is skipped.
    pub fn malformed(&mut self) {
        self.malformed += 1;
    }

    /// Figures per server id.
    pub fn servers(&self) -> &BTreeMap<String, ServerFigures> {
        &self.servers
    }

    /// Events applied, all servers.
    pub fn applied(&self) -> u64 {
        self.inner.applied()
    }

    /// Events waiting for an earlier one of their run.
    pub fn held(&self) -> usize {
        self.sources.values().map(|s| s.held.len()).sum()
    }

    /// The deployment's figures at `now`, as one server's [`Aggregator::snapshot`].
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        self.inner.snapshot(now)
    }

    /// Metrics with a `server` label (viewers, joins, events applied, duplicates, gaps) and
    /// the deployment's own counters, to pass to [`render`](super::render) with the snapshot.
    pub fn metrics(&self) -> Vec<Metric> {
        let mut out = Vec::new();
        let metric = |name: &str, help: &str, kind, value: u64, server: Option<&str>| Metric {
            name: name.into(),
            help: help.into(),
            kind,
            value: value as f64,
            labels: server
                .map(|s| vec![("server".to_string(), s.to_string())])
                .unwrap_or_default(),
        };
        type Field = fn(&ServerFigures) -> u64;
        let families: [(&str, &str, MetricKind, Field); 6] = [
            (
                "quicast_server_viewers",
                "Viewers watching now, by server.",
                MetricKind::Gauge,
                |f| f.viewers,
            ),
            (
                "quicast_server_joins_total",
                "Viewers that joined, by server.",
                MetricKind::Counter,
                |f| f.joins,
            ),
            (
                "quicast_server_events_applied_total",
                "Events applied, by the server that accepted them.",
                MetricKind::Counter,
                |f| f.applied,
            ),
            (
                "quicast_server_events_duplicate_total",
                "Messages skipped as already applied, by server.",
                MetricKind::Counter,
                |f| f.duplicates,
            ),
            (
                "quicast_server_events_missing_total",
                "Events never received (sequence gaps skipped), by server.",
                MetricKind::Counter,
                |f| f.gaps,
            ),
            (
                "quicast_server_runs_total",
                "Server starts seen, by server.",
                MetricKind::Counter,
                |f| f.runs,
            ),
        ];
        for (name, help, kind, field) in families {
            for (server, f) in &self.servers {
                out.push(metric(name, help, kind, field(f), Some(server)));
            }
        }
        out.push(metric(
            "quicast_deployment_events_held",
            "Events waiting for an earlier event of their server run.",
            MetricKind::Gauge,
            self.held() as u64,
            None,
        ));
        out.push(metric(
            "quicast_deployment_events_malformed_total",
            "Messages without a valid id or body (skipped).",
            MetricKind::Counter,
            self.malformed,
            None,
        ));
        out.push(metric(
            "quicast_deployment_events_over_run_cap_total",
            "Events of server runs beyond the tracked-run cap (skipped).",
            MetricKind::Counter,
            self.over_source_cap,
            None,
        ));
        out
    }
}

/// Maps the servers' wall-clock `at_ms` to the instants the [`Aggregator`] takes.
///
/// The first event seen stands for `anchor`; later ones are placed by their distance from
/// it, and never before an instant already handed out, since the aggregator's windows and
/// watch time expect time to move forward (servers' clocks differ a little).
#[derive(Debug, Clone)]
pub struct EventClock {
    anchor: Instant,
    first_ms: Option<u64>,
    high: Instant,
}

impl EventClock {
    /// A clock whose first event will stand for `anchor`.
    pub fn new(anchor: Instant) -> EventClock {
        EventClock {
            anchor,
            first_ms: None,
            high: anchor,
        }
    }

    fn map(&self, ms: u64) -> Instant {
        let first = self.first_ms.unwrap_or(ms);
        self.anchor + Duration::from_millis(ms.saturating_sub(first))
    }

    /// The instant of an event accepted at `at_ms`.
    pub fn event(&mut self, at_ms: u64) -> Instant {
        self.first_ms.get_or_insert(at_ms);
        self.high = self.high.max(self.map(at_ms));
        self.high
    }

    /// The instant to read a snapshot at when the wall clock says `wall_ms`.
    pub fn now(&self, wall_ms: u64) -> Instant {
        self.high.max(self.map(wall_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Report;

    #[test]
    fn names_are_single_tokens_and_distinct() {
        let n = Names::new("prod-eu_1").unwrap();
        assert_eq!(n.stream(), "QUICAST_prod-eu_1");
        assert_eq!(n.subject("live"), "quicast.prod-eu_1.events.live");
        assert_eq!(n.wildcard(), "quicast.prod-eu_1.events.>");
        assert_eq!(subject_token("a.b *>"), "a%2Eb%20%2A%3E");
        assert_eq!(subject_token("%2E"), "%252E");
        assert_eq!(subject_token(""), "%");
        assert_eq!(subject_token("é"), "%C3%A9");
        for bad in ["", "a.b", "a b", "*", ">", "é", &"x".repeat(65)] {
            assert!(Names::new(bad).is_err(), "{bad:?}");
        }
        // Every token is one NATS token: no separators or wildcards, never empty.
        for s in ["", ".", "a.b", "*", ">", " ", "\t", "x%y"] {
            let t = subject_token(s);
            assert!(
                !t.is_empty() && !t.contains(['.', '*', '>', ' ', '\t']),
                "{t}"
            );
        }
    }

    #[test]
    fn message_ids_round_trip_and_reject_junk() {
        let id = MessageId {
            server: "edge-1".into(),
            run: 0x018d_abcd,
            seq: 42,
        };
        assert_eq!(id.to_string(), "edge-1:18dabcd:42");
        assert_eq!(MessageId::parse(&id.to_string()), Some(id));
        for bad in [
            "",
            "edge-1",
            "edge-1:1",
            "edge-1:1:2:3",
            ":1:2",
            "a.b:1:2",
            "a:+1:2",
            "a:1:+2",
            "a:xyz:2",
            "a:1:",
            "a:11111111111111111:2",
            "a:1:99999999999999999999999",
        ] {
            assert_eq!(MessageId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_message_is_an_event_log_line_with_the_server() {
        let input = Input {
            viewer: 7,
            stream: "live".into(),
            kind: InputKind::Stall,
        };
        let rec = ServerRecord {
            server: "edge-1".into(),
            record: LogRecord {
                run: Some("19ad4b2e1f0-3a1c".into()),
                unix_ms: Some(1_764_700_000_123),
                at_ms: 1_000,
                peer: None,
                input: Cow::Borrowed(&input),
            },
        };
        let line = serde_json::to_string(&rec).unwrap();
        assert_eq!(
            line,
            r#"{"server":"edge-1","run":"19ad4b2e1f0-3a1c","unix_ms":1764700000123,"at_ms":1000,"viewer":7,"stream":"live","kind":{"type":"stall"}}"#
        );
        let back: ServerRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, rec);
        // And the body is still a log line.
        let log: LogRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(*log.input, input);
    }

    #[test]
    fn outbox_numbers_on_entry_refuses_at_its_limit_and_keeps_until_acked() {
        let mut o: Outbox = Outbox::new(3);
        for i in 1..=3 {
            assert_eq!(o.push(Bytes::from(vec![i as u8])), Ok(i));
        }
        assert_eq!(o.push(Bytes::new()), Err(Full));
        assert_eq!(o.refused(), 1);
        assert!(o.ack(2));
        assert!(!o.ack(2), "acked once");
        let left: Vec<u64> = o.oldest(10).map(|(s, _)| s).collect();
        assert_eq!(left, [1, 3]);
        // The refused event took no number: the run's numbers have no gap.
        assert_eq!(o.push(Bytes::new()), Ok(4));
        assert_eq!(o.oldest(2).map(|(s, _)| s).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(o.len(), 3);
    }

    fn event(viewer: u64, kind: InputKind) -> Input {
        Input {
            viewer,
            stream: "live".into(),
            kind,
        }
    }

    fn join(viewer: u64) -> Input {
        event(
            viewer,
            InputKind::Join {
                agent: "test".into(),
            },
        )
    }

    fn leave(viewer: u64) -> Input {
        event(
            viewer,
            InputKind::Leave {
                reason: "bye".into(),
            },
        )
    }

    fn id(server: &str, run: u64, seq: u64) -> MessageId {
        MessageId {
            server: server.into(),
            run,
            seq,
        }
    }

    #[test]
    fn same_viewer_ids_on_two_servers_are_two_viewers() {
        let t = Instant::now();
        let mut d = DeploymentAggregator::new(AggregatorConfig::default());
        for s in ["a", "b"] {
            assert_eq!(d.apply(&id(s, 1, 1), join(1), t), Outcome::Applied(1));
        }
        // A restarted "a" (new run) reuses viewer id 1.
        assert_eq!(d.apply(&id("a", 2, 1), join(1), t), Outcome::Applied(1));
        let snap = d.snapshot(t);
        assert_eq!(snap.streams["live"].viewers, 3);
        assert_eq!(d.servers()["a"].viewers, 2);
        assert_eq!(d.servers()["a"].runs, 2);
        assert_eq!(d.apply(&id("b", 1, 2), leave(1), t), Outcome::Applied(1));
        assert_eq!(d.servers()["b"].viewers, 0);
        assert_eq!(d.snapshot(t).streams["live"].viewers, 2);
        let m = d.metrics();
        let viewers = |s: &str| {
            m.iter()
                .find(|m| {
                    m.name == "quicast_server_viewers" && m.labels[0] == ("server".into(), s.into())
                })
                .unwrap()
                .value
        };
        assert_eq!((viewers("a"), viewers("b")), (2.0, 0.0));
    }

    #[test]
    fn duplicates_are_skipped_and_early_events_wait_for_their_turn() {
        let t = Instant::now();
        let mut d = DeploymentAggregator::new(AggregatorConfig::default());
        let report = |sent| {
            event(
                1,
                InputKind::Report {
                    report: Report::default(),
                    sent_shards: sent,
                },
            )
        };
        // The join is stored after the report that needs it.
        assert_eq!(d.apply(&id("a", 1, 2), report(10), t), Outcome::Held);
        assert_eq!(d.apply(&id("a", 1, 2), report(10), t), Outcome::Duplicate);
        assert_eq!(d.applied(), 0);
        assert_eq!(d.apply(&id("a", 1, 1), join(1), t), Outcome::Applied(2));
        assert_eq!(d.apply(&id("a", 1, 1), join(1), t), Outcome::Duplicate);
        assert_eq!(d.apply(&id("a", 1, 2), report(10), t), Outcome::Duplicate);
        assert_eq!(d.applied(), 2);
        let snap = d.snapshot(t);
        assert_eq!(
            snap.ignored.unknown_viewer, 0,
            "the report found its viewer"
        );
        assert_eq!(d.servers()["a"].duplicates, 3);
        assert_eq!(d.servers()["a"].applied, 2);
        assert_eq!(d.held(), 0);
    }

    #[test]
    fn a_gap_that_never_fills_is_skipped_after_the_hold_and_counted() {
        let t = Instant::now();
        let mut d = DeploymentAggregator::new(AggregatorConfig::default());
        d.hold(2);
        assert_eq!(d.apply(&id("a", 1, 1), join(1), t), Outcome::Applied(1));
        // 2 and 3 never come.
        assert_eq!(
            d.apply(&id("a", 1, 4), event(1, InputKind::Stall), t),
            Outcome::Held
        );
        assert_eq!(
            d.apply(&id("a", 1, 5), event(1, InputKind::Resume), t),
            Outcome::Held
        );
        assert_eq!(d.apply(&id("a", 1, 6), leave(1), t), Outcome::Applied(3));
        assert_eq!(d.servers()["a"].gaps, 2);
        assert_eq!(d.servers()["a"].applied, 4);
        assert_eq!(d.servers()["a"].viewers, 0);
        // A late 3 is now a duplicate of nothing we can apply in order.
        assert_eq!(
            d.apply(&id("a", 1, 3), event(1, InputKind::Stall), t),
            Outcome::Duplicate
        );
    }

    #[test]
    fn runs_beyond_the_cap_are_skipped_and_counted() {
        let t = Instant::now();
        let mut d = DeploymentAggregator::new(AggregatorConfig::default());
        d.max_sources(1);
        assert_eq!(d.apply(&id("a", 1, 1), join(1), t), Outcome::Applied(1));
        assert_eq!(d.apply(&id("b", 1, 1), join(1), t), Outcome::OverSourceCap);
        let m = d.metrics();
        assert!(m
            .iter()
            .any(|m| m.name == "quicast_deployment_events_over_run_cap_total" && m.value == 1.0));
    }

    #[test]
    fn the_event_clock_keeps_spacing_and_never_goes_back() {
        let t0 = Instant::now();
        let mut c = EventClock::new(t0);
        assert_eq!(c.event(10_000), t0);
        assert_eq!(c.event(12_500), t0 + Duration::from_millis(2_500));
        // Another server's clock is a little behind: time does not go back.
        assert_eq!(c.event(12_000), t0 + Duration::from_millis(2_500));
        assert_eq!(c.now(20_000), t0 + Duration::from_secs(10));
        assert_eq!(c.now(11_000), t0 + Duration::from_millis(2_500));
    }
}
