//! Server side of the analytics pipeline: connection tasks → bounded queue →
//! one task that applies events to the pure [`Aggregator`], writes the JSON-lines
//! log, and feeds each viewer's parity table and [`Summary`] back.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    sync::{mpsc, watch},
};
use tracing::warn;

use crate::{
    analytics::{Aggregator, Input, InputKind, LogRecord},
    wire::Summary,
};

/// What the analytics task tells one viewer's connection after its reports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Feedback {
    /// The shard loss to plan the viewer's parity for (see
    /// [`Aggregator::viewer_loss`]); `None` until the first estimate.
    pub(crate) loss: Option<f64>,
    /// The viewer's and its stream's figures, sent back as `Summary`.
    pub(crate) summary: Option<Summary>,
}

pub(crate) enum Msg {
    Event {
        input: Input,
        /// With `Join`: where this viewer's feedback goes.
        feedback: Option<watch::Sender<Feedback>>,
        /// With `Join`: the viewer's address, for its log lines.
        peer: Option<SocketAddr>,
    },
    /// Shutdown: apply what is queued, then stop accepting.
    Close,
}

/// The sending half, shared by every connection task.
pub(crate) struct Pipeline {
    tx: mpsc::Sender<Msg>,
    pub(crate) aggregator: Arc<Mutex<Aggregator>>,
    pub(crate) accepted: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Lines written to the event log and flushed.
    pub(crate) logged: Arc<AtomicU64>,
    /// Lines that could not be written (the event was applied, not logged).
    pub(crate) log_errors: Arc<AtomicU64>,
    pub(crate) done: watch::Receiver<bool>,
}

