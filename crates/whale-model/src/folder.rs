//! A Hugging Face model folder as users have it on disk.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::model::DeepseekModel;
use crate::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Generation defaults from `generation_config.json`.
#[derive(Clone, Debug, Default)]
pub struct GenerationConfig {
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Default temperature, if given.
    pub temperature: Option<f32>,
    /// Default top-p, if given.
    pub top_p: Option<f32>,
}

impl GenerationConfig {
    fn from_file(path: &Path) -> Result<Self, ModelError> {
        let v = crate::error::read_json(path)?;
        let eos = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => vec![],
        };
        Ok(GenerationConfig {
            eos_token_ids: eos,
            temperature: v
                .get("temperature")
                .and_then(Value::as_f64)
                .map(|x| x as f32),
            top_p: v.get("top_p").and_then(Value::as_f64).map(|x| x as f32),
        })
    }
}

/// Everything whale reads from a model folder.
pub struct ModelFolder {
    /// The folder.
    pub dir: PathBuf,
    /// The model (weights memory-mapped).
    pub model: DeepseekModel,
    /// The tokenizer, when the folder has `tokenizer.json`.
    pub tokenizer: Option<Tokenizer>,
    /// `generation_config.json`, when present.
    pub generation: GenerationConfig,
}

impl ModelFolder {
    /// Loads `config.json`, the safetensors weights and, when present, the tokenizer
    /// files and `generation_config.json`.
    ///
    /// A path to a `.gguf` file opens that file instead, with the tokenizer and chat
    /// template from its metadata.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        if dir.is_file()
            && dir
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            let f = crate::gguf::GgufFile::open(dir)?;
            // The tokenizer first: its build's temporaries (~100 MB for a 100k
            // vocabulary) are then freed space that the weights' allocations reuse,
            // not a peak on top of them.
            let tokenizer = crate::gguf_tokenizer::has_tokenizer(&f)
                .then(|| Tokenizer::from_gguf(&f))
                .transpose()?;
            let model = DeepseekModel::from_gguf(&f)?;
            crate::release_free_heap();
            let generation = GenerationConfig {
                eos_token_ids: model.config().eos_token_ids.clone(),
                ..Default::default()
            };
            return Ok(ModelFolder {
                dir: dir.to_path_buf(),
                model,
                tokenizer,
                generation,
            });
        }
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            });
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = open_tokenizer(dir)?;
        let model = DeepseekModel::load_dir(dir, cfg)?;
        crate::release_free_heap();
        let gc = dir.join("generation_config.json");
        let generation = if gc.is_file() {
            GenerationConfig::from_file(&gc)?
        } else {
            GenerationConfig::default()
        };
        Ok(ModelFolder {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            generation,
        })
    }

    /// End-of-sequence ids: `generation_config.json`, else `config.json`, else the tokenizer's EOS.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_ids.is_empty() {
            return self.generation.eos_token_ids.clone();
        }
        if !self.model.config().eos_token_ids.is_empty() {
            return self.model.config().eos_token_ids.clone();
        }
        self.tokenizer
            .as_ref()
            .and_then(Tokenizer::eos_id)
            .into_iter()
            .collect()
    }
}

/// The tokenizer of `dir`, `None` when it has no `tokenizer.json`; for a `.gguf`
/// file, the tokenizer in its metadata.
pub fn open_tokenizer(dir: &Path) -> Result<Option<Tokenizer>, ModelError> {
    if dir.is_file() {
        let f = crate::gguf::GgufFile::open(dir)?;
        return crate::gguf_tokenizer::has_tokenizer(&f)
            .then(|| Tokenizer::from_gguf(&f))
            .transpose();
    }
    if dir.join("tokenizer.json").is_file() {
        Tokenizer::from_dir(dir).map(Some)
    } else {
        Ok(None)
    }
}
