//! GGUF (llama.cpp's model file format), versions 2 and 3: header, metadata and
//! tensor index, memory-mapped. Tensors are borrowed from the map in their
//! stored block format; nothing is converted at load.

use crate::error::ModelError;
use crate::weights::Tensor;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use whale_kernels::DType;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// FLOAT32 or FLOAT64.
    F64(f64),
    /// BOOL.
    Bool(bool),
    /// STRING.
    Str(String),
    /// ARRAY.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// As an unsigned integer (non-negative integers of any width).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// As a float (floats and integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// As a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// As an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the index.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// Dimensions in ggml order (`ne`, innermost first).
    pub ne: Vec<u64>,
    /// ggml type id as stored.
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

/// An opened GGUF file.
pub struct GgufFile {
    path: Arc<PathBuf>,
    map: Arc<Mmap>,
    version: u32,
    metadata: HashMap<String, GgufValue>,
    tensors: HashMap<String, GgufTensorInfo>,
    order: Vec<String>,
    data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("file ends inside the header")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| "short read")?,
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| "short read")?,
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| "short read")?,
        ))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
    fn value(&mut self, t: u32, depth: u32) -> Result<GgufValue, String> {
        Ok(match t {
            0 => GgufValue::U64(self.u8()? as u64),
            1 => GgufValue::I64(self.u8()? as i8 as i64),
            2 => GgufValue::U64(self.u16()? as u64),
            3 => GgufValue::I64(self.u16()? as i16 as i64),
            4 => GgufValue::U64(self.u32()? as u64),
            5 => GgufValue::I64(self.u32()? as i32 as i64),
            6 => GgufValue::F64(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(self.u8()? != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let et = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.b.len() {
                    return Err(format!("array of {n} items is longer than the file"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

static POPULATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether GGUF files opened from now on get all their page-table entries at open
/// (MAP_POPULATE) instead of on first touch. Off by default: start to first token on
/// the 8.9 GB V2-Lite Q4_0 file is 1.1 s lazily and 2.0 s populated (warm page cache),
/// and populating in a background thread slowed the first tokens more than the faults
/// it saved. `whale bench` turns it on so no measurement pays a first-touch fault.
pub fn set_populate(on: bool) {
    POPULATE.store(on, std::sync::atomic::Ordering::Relaxed);
}

impl GgufFile {
    /// Opens and indexes `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut opts = memmap2::MmapOptions::new();
        if POPULATE.load(std::sync::atomic::Ordering::Relaxed) {
            opts.populate();
        }
        // SAFETY: a read-only (shared) map; whale never writes through it (see weights.rs).
        let map = unsafe { opts.map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, Arc::new(map)).map_err(|m| ModelError::format(path, m))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<Self, String> {
        let mut c = Cursor { b: &map, pos: 0 };
        if c.take(4).map_err(|_| "not a GGUF file (too short)")? != b"GGUF" {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            ));
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let t = c.u32()?;
            let v = c
                .value(t, 0)
                .map_err(|e| format!("metadata {key:?}: {e}"))?;
            metadata.insert(key, v);
        }
        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd > 4 {
                return Err(format!("tensor {name:?} has {nd} dimensions"));
            }
            let ne = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            order.push(name.clone());
            tensors.insert(
                name,
                GgufTensorInfo {
                    ne,
                    ggml_type,
                    offset,
                },
            );
        }
        let align = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(format!("general.alignment {align} is not a power of two"));
        }
        let data_start = c.pos.div_ceil(align) * align;
        let f = GgufFile {
            path: Arc::new(path.to_path_buf()),
            map,
            version,
            metadata,
            tensors,
            order,
            data_start,
        };
        // Check every tensor lies inside the file (types checked when a tensor is used).
        for name in &f.order {
            let info = &f.tensors[name];
            if let Some(dt) = DType::from_ggml(info.ggml_type) {
                let n: u64 = info.ne.iter().product();
                let bytes = dt
                    .bytes_for(n as usize)
                    .ok_or(format!("tensor {name:?}: size is not whole blocks"))?;
                if !(info.offset as usize).is_multiple_of(align) {
                    return Err(format!("tensor {name:?} is not aligned to {align}"));
                }
                if f.data_start + info.offset as usize + bytes > f.map.len() {
                    return Err(format!("tensor {name:?} runs past the end of the file"));
                }
            }
        }
        Ok(f)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// All metadata keys.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.keys().map(String::as_str)
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> &[String] {
        &self.order
    }

    /// The index entry of `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.get(name)
    }

    /// The tensor `name`, shaped in PyTorch order (outermost first).
    pub fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                tensor: name.to_string(),
                files: self.path.display().to_string(),
            })?;
        let dtype = DType::from_ggml(info.ggml_type).ok_or_else(|| ModelError::DType {
            file: self.path.to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("ggml type {}", ggml_type_name(info.ggml_type)),
        })?;
        let n: u64 = info.ne.iter().product();
        let len = dtype.bytes_for(n as usize).expect("checked at open");
        let shape: Vec<usize> = info.ne.iter().rev().map(|&d| d as usize).collect();
        Ok(Tensor::from_map(
            self.map.clone(),
            self.data_start + info.offset as usize,
            len,
            dtype,
            shape,
            self.path.clone(),
        ))
    }
}

/// llama.cpp's name of a ggml type id (for messages).
pub fn ggml_type_name(t: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES
        .get(t as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("#{t}"))
}
