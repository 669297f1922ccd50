//! Stopping on SIGINT or SIGTERM, the way a service manager asks.

use std::time::Duration;

use super::Server;

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (what `kill`, systemd and container runtimes send).
    Terminate,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// How [`Server::shutdown_on_signal`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// The first signal started a graceful shutdown and it completed:
    /// Goodbye sent, every accepted event applied, logged and flushed.
    Graceful(Signal),
    /// A second signal arrived during the shutdown; it was abandoned. The app
    /// should exit now.
    Forced(Signal),
}

/// SIGINT and SIGTERM handlers, installed once; each [`recv`](Self::recv)
/// waits for the next of either. Signals that arrive between calls are kept,
/// not lost. On non-Unix platforms only Ctrl-C is watched.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers. Must be called inside a tokio runtime. From
    /// then on these signals no longer kill the process by default.
    pub fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// The next SIGINT or SIGTERM.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a signal not yet returned stays queued for the next call.
    pub async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Signal::Interrupt,
                _ = self.terminate.recv() => Signal::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Interrupt
        }
    }
}

impl Server {
    /// Waits for the first SIGINT or SIGTERM on `signals`, then shuts down as
    /// [`shutdown`](Self::shutdown) does (Goodbye to every viewer, every
    /// accepted event applied, logged and flushed), waiting at most `grace`
    /// for viewers. A second signal meanwhile abandons the shutdown at once.
    ///
    /// ```no_run
    /// # async fn f(server: quicast::Server) -> std::io::Result<()> {
    /// use quicast::net::{Signals, Stopped};
    /// let mut signals = Signals::new()?;
    /// if let Stopped::Forced(_) = server.shutdown_on_signal(&mut signals, std::time::Duration::from_secs(2)).await {
    ///     std::process::exit(130);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe before the first signal; after it, as `shutdown`.
    pub async fn shutdown_on_signal(&self, signals: &mut Signals, grace: Duration) -> Stopped {
        let first = signals.recv().await;
        self.shutdown_after_signal(signals, first, grace).await
    }

    /// The shutdown half of [`shutdown_on_signal`](Self::shutdown_on_signal),
    /// for an app that has already received `first` itself.
    ///
    /// # Cancel safety
    ///
    /// As [`shutdown`](Self::shutdown).
    pub async fn shutdown_after_signal(
        &self,
        signals: &mut Signals,
        first: Signal,
        grace: Duration,
    ) -> Stopped {
        tokio::select! {
            _ = self.shutdown(grace) => Stopped::Graceful(first),
            second = signals.recv() => Stopped::Forced(second),
        }
    }
}
