//! A minimal HTTP/1.1 endpoint serving `GET /metrics` in the Prometheus text format.
//!
//! One request per connection, a 8 KiB cap on the request head, a 5 s read
//! timeout, and at most 64 requests served at once: enough for a scraper, and
//! bounded against anyone else.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::debug;

use super::Server;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONCURRENT: usize = 64;

/// Serves `GET /metrics` for `server` on `listener` until the server shuts down.
///
/// The returned future owns its request tasks; dropping it stops them.
///
/// # Cancel safety
///
/// Cancel safe: dropping it closes the listener and aborts requests in flight.
pub async fn serve_metrics(listener: TcpListener, server: Server) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = server.shutdown_signal();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    debug!(%peer, "metrics: too many requests in flight");
                    continue;
                };
                let server = server.clone();
                tasks.spawn(async move {
                    if let Err(e) = respond(stream, &server).await {
                        debug!(%peer, error = %e, "metrics request failed");
                    }
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
}

async fn respond(mut stream: TcpStream, server: &Server) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))?;
    if !complete {
        return reply(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
        )
        .await;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    match (method, path) {
        (b"GET", b"/metrics") => {
            let body = server.metrics_text();
            reply(
                &mut stream,
                "200 OK",
                crate::analytics::CONTENT_TYPE,
                body.as_bytes(),
            )
            .await
        }
        (b"GET", _) => reply(&mut stream, "404 Not Found", "text/plain", b"not found\n").await,
        _ => {
            reply(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
            )
            .await
        }
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}
