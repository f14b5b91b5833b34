//! `kvsift serve`: an OpenAI-compatible HTTP server on axum + tokio. The
//! engine runs on its own thread (`engine::service`); handlers tokenize,
//! queue a request with a sink that feeds a tokio channel, and answer from
//! its events (whole, or as server-sent events). A request may carry its own
//! KV compression in the extension field `kv`.

mod api;
mod metrics;
mod request;
mod respond;
mod think;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use clap::Args;
use kvsift::engine::compressor::Recording;
use kvsift::engine::service::EngineService;
use kvsift::kv::compression::CompressConfig;
use kvsift::model::TextTokenizer;
use kvsift::model::config::GenerationDefaults;

use super::common::ModelArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests must send `Authorization: Bearer KEY`.
    #[arg(long, env = "KVSIFT_API_KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from a file (its first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Requests running and waiting at most; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// On SIGINT/SIGTERM, seconds the running requests may take to finish
    /// before they are stopped (their answers end with what they have).
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Also record H2O's attention sums, so requests may ask for H2O v3 (an
    /// extra pass over the cache per layer and step). Window queries, which
    /// every other scoring method uses, are always recorded.
    #[arg(long)]
    pub record_attention_sums: bool,
}

/// What every handler shares.
pub(crate) struct App {
    pub svc: EngineService,
    pub tokenizer: TextTokenizer,
    pub defaults: GenerationDefaults,
    pub stop_ids: Vec<u32>,
    pub model_name: String,
    pub api_key: Option<String>,
    pub compression: CompressConfig,
    pub in_flight: AtomicUsize,
    /// A signal came: new generation requests get 503.
    pub draining: AtomicBool,
    pub max_queue: usize,
    pub created: u64,
    pub metrics: metrics::Metrics,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let dir = a.model.dir()?;
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", f.display()))?;
            let key = text.lines().next().unwrap_or("").trim().to_string();
            if key.is_empty() {
                anyhow::bail!("--api-key-file {}: the first line is empty", f.display());
            }
            Some(key)
        }
        (None, None) => None,
    };
    if a.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        anyhow::bail!(
            "--shutdown-timeout {}: expected seconds, 0 or more",
            a.shutdown_timeout
        );
    }
    let deadline = Duration::from_secs_f64(a.shutdown_timeout.min(1e9));
    let compression = a.model.compress.config()?;
    let mut config = a.model.engine_config(a.parallel, compression.clone())?;
    // Any request may bring its own method (at the server's --window).
    config.recording = Recording {
        window_queries: true,
        attention_sums: a.record_attention_sums,
    };
    let tokenizer = TextTokenizer::load(&dir)?;
    let defaults = GenerationDefaults::load(&dir)?;
    let mut stop_ids = defaults.eos_token_ids.clone();
    stop_ids.extend(tokenizer.eos_id());
    let svc = EngineService::start(dir.clone(), a.model.weight_format(), config);
    let app = Arc::new(App {
        svc,
        tokenizer,
        defaults,
        stop_ids,
        model_name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        api_key,
        compression,
        in_flight: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        max_queue: a.max_queue,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        metrics: metrics::Metrics::new(),
    });
    let router = Router::new()
        .route("/health", get(api::health))
        .route("/v1/models", get(api::models))
        .route("/v1/models/{id}", get(api::model))
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/tokenize", post(api::tokenize))
        .route("/detokenize", post(api::detokenize))
        .route("/metrics", get(api::metrics))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        // Prompts of a long context fit: 64 MiB of JSON.
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(app.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let app_after = app.clone();
    let served = rt.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", a.host, a.port)
            .parse()
            .map_err(|e| anyhow::anyhow!("--host {} --port {}: {e}", a.host, a.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
        let local = listener.local_addr()?;
        note!(
            "kvsift serve: listening on http://{local} (model {})",
            app.model_name
        );
        // A signal closes the listener; running requests get `deadline`
        // to finish, then they are cancelled (their answers end there).
        let (signalled, mut on_signal) = tokio::sync::watch::channel(false);
        let a2 = app.clone();
        let mut server = tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    shutdown_signal().await;
                    a2.draining.store(true, Ordering::SeqCst);
                    let _ = signalled.send(true);
                })
                .into_future(),
        );
        tokio::select! {
            r = &mut server => return Ok(r??),
            _ = on_signal.changed() => {}
        }
        note!(
            "kvsift serve: stopping; {} requests running may take {:.0} s",
            app.in_flight.load(Ordering::SeqCst),
            deadline.as_secs_f64()
        );
        if tokio::time::timeout(deadline, &mut server).await.is_err() {
            note!(
                "kvsift serve: stopping {} requests past the deadline",
                app.in_flight.load(Ordering::SeqCst)
            );
            app.svc.cancel_all();
            if tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .is_err()
            {
                log::warn!("connections still open 10 s after their requests stopped");
            }
        }
        anyhow::Ok(())
    });
    // The engine thread stops (what still runs was cancelled above) before
    // the process exits, so the driver is never torn down under it.
    app_after.svc.cancel_all();
    app_after.svc.shutdown();
    served?;
    note!("kvsift serve: stopped");
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
