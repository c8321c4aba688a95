//! Storage types for weights and a borrowed row-major matrix view over raw bytes.

use crate::quant::{self, QK, QK_K};
#[cfg(test)]
use half::bf16;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Element type of a stored tensor: plain floats or llama.cpp block formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (upper half of a binary32).
    BF16,
    /// ggml Q4_0: 32 values in 18 bytes.
    Q4_0,
    /// ggml Q4_1: 32 values in 20 bytes.
    Q4_1,
    /// ggml Q5_0: 32 values in 22 bytes.
    Q5_0,
    /// ggml Q5_1: 32 values in 24 bytes.
    Q5_1,
    /// ggml Q8_0: 32 values in 34 bytes.
    Q8_0,
    /// ggml Q4_K: 256 values in 144 bytes.
    Q4K,
    /// ggml Q5_K: 256 values in 176 bytes.
    Q5K,
    /// ggml Q6_K: 256 values in 210 bytes.
    Q6K,
    /// Q4_0 repacked at load, eight rows interleaved block by block (see
    /// [`crate::repack`]); the same 18 bytes per 32 values. Never in a file.
    Q4_0R8,
    /// Q8_0 repacked the same way; 34 bytes per 32 values.
    Q8_0R8,
    /// Q4_K repacked at load, eight rows interleaved super-block by super-block;
    /// the same 144 bytes per 256 values.
    Q4KR8,
    /// Q5_0 repacked the same way (its high bits rearranged, see [`crate::repack`]);
    /// 22 bytes per 32 values.
    Q5_0R8,
}

impl DType {
    /// `(values, bytes)` of one block (1 value for the float types).
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q4_0 | DType::Q4_0R8 => (QK, 18),
            DType::Q4_1 => (QK, 20),
            DType::Q5_0 | DType::Q5_0R8 => (QK, 22),
            DType::Q5_1 => (QK, 24),
            DType::Q8_0 | DType::Q8_0R8 => (QK, 34),
            DType::Q4K | DType::Q4KR8 => (QK_K, 144),
            DType::Q5K => (QK_K, 176),
            DType::Q6K => (QK_K, 210),
        }
    }

    /// Bytes of `n` values; `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (vals, bytes) = self.block();
        n.is_multiple_of(vals).then(|| n / vals * bytes)
    }

    /// Rows interleaved per group in a repacked type (1 for the file formats).
    pub fn interleave(self) -> usize {
        match self {
            DType::Q4_0R8 | DType::Q8_0R8 | DType::Q4KR8 | DType::Q5_0R8 => crate::repack::ROWS,
            _ => 1,
        }
    }

    /// The file format a repacked type was made from (itself for the file formats).
    pub fn file_type(self) -> DType {
        match self {
            DType::Q4_0R8 => DType::Q4_0,
            DType::Q8_0R8 => DType::Q8_0,
            DType::Q4KR8 => DType::Q4K,
            DType::Q5_0R8 => DType::Q5_0,
            t => t,
        }
    }

    /// ggml's type id (`ggml_type`); a repacked type reports its file format's.
    pub fn ggml_type(self) -> u32 {
        match self.file_type() {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 | DType::Q4_0R8 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 | DType::Q5_0R8 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 | DType::Q8_0R8 => 8,
            DType::Q4K | DType::Q4KR8 => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// The type of a ggml type id, if whale reads it.
    pub fn from_ggml(t: u32) -> Option<DType> {
        [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::Q8_0,
            DType::Q4K,
            DType::Q5K,
            DType::Q6K,
        ]
        .into_iter()
        .find(|d| d.ggml_type() == t)
    }

    /// Lowercase name, as llama.cpp spells it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q8_0 => "q8_0",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::Q4_0R8 => "q4_0_r8",
            DType::Q8_0R8 => "q8_0_r8",
            DType::Q4KR8 => "q4_k_r8",
            DType::Q5_0R8 => "q5_0_r8",
        }
    }
}

/// A borrowed row-major matrix `[rows, cols]` stored as little-endian bytes of `dtype`.
///
/// The bytes usually live in a memory-mapped file; nothing is copied. Rows are
/// decoded to f32 on the fly (`row_into`), which is exact for every type here.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    dtype: DType,
    data: &'a [u8],
    rows: usize,
    cols: usize,
}

