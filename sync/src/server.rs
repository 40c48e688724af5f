//! `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let stale = m.stale_watches();
    if !m.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not synced yet\n".to_string(),
        )
    } else if !stale.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("watch failing: {}\n", stale.join(", ")),
        )
    } else if let Some(running) = m.stuck_pass() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("a sync pass has been running for {} s\n", running.as_secs()),
        )
    } else {
        (StatusCode::OK, "ready\n".to_string())
    }
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.to_prometheus(),
    )
}

/// Binds `addr` and serves until the task is dropped.
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, async move {
        axum::serve(listener, router(metrics)).await
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn health_ready_and_metrics() {
        let metrics = Arc::new(Metrics::default());
        let (addr, serve) = bind("127.0.0.1:0".parse().unwrap(), metrics.clone())
            .await
            .unwrap();
        let server = tokio::spawn(serve);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.synced();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("text/plain; version=0.0.4"), "{m}");
        assert!(m.contains("envlane_sync_ready 1"), "{m}");
        server.abort();
    }
}
