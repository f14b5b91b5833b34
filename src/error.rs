//! The library's one error type. Every variant is something a user (or their
//! machine) can cause; each message names the flag, file, tensor or limit
//! involved. Programming errors inside the library are `assert!`s instead.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matched the backends / name filter the user asked for.
    #[error(
        "no GPU adapter found (backends: {backends}{}); adapters seen: {}. \
         On a machine without a GPU install lavapipe: \
         `apt-get install -y mesa-vulkan-drivers libvulkan1` and set WGPU_BACKEND=vulkan",
        name_filter.as_ref().map(|n| format!(", WGPU_ADAPTER_NAME={n:?}")).unwrap_or_default(),
        if seen.is_empty() { "none".to_string() } else { seen.join("; ") }
    )]
    NoAdapter {
        backends: String,
        name_filter: Option<String>,
        seen: Vec<String>,
    },

    /// A bad value in an environment variable kvsift reads.
    #[error("environment variable {var}={value:?}: {reason}")]
    BadEnv {
        var: &'static str,
        value: String,
        reason: String,
    },

    /// The adapter refused to create a device.
    #[error("could not open a device on adapter {adapter:?}: {source}")]
    RequestDevice {
        adapter: String,
        #[source]
        source: wgpu::RequestDeviceError,
    },

    /// Something needs an optional GPU feature the device does not have.
    #[error("{what} needs the GPU feature {feature}, which adapter {adapter:?} does not offer")]
    MissingFeature {
        what: String,
        feature: &'static str,
        adapter: String,
    },

    /// A size exceeds one of the device's limits and cannot be split.
    #[error("{what}: {requested} exceeds the device limit {limit_name} = {limit}")]
    LimitExceeded {
        what: String,
        requested: u64,
        limit_name: &'static str,
        limit: u64,
    },

    /// wgpu reported a validation or out-of-memory error inside an error scope.
    #[error("GPU error during {during}: {message}")]
    Gpu { during: String, message: String },

    /// Reading a buffer back from the GPU failed.
    #[error("reading GPU buffer {label:?} back failed: {message}")]
    Readback { label: String, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model's config.json (or generation_config.json) is malformed or inconsistent.
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },

    /// The checkpoint is valid but of a kind kvsift does not run.
    #[error("{path}: unsupported model: {what}")]
    UnsupportedModel { path: PathBuf, what: String },

    /// A weight file is not valid safetensors (corrupt, truncated, bad header).
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },

    /// A file is not valid GGUF (corrupt, truncated, bad header or metadata).
    #[error("{path}: not a valid GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },

    /// A tensor is missing, or its shape or dtype disagrees with the config.
    #[error("{path}: tensor {tensor:?}: {reason}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// The tokenizer (or its chat template) could not be loaded or applied.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    /// The input has more tokens than the model or the cache allows.
    #[error("{what}: {tokens} tokens exceed the limit of {limit}")]
    TooManyTokens {
        what: String,
        tokens: usize,
        limit: usize,
    },

    /// The model produced NaN or infinite logits: no token can be drawn.
    #[error(
        "the model's logits hold NaN or infinity at {at}; its weights or activations \
         overflowed (a corrupt checkpoint, or f16 limits: try --weights-dtype f32 --kv-dtype f32)"
    )]
    NonFiniteLogits { at: String },

    /// A user-supplied value is out of its allowed range (CLI flag or API field).
    #[error("invalid value for {name}: {reason}")]
    InvalidArgument { name: String, reason: String },
}

impl Error {
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

thread_local! {
    /// Set while third-party code runs under [`catch_panic`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs third-party parsing code fed a user's file, turning a panic inside
/// it into `Err` (the tokenizers crate `expect`s on some malformed JSON).
/// The panic message is kept off stderr on this thread: the caller reports
/// a clear error instead. Installs, once, a panic hook that defers to the
/// previous one everywhere else.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let out = std::panic::catch_unwind(f);
    QUIET.with(|q| q.set(was));
    out.ok()
}