impl<'a> MatRef<'a> {
    /// Wraps `data`; `None` when rows are not whole blocks or the length is not
    /// `rows` rows of `cols` values.
    /// Repacked types also need `rows` to be whole groups of interleaved rows.
    pub fn new(dtype: DType, data: &'a [u8], rows: usize, cols: usize) -> Option<Self> {
        if !rows.is_multiple_of(dtype.interleave()) {
            return None;
        }
        (data.len() == rows.checked_mul(dtype.bytes_for(cols)?)?).then_some(Self {
            dtype,
            data,
            rows,
            cols,
        })
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of rows (output features for a linear layer).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features for a linear layer).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Raw bytes of the whole matrix.
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Rows `start..start + n` as a smaller view.
    ///
    /// # Panics
    /// If the range is out of bounds, or cuts a group of a repacked type (caller
    /// bugs, never input-dependent).
    pub fn row_range(&self, start: usize, n: usize) -> MatRef<'a> {
        assert!(start + n <= self.rows, "row range out of bounds");
        let g = self.dtype.interleave();
        assert!(
            start.is_multiple_of(g) && n.is_multiple_of(g),
            "row range cuts a group of {g} interleaved rows"
        );
        let rb = self.row_bytes();
        MatRef {
            dtype: self.dtype,
            data: &self.data[start * rb..(start + n) * rb],
            rows: n,
            cols: self.cols,
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// Decodes row `r` into `out` (length `cols`) as f32.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let g = self.dtype.interleave();
        if g > 1 {
            let group = &self.data[r / g * g * rb..(r / g + 1) * g * rb];
            crate::repack::decode_row(self.dtype, group, r % g, out);
            return;
        }
        decode_into(self.dtype, &self.data[r * rb..(r + 1) * rb], out);
    }

    /// Decodes the whole matrix into a new f32 vector (row-major).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        if self.dtype.interleave() > 1 {
            for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
                self.row_into(r, row);
            }
            return out;
        }
        decode_into(self.dtype, self.data, &mut out);
        out
    }
}

/// Decodes little-endian `bytes` of `dtype` into `out` (whole blocks); lengths must agree.
/// Not for repacked types, whose rows are interleaved ([`MatRef::row_into`] decodes them).
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(Some(bytes.len()), dtype.bytes_for(out.len()));
    let mut blocks = |f: fn(&[u8], &mut [f32])| {
        let (vals, size) = dtype.block();
        for (b, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(vals)) {
            f(b, y);
        }
    };
    match dtype {
        DType::Q4_0 => blocks(quant::dequant_q4_0),
        DType::Q4_1 => blocks(quant::dequant_q4_1),
        DType::Q5_0 => blocks(quant::dequant_q5_0),
        DType::Q5_1 => blocks(quant::dequant_q5_1),
        DType::Q8_0 => blocks(quant::dequant_q8_0),
        DType::Q4K => blocks(quant::dequant_q4_k),
        DType::Q5K => blocks(quant::dequant_q5_k),
        DType::Q6K => blocks(quant::dequant_q6_k),
        DType::Q4_0R8 | DType::Q8_0R8 | DType::Q4KR8 | DType::Q5_0R8 => {
            panic!(
                "decode_into: {} rows are interleaved; use MatRef",
                dtype.name()
            )
        }
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            // bf16 is the top half of an f32: a shift, which the compiler vectorises
            // (`half`'s per-element `to_f32` did not, measured 2.4x slower on decode).
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            let mut bits = [0u16; 64];
            for (o, c) in out.chunks_mut(64).zip(bytes.chunks(128)) {
                let n = o.len();
                for (b, p) in bits.iter_mut().zip(c.chunks_exact(2)) {
                    *b = u16::from_le_bytes([p[0], p[1]]);
                }
                // `half` converts slices with F16C when the CPU has it (runtime check).
                bits[..n].reinterpret_cast::<f16>().convert_to_f32_slice(o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_type_exactly() {
        let vals = [1.5f32, -2.25, 0.0, 1024.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = vals
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        for (dt, b) in [(DType::F32, &f32b), (DType::BF16, &bf), (DType::F16, &hf)] {
            let m = MatRef::new(dt, b, 2, 2).unwrap();
            assert_eq!(m.to_f32(), vals.to_vec(), "{dt:?}");
            let mut row = [0.0; 2];
            m.row_into(1, &mut row);
            assert_eq!(row, [0.0, 1024.0]);
            assert_eq!(m.row_range(1, 1).to_f32(), vec![0.0, 1024.0]);
        }
        assert!(MatRef::new(DType::F32, &f32b, 3, 2).is_none());
    }
}
