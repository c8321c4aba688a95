//! DeepSeek-V2/V3 model definition for whale.
//!
//! Loads Hugging Face model folders (config in both spellings, single or sharded
//! safetensors, memory-mapped) and runs the exact forward pass with the MLA
//! latent cache: per token and layer only `kv_lora_rank + qk_rope_head_dim`
//! values are kept, and decode attends over them in the absorbed form.
//!
//! ```no_run
//! use whale_model::{Logits, ModelFolder};
//! let folder = ModelFolder::open(std::path::Path::new("path/to/DeepSeek-V2-Lite-Chat")).unwrap();
//! let mut cache = folder.model.new_cache();
//! let logits = folder.model.forward(&[1, 2, 3], &mut cache, Logits::Last).unwrap();
//! assert_eq!(logits.len(), folder.model.config().vocab_size);
//! ```
#![deny(missing_docs)]

mod cache;
mod chat;
mod config;
mod convert;
mod error;
mod folder;
mod gguf;
mod gguf_model;
mod gguf_tokenizer;
mod gguf_write;
mod linear;
mod mla;
mod model;
mod moe;
mod rope;
mod synth;
mod tokenizer;
mod weights;

pub use cache::{KvType, LatentCache, PAGE_TOKENS};
pub use chat::{ChatTemplate, Message};
pub use config::{yarn_get_mscale, ModelConfig, ModelType, RopeScaling, ScoringFunc, TopkMethod};
pub use convert::{convert_to_gguf, ConvertOptions, ConvertReport};
pub use error::ModelError;
pub use folder::{open_tokenizer, GenerationConfig, ModelFolder};
pub use gguf::{ggml_type_name, set_populate, GgufFile, GgufTensorInfo, GgufValue};
pub use gguf_write::{write_gguf, MetaValue, RowSource, TensorPlan};
pub use linear::{repack_enabled, set_repack};
pub use mla::MlaMode;
pub use model::{BatchItem, DeepseekModel, Logits};
pub use moe::moe_counters;
pub use rope::Rope;
pub use synth::{preset, synth_gguf, SynthOptions};
pub use tokenizer::Tokenizer;
pub use weights::{release_free_heap, Tensor, WeightStore};
