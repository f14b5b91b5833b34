//! Hugging Face checkpoints: config, safetensors weights, tokenizer, the GPU
//! model (one file per architecture family) and the CPU reference forward;
//! GGUF files (`gguf`).

pub mod config;
pub mod gguf;
pub mod llama;
pub mod reference;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use tokenizer::{Message, TextStream, TextTokenizer};
