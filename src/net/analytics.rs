//! Server side of the analytics pipeline: connection tasks → bounded queue →
//! one task that applies events to the pure [`Aggregator`], writes the JSON-lines
//! log, and feeds each viewer's parity table and [`Summary`] back.

use std::{
    collections::HashMap,
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
    pub(crate) logged: Arc<AtomicU64>,
    pub(crate) done: watch::Receiver<bool>,
}

impl Pipeline {
    /// Queues an event without waiting. A full queue drops it (counted): a
    /// connection never waits on analytics for reports and app events.
    pub(crate) fn offer(&self, input: Input) {
        match self.tx.try_send(Msg::Event {
            input,
            feedback: None,
        }) {
            Ok(()) => {
                self.accepted.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Queues a Join or Leave, waiting (at most a second) for room: the viewer
    /// counts are wrong forever if one of these is lost.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled send enqueues nothing and counts nothing.
    pub(crate) async fn send(&self, input: Input, feedback: Option<watch::Sender<Feedback>>) {
        let msg = Msg::Event { input, feedback };
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

/// Creates the pipeline and the task future that drains it.
pub(crate) fn pipeline(
    aggregator: Aggregator,
    capacity: usize,
    log: Option<PathBuf>,
) -> (
    Pipeline,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let (done_tx, done) = watch::channel(false);
    let aggregator = Arc::new(Mutex::new(aggregator));
    let logged = Arc::new(AtomicU64::new(0));
    let task = drain(aggregator.clone(), rx, log, logged.clone(), done_tx);
    (
        Pipeline {
            tx,
            aggregator,
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            logged,
            done,
        },
        task,
    )
}

async fn open_log(path: &PathBuf) -> Option<tokio::io::BufWriter<tokio::fs::File>> {
    match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
    {
        Ok(f) => Some(tokio::io::BufWriter::new(f)),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open event log; events are not logged");
            None
        }
    }
}

async fn drain(
    aggregator: Arc<Mutex<Aggregator>>,
    mut rx: mpsc::Receiver<Msg>,
    log: Option<PathBuf>,
    logged: Arc<AtomicU64>,
    done: watch::Sender<bool>,
) {
    let mut log = match &log {
        Some(path) => open_log(path).await,
        None => None,
    };
    let epoch = Instant::now();
    let mut feedback: HashMap<u64, watch::Sender<Feedback>> = HashMap::new();
    let mut batch = Vec::with_capacity(256);
    let mut lines = Vec::with_capacity(64 * 1024);
    let mut reported = Vec::new();
    loop {
        if rx.recv_many(&mut batch, 256).await == 0 {
            break;
        }
        let now = Instant::now();
        let at_ms = now.duration_since(epoch).as_millis() as u64;
        let mut closing = false;
        {
            let mut agg = aggregator.lock().unwrap_or_else(|e| e.into_inner());
            for msg in batch.drain(..) {
                let (input, fb) = match msg {
                    Msg::Event { input, feedback } => (input, feedback),
                    Msg::Close => {
                        closing = true;
                        continue;
                    }
                };
                agg.apply(&input, now);
                if log.is_some() {
                    let record = LogRecord {
                        at_ms,
                        input: std::borrow::Cow::Borrowed(&input),
                    };
                    if serde_json::to_writer(&mut lines, &record).is_ok() {
                        lines.push(b'\n');
                        logged.fetch_add(1, Relaxed);
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
                if let Err(e) = w.write_all(&lines).await {
                    warn!(error = %e, "event log write failed");
                }
                lines.clear();
            }
        }
        if closing {
            // Nothing is accepted after this; what was accepted is applied below.
            rx.close();
        }
    }
    if let Some(w) = log.as_mut() {
        let _ = w.flush().await;
    }
    done.send_replace(true);
}
