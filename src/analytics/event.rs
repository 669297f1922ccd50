//! What the server feeds the [`Aggregator`](super::Aggregator), one value per control message.
//!
//! The same values are written to the JSON-lines event log (one [`LogRecord`] per accepted
//! event), so the log replays into an identical aggregator.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::wire::{ClientEvent, Report};

/// One analytics event about one viewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// Server-assigned viewer id, unique for the server's lifetime.
    pub viewer: u64,
    /// Stream the viewer watches. The aggregator reads it only on [`InputKind::Join`]: a
    /// viewer's stream is fixed when it joins, so later events skip the name lookup.
    pub stream: String,
    /// What happened.
    pub kind: InputKind,
}

/// What happened to a viewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum InputKind {
    /// The viewer was admitted (after `Hello` was accepted).
    Join {
        /// The viewer's free-form client agent.
        #[serde(with = "crate::wire::compact")]
        agent: String,
    },
    /// A periodic report, already cleaned by a [`Validator`](super::Validator).
    Report {
        /// The viewer's cumulative counters.
        report: Report,
        /// Datagrams the server has sent this viewer since it joined, read when the report
        /// arrived. Loss before FEC is derived from how this and
        /// [`Report::shards_received`] grow between reports.
        sent_shards: u64,
    },
    /// Playback stalled (the viewer's buffer ran dry).
    Stall,
    /// Playback resumed after a stall.
    Resume,
    /// An application event; counted per stream, otherwise only logged.
    App(ClientEvent),
    /// The viewer left: `Leave`, a closed connection, or a timeout.
    Leave {
        /// Why, for the log. quicast's server writes `viewer left` for every
        /// clean end the viewer chose (`Leave`, a finished control stream, a
        /// close with code `normal`); otherwise the close code's name and the
        /// reason (`shutdown: server shutting down`, `publisher_failed: ...`,
        /// `protocol_violation: ...`), `idle timeout`, or `viewer closed:
        /// <code>: <reason>` quoting the viewer's own close reason.
        #[serde(with = "crate::wire::compact")]
        reason: String,
    },
}

impl InputKind {
    /// Short name of the event type, for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            InputKind::Join { .. } => "join",
            InputKind::Report { .. } => "report",
            InputKind::Stall => "stall",
            InputKind::Resume => "resume",
            InputKind::App(_) => "app",
            InputKind::Leave { .. } => "leave",
        }
    }
}

/// One line of the JSON-lines event log: an [`Input`], when it was accepted, and which run
/// of the server wrote it.
///
/// - `run`: an id of the server run that wrote the line (quicast's server: the start time in
///   Unix milliseconds and the process id, in hex, `18f3a2b4c5d-1a2b`). Viewer ids and `at_ms`
///   start over in each run, so `(run, viewer)` names one viewer.
/// - `unix_ms`: wall-clock time the event was accepted, milliseconds since the Unix epoch.
/// - `at_ms`: milliseconds since the run started, on a monotonic clock (never steps back);
///   the aggregator never reads it. It is there so a log can be replayed with the same
///   spacing, which windows and watch time depend on.
/// - `peer`: the viewer's address (`ip:port`), on its `join` and `leave` lines.
///
/// ```
/// use std::borrow::Cow;
/// use quicast::analytics::{Input, InputKind, LogRecord};
///
/// let input = Input { viewer: 7, stream: "live".into(), kind: InputKind::Stall };
/// let record = LogRecord {
///     run: Some("18f3a2b4c5d-1a2b".into()),
///     unix_ms: Some(1_764_700_000_000),
///     at_ms: 1_000,
///     peer: None,
///     input: Cow::Borrowed(&input),
/// };
/// let line = serde_json::to_string(&record)?;
/// assert_eq!(
///     line,
///     r#"{"run":"18f3a2b4c5d-1a2b","unix_ms":1764700000000,"at_ms":1000,"viewer":7,"stream":"live","kind":{"type":"stall"}}"#
/// );
/// let back: LogRecord = serde_json::from_str(&line)?;
/// assert_eq!(*back.input, input);
/// // Lines without the newer fields still read.
/// let old: LogRecord = serde_json::from_str(r#"{"at_ms":5,"viewer":7,"stream":"live","kind":{"type":"stall"}}"#)?;
/// assert_eq!((old.run, old.unix_ms, old.at_ms), (None, None, 5));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord<'a> {
    /// The server run that wrote the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Cow<'a, str>>,
    /// Wall-clock time the event was accepted, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_ms: Option<u64>,
    /// When the event was accepted, milliseconds since the run started (monotonic).
    pub at_ms: u64,
    /// The viewer's address, on `join` and `leave` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<std::net::SocketAddr>,
    /// The event; borrowed when writing, owned when reading back.
    #[serde(flatten)]
    pub input: Cow<'a, Input>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_a_log_line() {
        let kinds = [
            InputKind::Join {
                agent: "quicast-client/0.1".into(),
            },
            InputKind::Report {
                report: Report {
                    blocks_delivered: 10,
                    shards_received: 140,
                    latency_p99_us: 25_000,
                    ..Report::default()
                },
                sent_shards: 150,
            },
            InputKind::Stall,
            InputKind::Resume,
            InputKind::App(ClientEvent {
                name: "quality".into(),
                value: "720p \"hd\"\n".into(),
            }),
            InputKind::Leave {
                reason: "bye".into(),
            },
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            let input = Input {
                viewer: i as u64,
                stream: "live".into(),
                kind,
            };
            let line = serde_json::to_string(&LogRecord {
                run: Some("r1".into()),
                unix_ms: Some(1_764_700_000_000),
                at_ms: 42,
                peer: Some("[::1]:4433".parse().unwrap()),
                input: Cow::Borrowed(&input),
            })
            .unwrap();
            // One event per line: embedded newlines must be escaped.
            assert!(!line.contains('\n'), "{line}");
            assert!(line.contains(input.kind.name()), "{line}");
            let back: LogRecord = serde_json::from_str(&line).unwrap();
            assert_eq!(back.at_ms, 42);
            assert_eq!(back.run.as_deref(), Some("r1"));
            assert_eq!(back.unix_ms, Some(1_764_700_000_000));
            assert_eq!(back.peer, Some("[::1]:4433".parse().unwrap()));
            assert_eq!(*back.input, input, "{line}");
        }
    }
}
