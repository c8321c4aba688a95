//! whale's engine: turns a prompt into tokens with a model.
//!
//! Sampling ([`Sampler`]), stopping ([`StopStrings`]), incremental
//! detokenization that never splits a UTF-8 character ([`Detokenizer`]) and the
//! single-sequence generation loop ([`generate`]) over the model's latent cache.
//!
//! ```
//! use whale_engine::{Sampler, SamplingParams};
//! let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
//! let mut logits = vec![0.1, 2.0, -1.0];
//! assert_eq!(s.sample(&mut logits, &[], &[]), 1);
//! ```
#![deny(missing_docs)]

mod chat;
mod detok;
mod disk;
mod generate;
mod grammar;
mod pages;
mod rng;
mod sampler;
mod scheduler;
mod stats;
mod stop;

pub use chat::chat_prompt;
pub use detok::Detokenizer;
pub use disk::{DiskCache, DiskCacheConfig, DiskHit};
pub use generate::{
    generate, generate_with_cache, EngineError, FinishReason, GenerateRequest, Generation,
};
pub use grammar::{Constraint, Grammars};
pub use pages::{PagePool, PrefixCache, PrefixHit};
pub use rng::Rng;
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::{
    log_softmax, top_k, Engine, EngineConfig, Event, Request, SubmitError, TokenLogprob, Usage,
};
pub use stats::{EngineStats, Histogram};
pub use stop::StopStrings;
