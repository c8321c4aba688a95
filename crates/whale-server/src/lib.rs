//! whale's HTTP server: the DeepSeek API surface (which is OpenAI's, plus cache
//! counters, FIM and chat prefix completion) over the continuous-batching engine.
//!
//! Every route is served under `/`, `/v1/` and `/beta/`. Requests are checked
//! (400/422), authenticated (401), checked against the key's balance (402) and
//! rate limits (429), then queued in the engine (503 when its queue is full).
//! Answers stream as server-sent events or come back whole; a client that goes
//! away cancels its request, whose KV pages the engine frees at its next step.
//! Each finished request writes one usage row and its charge to the ledger.

pub mod api;
pub mod billing;
pub mod error;
pub mod metrics;
mod routes;
mod sse;
pub mod tools;

pub use billing::{KeyInfo, Ledger, Prices, UsageRow};
pub use error::ApiError;
pub use routes::{fim_prompt, router, AppState, ServerConfig, ANONYMOUS};

use std::net::SocketAddr;
use std::sync::Arc;

/// Serves `state` on `addr` until the process is interrupted.
pub async fn serve(addr: SocketAddr, state: Arc<AppState>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, state).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
) -> std::io::Result<()> {
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