impl Pipeline {
    /// Queues an event without waiting. A full queue drops it (counted): a
    /// connection never waits on analytics for reports and app events.
    pub(crate) fn offer(&self, input: Input) {
        match self.tx.try_send(Msg::Event {
            input,
            feedback: None,
            peer: None,
        }) {
            Ok(()) => {
                self.accepted.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Queues a Join (with its feedback channel and the viewer's address) or a
    /// Leave, waiting (at most a second) for room: the viewer counts are wrong
    /// forever if one of these is lost.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled send enqueues nothing and counts nothing.
    pub(crate) async fn send(
        &self,
        input: Input,
        feedback: Option<watch::Sender<Feedback>>,
        peer: Option<SocketAddr>,
    ) {
        let msg = Msg::Event {
            input,
            feedback,
            peer,
        };
        match tokio::time::timeout(Duration::from_secs(1), self.tx.send(msg)).await {
            Ok(Ok(())) => {
                self.accepted.fetch_add(1, Relaxed);
            }
            _ => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Applies everything queued, stops accepting, and waits (at most `grace`)
    /// until the log is flushed.
    pub(crate) async fn close(&self, grace: Duration) {
        let _ = tokio::time::timeout(grace, async {
            let _ = self.tx.send(Msg::Close).await;
            let mut done = self.done.clone();
            let _ = done.wait_for(|d| *d).await;
        })
        .await;
    }
}

/// Where the event log goes and how big it may grow.
#[derive(Debug, Clone)]
pub(crate) struct LogConfig {
    pub(crate) path: PathBuf,
    /// Bytes one file may reach before it is rotated.
    pub(crate) max_bytes: u64,
    /// Rotated files kept (`path.1` newest .. `path.N` oldest).
    pub(crate) keep: usize,
}

/// Creates the pipeline and the task future that drains it.
pub(crate) fn pipeline(
    aggregator: Aggregator,
    capacity: usize,
    log: Option<LogConfig>,
    nats: Option<super::nats::Tap>,
) -> (
    Pipeline,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let (done_tx, done) = watch::channel(false);
    let aggregator = Arc::new(Mutex::new(aggregator));
    let logged = Arc::new(AtomicU64::new(0));
    let log_errors = Arc::new(AtomicU64::new(0));
    let counts = LogCounts {
        logged: logged.clone(),
        errors: log_errors.clone(),
    };
    let task = drain(aggregator.clone(), rx, log, counts, done_tx, nats);
    (
        Pipeline {
            tx,
            aggregator,
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            logged,
            log_errors,
            done,
        },
        task,
    )
}

struct LogCounts {
    logged: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

/// The JSON-lines event log: each batch written and flushed before it
/// counts as logged, one file capped at `max_bytes`, then rotated.
struct LogWriter {
    config: LogConfig,
    file: Option<tokio::fs::File>,
    /// Bytes in the current file.
    size: u64,
    /// Whether the last write failed (warn once per run of failures).
    failing: bool,
}

impl LogWriter {
    /// Opens the log for a new run: a previous run's file is rotated away
    /// first (to `path.1`, ...), so each run starts a file of its own.
    async fn open(config: LogConfig) -> LogWriter {
        let mut w = LogWriter {
            config,
            file: None,
            size: 0,
            failing: false,
        };
        // Only a regular file is rotated: a device or pipe (`/dev/full`,
        // a FIFO to a collector) is written to as it is.
        let previous = tokio::fs::metadata(&w.config.path)
            .await
            .is_ok_and(|m| m.is_file() && m.len() > 0);
        let opened = if previous {
            w.rotate().await
        } else {
            w.reopen(false).await
        };
        if let Err(e) = opened {
            w.failed(&e);
        }
        w
    }

    async fn reopen(&mut self, truncate: bool) -> std::io::Result<()> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .open(&self.config.path)
            .await?;
        self.size = file.metadata().await.map_or(0, |m| m.len());
        self.file = Some(file);
        Ok(())
    }

    fn failed(&mut self, e: &std::io::Error) {
        if !std::mem::replace(&mut self.failing, true) {
            warn!(path = %self.config.path.display(), error = %e, "event log write failed; events are applied but not logged (counted in events_log_errors)");
        }
    }

    /// Writes `lines` (whole lines, each ending in `\n`) and flushes them;
    /// `Ok` once they are in the file.
    ///
    /// A batch is split at line ends so that no file grows past its cap: a
    /// batch can be far larger than the cap when many events arrive while a
    /// write is in flight. Only a single line longer than the cap makes a
    /// file larger, alone in it.
    async fn write(&mut self, mut lines: &[u8]) -> std::io::Result<()> {
        while !lines.is_empty() {
            let room = self.config.max_bytes.saturating_sub(self.size);
            let window = &lines[..lines.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
            let mut take = window
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            if take == 0 {
                if self.size > 0 {
                    self.rotate().await?;
                    continue;
                }
                take = lines
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(lines.len(), |i| i + 1);
            }
            let (chunk, rest) = lines.split_at(take);
            self.write_chunk(chunk).await?;
            lines = rest;
        }
        Ok(())
    }

    async fn write_chunk(&mut self, lines: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            // A log that could not be opened is tried again, once per batch.
            self.reopen(false).await?;
        }
        let file = self.file.as_mut().expect("opened above");
        let result = async {
            file.write_all(lines).await?;
            // tokio's File writes in the background; flush waits for it and
            // reports its error.
            file.flush().await
        }
        .await;
        match result {
            Ok(()) => {
                self.size += lines.len() as u64;
                if std::mem::replace(&mut self.failing, false) {
                    warn!(path = %self.config.path.display(), "event log writable again");
                }
                Ok(())
            }
            Err(e) => {
                // Part of the batch may be in the file; start clean next time.
                self.file = None;
                Err(e)
            }
        }
    }

    /// `path` → `path.1` → ... → `path.keep` (the oldest is replaced).
    async fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let path = &self.config.path;
        let numbered = |i: usize| {
            let mut p = path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.config.keep == 0 {
            return self.reopen(true).await;
        }
        for i in (1..self.config.keep).rev() {
            let _ = tokio::fs::rename(numbered(i), numbered(i + 1)).await;
        }
        tokio::fs::rename(path, numbered(1)).await?;
        self.reopen(true).await
    }
}

async fn drain(
    aggregator: Arc<Mutex<Aggregator>>,
    mut rx: mpsc::Receiver<Msg>,
    log: Option<LogConfig>,
    counts: LogCounts,
    done: watch::Sender<bool>,
    nats: Option<super::nats::Tap>,
) {
    let mut log = match log {
        Some(config) => Some(LogWriter::open(config).await),
        None => None,
    };
    let mut pending_lines = 0u64;
    let epoch = Instant::now();
    let started = std::time::SystemTime::now();
    let run = run_id(started);
    let mut feedback: HashMap<u64, watch::Sender<Feedback>> = HashMap::new();
    let mut peers: HashMap<u64, SocketAddr> = HashMap::new();
    let mut batch = Vec::with_capacity(256);
    let mut lines = Vec::with_capacity(64 * 1024);
    let mut reported = Vec::new();
    loop {
        if rx.recv_many(&mut batch, 256).await == 0 {
            break;
        }
        let now = Instant::now();
        let elapsed = now.duration_since(epoch);
        let at_ms = elapsed.as_millis() as u64;
        // Wall clock from the run's start plus the monotonic time since, so
        // the lines never go back in time if the system clock is stepped.
        let unix_ms = unix_ms(started + elapsed);
        let mut closing = false;
        {
            let mut agg = aggregator.lock().unwrap_or_else(|e| e.into_inner());
            for msg in batch.drain(..) {
                let (input, fb, peer) = match msg {
                    Msg::Event {
                        input,
                        feedback,
                        peer,
                    } => (input, feedback, peer),
                    Msg::Close => {
                        closing = true;
                        continue;
                    }
                };
                agg.apply(&input, now);
                if let Some(peer) = peer {
                    peers.insert(input.viewer, peer);
                }
                if log.is_some() || nats.is_some() {
                    let peer = match input.kind {
                        InputKind::Join { .. } | InputKind::Leave { .. } => {
                            peers.get(&input.viewer).copied()
                        }
                        _ => None,
                    };
                    let record = LogRecord {
                        run: Some(std::borrow::Cow::Borrowed(&run)),
                        unix_ms: Some(unix_ms),
                        at_ms,
                        peer,
                        input: std::borrow::Cow::Borrowed(&input),
                    };
                    // Every applied event goes to NATS too, without waiting.
                    if let Some(tap) = &nats {
                        tap.offer(&record);
                    }
                    if log.is_some() {
                        if serde_json::to_writer(&mut lines, &record).is_ok() {
                            lines.push(b'\n');
                            pending_lines += 1;
                        } else {
                            counts.errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                match input.kind {
                    InputKind::Join { .. } => {
                        if let Some(fb) = fb {
                            feedback.insert(input.viewer, fb);
                        }
                    }
                    InputKind::Report { .. } => reported.push(input.viewer),
                    InputKind::Leave { .. } => {
                        feedback.remove(&input.viewer);
                        peers.remove(&input.viewer);
                    }
                    _ => {}
                }
            }
            for viewer in reported.drain(..) {
                if let Some(tx) = feedback.get(&viewer) {
                    tx.send_replace(Feedback {
                        loss: agg.viewer_loss(viewer),
                        summary: agg.viewer_summary(viewer, now),
                    });
                }
            }
        }
        if let Some(w) = log.as_mut() {
            if !lines.is_empty() {
                let n = std::mem::take(&mut pending_lines);
                match w.write(&lines).await {
                    Ok(()) => counts.logged.fetch_add(n, Relaxed),
                    Err(e) => {
                        w.failed(&e);
                        counts.errors.fetch_add(n, Relaxed)
                    }
                };
                lines.clear();
            }
        }
        if closing {
            // Nothing is accepted after this; what was accepted is applied below.
            rx.close();
        }
    }
    // Every batch was flushed as it was written: nothing is left to lose.
    drop(log);
    // The NATS publisher sees the end of its input and flushes what it holds.
    drop(nats);
    done.send_replace(true);
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The id of this server run in the event log: its start in Unix ms and the
/// process id, in hex. Two runs of one process differ by their start time.
fn run_id(started: std::time::SystemTime) -> String {
    format!("{:x}-{:x}", unix_ms(started), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn log_rotates_at_its_cap_and_keeps_the_configured_files() {
        let dir = std::env::temp_dir().join(format!("quicast-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut w = LogWriter::open(LogConfig {
            path: path.clone(),
            max_bytes: 100,
            keep: 2,
        })
        .await;
        let line = [b'x'; 38];
        for i in 0..20u8 {
            let mut batch = line.to_vec();
            batch.push(b'0' + i % 10);
            batch.push(b'\n');
            w.write(&batch).await.unwrap();
        }
        let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let rotated = |i| dir.join(format!("events.jsonl.{i}"));
        // 40-byte batches, 100-byte files: two batches per file.
        assert_eq!(size(&path), 80);
        assert_eq!(size(&rotated(1)), 80);
        assert_eq!(size(&rotated(2)), 80);
        assert!(!rotated(3).exists(), "only `keep` rotated files");
        // The newest batch is in the current file.
        let current = std::fs::read(&path).unwrap();
        assert_eq!(current.last(), Some(&b'\n'));
        assert_eq!(current[current.len() - 2], b'9');
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_cap_is_split_at_line_ends() {
        let dir = std::env::temp_dir().join(format!("quicast-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut w = LogWriter::open(LogConfig {
            path: path.clone(),
            max_bytes: 100,
            keep: 3,
        })
        .await;
        // Seven 30-byte lines in one batch: three fit a 100-byte file.
        let batch: Vec<u8> = (0..7u8)
            .flat_map(|i| {
                let mut l = vec![b'a' + i; 29];
                l.push(b'\n');
                l
            })
            .collect();
        w.write(&batch).await.unwrap();
        let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_default();
        let rotated = |i| dir.join(format!("events.jsonl.{i}"));
        assert_eq!(read(&rotated(2)).len(), 90);
        assert_eq!(read(&rotated(1)).len(), 90);
        assert_eq!(read(&path), [vec![b'g'; 29], vec![b'\n']].concat());
        // Nothing lost or repeated, in order.
        let all = [read(&rotated(2)), read(&rotated(1)), read(&path)].concat();
        assert_eq!(all, batch);
        // A line longer than the cap goes alone into a file of its own.
        let mut long = vec![b'z'; 150];
        long.push(b'\n');
        w.write(&long).await.unwrap();
        assert_eq!(read(&path), long);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn each_run_starts_a_new_file_and_keeps_the_previous_one() {
        let dir = std::env::temp_dir().join(format!("quicast-runs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let config = LogConfig {
            path: path.clone(),
            max_bytes: u64::MAX,
            keep: 3,
        };
        for run in [b"run 1\n", b"run 2\n", b"run 3\n"] {
            let mut w = LogWriter::open(config.clone()).await;
            w.write(run).await.unwrap();
        }
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        assert_eq!(read(path.clone()), "run 3\n");
        assert_eq!(read(dir.join("events.jsonl.1")), "run 2\n");
        assert_eq!(read(dir.join("events.jsonl.2")), "run 1\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failing_log_reports_every_write() {
        let mut w = LogWriter::open(LogConfig {
            path: "/dev/full".into(),
            max_bytes: u64::MAX,
            keep: 0,
        })
        .await;
        for _ in 0..3 {
            assert!(w.write(b"{}\n").await.is_err());
        }
    }
}
