//! Errors of the model layer: every message names the file, tensor or field at fault.

use std::path::{Path, PathBuf};

/// An error while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is invalid or unsupported.
    #[error("{}{msg}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Config {
        /// The config file, when known.
        file: Option<PathBuf>,
        /// What is wrong.
        msg: String,
    },
    /// A weights file is malformed.
    #[error("{file}: {msg}")]
    Format {
        /// The weights file.
        file: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor {tensor:?} (looked in {files})")]
    MissingTensor {
        /// The tensor name.
        tensor: String,
        /// The files searched.
        files: String,
    },
    /// A tensor has the wrong shape.
    #[error("{file}: tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file holding the tensor.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype whale cannot compute with.
    #[error(
        "{file}: tensor {tensor:?} has unsupported dtype {dtype} (whale reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)"
    )]
    DType {
        /// The file holding the tensor.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype found.
        dtype: String,
    },
    /// Tokenizer or chat-template failure.
    #[error("{0}")]
    Tokenizer(String),
    /// Bad input at run time (token ids out of range, empty prompt...).
    #[error("{0}")]
    Input(String),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        ModelError::Config {
            file: None,
            msg: msg.into(),
        }
    }

    pub(crate) fn format(file: &Path, msg: impl Into<String>) -> Self {
        ModelError::Format {
            file: file.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// Attaches a file to a config error that has none.
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            ModelError::Config { file: None, msg } => ModelError::Config {
                file: Some(path.to_path_buf()),
                msg,
            },
            e => e,
        }
    }
}

/// Reads and parses the JSON file `path`; errors name the file.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))
}
