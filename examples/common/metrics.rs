//! `GET /metrics` over HTTP for the server example, with axum: the library
//! only renders the text ([`Server::metrics_text`]); serving it is the app's
//! choice. The integration tests serve through this same function.

use axum::{http::header, routing::get, Router};
use quicast::Server;

/// Serves `server`'s Prometheus text at `/metrics` on `listener` (anything
/// else is 404) until the future is dropped or accepting fails.
///
/// hyper bounds what one request can make it buffer; this serves one
/// scraper on a trusted network and sets no connection limit of its own.
pub async fn serve(listener: tokio::net::TcpListener, server: Server) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let server = server.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, quicast::analytics::CONTENT_TYPE)],
                    server.metrics_text(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
