//! `GET /metrics` over HTTP for the server and aggregator examples, with
//! axum: the library only renders the text (`Server::metrics_text`,
//! `NatsAggregator::metrics_text`); serving it is the app's choice. The
//! integration tests serve through this same function.

use axum::{http::header, routing::get, Router};

/// Serves the Prometheus text `render` returns at `/metrics` on `listener`
/// (anything else is 404) until the future is dropped or accepting fails.
///
/// hyper bounds what one request can make it buffer; this serves one
/// scraper on a trusted network and sets no connection limit of its own.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let text = render();
            async move {
                (
                    [(header::CONTENT_TYPE, quicast::analytics::CONTENT_TYPE)],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
