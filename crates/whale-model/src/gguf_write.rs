//! Writes GGUF v3 files: metadata, tensor index, then the tensors, each quantised
//! row by row from an f32 source while it streams to disk (a tensor is never held
//! whole in f32). The file appears under its name only when complete.

use crate::error::ModelError;
use rayon::prelude::*;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use whale_kernels::quantize::quantize_row;
use whale_kernels::DType;

/// GGUF's default data alignment.
const ALIGNMENT: u64 = 32;

/// A metadata value with its GGUF type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// UINT32.
    U32(u32),
    /// FLOAT32.
    F32(f32),
    /// BOOL.
    Bool(bool),
    /// STRING.
    Str(String),
    /// ARRAY of STRING.
    StrArray(Vec<String>),
    /// ARRAY of INT32.
    I32Array(Vec<i32>),
}

/// Rows of f32 values that a tensor is written from.
pub trait RowSource: Sync {
    /// Number of rows (product of all but the innermost dimension).
    fn rows(&self) -> usize;
    /// Values per row (the innermost dimension).
    fn cols(&self) -> usize;
    /// Writes row `r` into `out` (`cols` values).
    fn row_into(&self, r: usize, out: &mut [f32]);
}

/// One tensor to write.
pub struct TensorPlan<'a> {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape, outermost first (PyTorch order; GGUF stores it reversed).
    pub shape: Vec<usize>,
    /// Stored type.
    pub dtype: DType,
    /// Where the values come from.
    pub source: Box<dyn RowSource + 'a>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::io(path, e)
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U32(x) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        MetaValue::F32(x) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        MetaValue::Bool(x) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[*x as u8])
        }
        MetaValue::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            put_str(w, s)
        }
        MetaValue::StrArray(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&8u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| put_str(w, s))
        }
        MetaValue::I32Array(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

fn padding(pos: u64) -> usize {
    ((ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT) as usize
}

/// Bytes of a planned tensor; an error names the tensor when rows are not whole blocks.
fn tensor_bytes(t: &TensorPlan, path: &Path) -> Result<u64, ModelError> {
    let cols = *t.shape.last().unwrap_or(&1);
    let rows: usize = t.shape.iter().rev().skip(1).product();
    let rb = t.dtype.bytes_for(cols).ok_or_else(|| {
        ModelError::format(
            path,
            format!(
                "tensor {}: rows of {cols} values are not whole {} blocks",
                t.name,
                t.dtype.name()
            ),
        )
    })?;
    if t.source.rows() != rows || t.source.cols() != cols {
        return Err(ModelError::format(
            path,
            format!(
                "tensor {}: source is [{}, {}], plan is {:?}",
                t.name,
                t.source.rows(),
                t.source.cols(),
                t.shape
            ),
        ));
    }
    Ok((rows * rb) as u64)
}

/// Writes a GGUF v3 file at `path` with `meta` and `tensors`, reporting
/// `(bytes written, total bytes, tensor name)` to `progress` as data streams out.
pub fn write_gguf(
    path: &Path,
    meta: &[(String, MetaValue)],
    tensors: &[TensorPlan],
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<(), ModelError> {
    let sizes = tensors
        .iter()
        .map(|t| tensor_bytes(t, path))
        .collect::<Result<Vec<_>, _>>()?;
    let total: u64 = sizes.iter().sum();
    let tmp = PathBuf::from(format!("{}.partial", path.display()));
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = CountingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        pos: 0,
    };
    let result = (|| -> Result<(), ModelError> {
        let e = io(&tmp);
        w.write_all(b"GGUF").map_err(&e)?;
        w.write_all(&3u32.to_le_bytes()).map_err(&e)?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())
            .map_err(&e)?;
        w.write_all(&(meta.len() as u64).to_le_bytes())
            .map_err(&e)?;
        for (k, v) in meta {
            put_str(&mut w, k).map_err(&e)?;
            put_value(&mut w, v).map_err(&e)?;
        }
        let mut offset = 0u64;
        for (t, &size) in tensors.iter().zip(&sizes) {
            put_str(&mut w, &t.name).map_err(&e)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())
                .map_err(&e)?;
            for &n in t.shape.iter().rev() {
                w.write_all(&(n as u64).to_le_bytes()).map_err(&e)?;
            }
            w.write_all(&t.dtype.ggml_type().to_le_bytes())
                .map_err(&e)?;
            w.write_all(&offset.to_le_bytes()).map_err(&e)?;
            offset += size + padding(size) as u64;
        }
        let pad = padding(w.pos);
        w.write_all(&vec![0u8; pad]).map_err(&e)?;
        let mut done = 0u64;
        for (t, &size) in tensors.iter().zip(&sizes) {
            write_tensor(&mut w, t, &mut |n| {
                done += n;
                progress(done, total, &t.name);
            })
            .map_err(&e)?;
            w.write_all(&vec![0u8; padding(size)]).map_err(&e)?;
        }
        w.inner.flush().map_err(&e)?;
        Ok(())
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

struct CountingWriter<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Quantises a tensor in chunks of rows (in parallel) and writes each chunk in order.
fn write_tensor(
    w: &mut impl Write,
    t: &TensorPlan,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<()> {
    let (rows, cols) = (t.source.rows(), t.source.cols());
    let rb = t.dtype.bytes_for(cols).expect("checked in tensor_bytes");
    // About 4 MiB of f32 input per chunk, at least one row.
    let chunk_rows = ((1 << 20) / cols.max(1)).max(1);
    let mut buf = vec![0u8; chunk_rows.min(rows) * rb];
    let mut start = 0;
    while start < rows {
        let n = chunk_rows.min(rows - start);
        let out = &mut buf[..n * rb];
        out.par_chunks_mut(rb).enumerate().for_each_init(
            || vec![0.0f32; cols],
            |row, (i, o)| {
                t.source.row_into(start + i, row);
                quantize_row(t.dtype, row, o);
            },
        );
        w.write_all(out)?;
        progress(out.len() as u64);
        start += n;
    }
    Ok(())
}
