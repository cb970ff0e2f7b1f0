//! The embedder of `ingest` and `search --text`: built from the settings
//! (`--embed hash|openai`), checked against the collection's dimension, and
//! its errors turned into the command's.
//!
//! `openai` is the adapter wrapped as `BatchingEmbedder<RetryingEmbedder<_>>`:
//! each request is retried on its own; calls are cut into requests of
//! bounded count and bytes, a bounded number at once (docs/embeddings.md).

use std::num::NonZeroUsize;
use std::sync::Arc;

use tandem_adapters::hash::HashEmbedder;
use tandem_core::{EmbedError, Embedder, ProtocolViolation};

use crate::cli::EmbedMode;
use crate::error::AppError;
use crate::settings::EmbedSettings;

pub use tandem_adapters::hash::hash_embedding;

/// The embedder in use, shared by the ingest stages.
pub type AppEmbedder = Arc<dyn Embedder>;

/// The embedder of `mode` for a collection of `dimension` (`None` for
/// `EmbedMode::None`).
pub fn build(
    settings: &EmbedSettings,
    mode: EmbedMode,
    dimension: usize,
) -> Result<Option<AppEmbedder>, AppError> {
    let dim = NonZeroUsize::new(dimension)
        .ok_or_else(|| AppError::Usage("the dimension must be positive".into()))?;
    match mode {
        EmbedMode::None => Ok(None),
        EmbedMode::Hash => Ok(Some(Arc::new(HashEmbedder::new(dim)))),
        EmbedMode::Openai => openai(settings, dimension).map(Some),
    }
}

#[cfg(feature = "openai")]
fn openai(settings: &EmbedSettings, dimension: usize) -> Result<AppEmbedder, AppError> {
    use tandem_adapters::openai::{AuthHeader, OpenAiConfig, OpenAiEmbedder};
    use tandem_core::{BatchingEmbedder, RetryingEmbedder};

    use crate::settings::KeyHeader;

    let mut config = OpenAiConfig::new(
        settings.url.clone().unwrap_or_default(),
        settings.model.clone().unwrap_or_default(),
        dimension,
    )
    .with_timeout(settings.timeout)
    .with_connect_timeout(settings.connect_timeout)
    .with_auth_header(match settings.key_header {
        KeyHeader::Bearer => AuthHeader::Bearer,
        KeyHeader::ApiKey => AuthHeader::ApiKeyHeader,
    });
    if let Some(n) = settings.dimensions {
        config = config.with_request_dimensions(n);
    }
    if let Some(key) = &settings.api_key {
        config = config.with_api_key(key.as_str());
    }
    let adapter = OpenAiEmbedder::new(config)
        .map_err(|e| AppError::Usage(format!("--embed openai: {}", detail(&e))))?;
    let retrying = RetryingEmbedder::new(adapter, settings.retry.clone())
        .with_max_retry_after(settings.max_retry_after);
    Ok(Arc::new(BatchingEmbedder::new(
        retrying,
        settings.limits.clone(),
    )))
}

#[cfg(not(feature = "openai"))]
fn openai(_: &EmbedSettings, _: usize) -> Result<AppEmbedder, AppError> {
    Err(AppError::BackendUnavailable("openai"))
}

/// "model M at http://host:port" (or "the hash embedding"), for messages.
pub fn describe(e: &dyn Embedder, settings: &EmbedSettings) -> String {
    if e.model() == "hash" {
        return "the hash embedding".into();
    }
    let place = settings
        .url
        .as_deref()
        .map(crate::settings::describe_qdrant_url)
        .unwrap_or_default();
    format!("model {:?} at {place}", e.model())
}

/// Checks, before anything is written, that the embedder answers with
/// vectors of the collection's dimension: one request of one short text.
/// A wrong dimension is a usage error naming both numbers.
pub async fn check_dimension(e: &dyn Embedder, settings: &EmbedSettings) -> Result<(), AppError> {
    match e.embed(&["tandem dimension check".to_owned()]).await {
        Ok(_) => Ok(()),
        Err(EmbedError::Protocol(ProtocolViolation::WrongDimension { expected, got, .. })) => {
            Err(AppError::Usage(format!(
                "the embedder ({}) returns vectors of {got} dimensions, but the collection's \
                 dimension is {expected} (--dim): use --dim {got} for a new collection, or a \
                 model that matches (or --embed-dimensions {expected}, if the model can shorten \
                 its vectors)",
                describe(e, settings)
            )))
        }
        Err(err) => Err(error(
            err,
            &describe(e, settings),
            "checking the embedder: ",
        )),
    }
}

/// An embedding failure as the command's error: `context` says what was
/// being done ("batch 3 (lines 5–6) was not written: "), `what` the embedder.
pub fn error(e: EmbedError, what: &str, context: &str) -> AppError {
    AppError::Embed {
        context: format!("{context}embedding with {what}: "),
        error: e,
    }
}

/// The error's message without the kind's prefix, for usage errors.
fn detail(e: &EmbedError) -> String {
    match e {
        EmbedError::Permanent { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
