//! Safetensors weights: one file or a sharded set with `model.safetensors.index.json`,
//! memory-mapped. Tensors are borrowed from the maps; the only copies are weights
//! repacked for the integer kernels ([`Packable`]) and tensors derived at load.

use crate::error::ModelError;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use whale_kernels::{DType, MatRef};

/// Where a tensor's bytes live.
#[derive(Clone, Debug)]
enum Backing {
    /// Inside a memory-mapped file.
    Map(Arc<Mmap>),
    /// In memory of its own (a weight repacked at load).
    Owned(Arc<Vec<u8>>),
}

/// A tensor inside a memory-mapped file, or a copy of one made at load.
#[derive(Clone, Debug)]
pub struct Tensor {
    map: Backing,
    offset: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
    file: Arc<PathBuf>,
}

impl Tensor {
    pub(crate) fn from_map(
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
        dtype: DType,
        shape: Vec<usize>,
        file: Arc<PathBuf>,
    ) -> Self {
        Tensor {
            map: Backing::Map(map),
            offset,
            len,
            dtype,
            shape,
            file,
        }
    }

    /// A tensor over bytes made in memory from this one (a repacked or transposed
    /// copy), attributed to the same file in messages.
    pub(crate) fn derived(&self, bytes: Vec<u8>, dtype: DType, shape: Vec<usize>) -> Tensor {
        Tensor {
            len: bytes.len(),
            map: Backing::Owned(Arc::new(bytes)),
            offset: 0,
            dtype,
            shape,
            file: self.file.clone(),
        }
    }

    /// `(rows, cols)` with `cols` the innermost dimension and every other one folded
    /// into rows: the matrix a repacked tensor's groups are made of.
    fn inner_dims(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.shape.iter().rev().skip(1).product::<usize>(), cols)
    }

    /// This tensor seen as a `[rows, cols]` matrix (`cols` = the innermost
    /// dimension) repacked into row-interleaved groups for the integer kernels
    /// ([`whale_kernels::repack`]), when its type and shape allow; the file's pages
    /// it was read from are then dropped from this process (`MADV_DONTNEED`: they
    /// stay in the page cache, and reading them again maps them back), so resident
    /// memory holds the weights once. `None` leaves the tensor as it is.
    pub(crate) fn repacked(&self) -> Option<Tensor> {
        let (rows, cols) = self.inner_dims();
        // In pieces covering the tensor, each piece's file pages dropped once copied:
        // the output head (118 MB in V2-Lite Q4_0) would otherwise be resident twice.
        let (dtype, bytes) = whale_kernels::repack::repack_pieces(
            self.dtype,
            self.bytes(),
            rows,
            cols,
            REPACK_PIECE,
            |r| self.release_range(r.start, r.len()),
        )?;
        Some(self.derived(bytes, dtype, self.shape.clone()))
    }

    /// Drops this tensor's file pages from the process (`MADV_DONTNEED`); they stay
    /// in the page cache and a later read maps them back. For a tensor whose bytes
    /// are held elsewhere (a repacked copy), so resident memory holds them once.
    /// Nothing for a tensor that owns its bytes.
    pub(crate) fn release_file_pages(&self) {
        self.release_range(0, self.len);
    }

    /// [`Self::release_file_pages`] for `len` bytes from `start` within the tensor.
    fn release_range(&self, start: usize, len: usize) {
        if let Backing::Map(m) = &self.map {
            // SAFETY: the map is read-only (memmap2 maps it shared, and nothing writes
            // through it), so discarding its pages loses nothing: a later read faults
            // the same file bytes back in from the page cache or the file. Slices into
            // the range (a repack's source, still being read) see the same bytes after.
            let _ = unsafe {
                m.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.offset + start,
                    len.min(self.len - start),
                )
            };
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape as stored (PyTorch order, outermost first).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.map {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        };
        &all[self.offset..self.offset + self.len]
    }

    /// The file the tensor lives in.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// A 2-D view `[shape[0], product of the rest]`.
    pub fn mat(&self) -> MatRef<'_> {
        let (rows, cols) = if self.dtype.interleave() > 1 {
            // Repacked: groups of rows of the innermost dimension.
            self.inner_dims()
        } else {
            let rows = self.shape.first().copied().unwrap_or(1);
            (rows, self.shape.iter().skip(1).product::<usize>())
        };
        // Length was checked against shape and dtype when the tensor was opened.
        MatRef::new(self.dtype, self.bytes(), rows, cols).expect("tensor length checked at load")
    }

    /// Decodes the whole tensor to f32 (for small tensors: norms, biases).
    pub fn to_f32(&self) -> Vec<f32> {
        if self.dtype.interleave() > 1 {
            return self.mat().to_f32();
        }
        let n = self.shape.iter().product::<usize>();
        MatRef::new(self.dtype, self.bytes(), 1, n)
            .expect("tensor length checked at load")
            .to_f32()
    }

    /// Rows `start..start + n` of the tensor seen as a matrix with `cols` columns
    /// (e.g. one expert's gate rows inside a fused `[E, 2I, d]` tensor).
    pub(crate) fn rows(&self, start: usize, n: usize, cols: usize) -> Tensor {
        let rb = self.dtype.bytes_for(cols).expect("whole blocks");
        debug_assert!((start + n) * rb <= self.len);
        let g = self.dtype.interleave();
        assert!(
            start.is_multiple_of(g) && n.is_multiple_of(g),
            "rows {start}..{} cut a group of {g} interleaved rows",
            start + n
        );
        Tensor {
            map: self.map.clone(),
            offset: self.offset + start * rb,
            len: n * rb,
            dtype: self.dtype,
            shape: vec![n, cols],
            file: self.file.clone(),
        }
    }
}

/// Returns freed heap memory to the system (glibc's `malloc_trim`): loading leaves
/// about 110 MB of freed, still-resident heap behind on V2-Lite (the tokenizer's
/// and the metadata's temporaries, between the weights' allocations), which glibc
/// only gives back from the top of the heap by itself; [`crate::ModelFolder::open`]
/// calls it once the model is built (and repacked, when repacking at load). Returns whether anything was
/// released; nothing to do on other C libraries.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks glibc's own free lists (all arenas) under
        // their locks and advises the free pages away; it touches no live allocation.
        // Exercised by `weights::tests::release_free_heap_after_frees`.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Source bytes repacked between drops of their file pages ([`Tensor::repacked`]).
const REPACK_PIECE: usize = 8 << 20;

/// A weight that may be repacked after load ([`Tensor::repacked`]): readers get the
/// repacked copy once it exists and the file's bytes until then, so a model can
/// start answering while its weights are repacked on another thread.
#[derive(Debug)]
pub(crate) struct Packable {
    file: Tensor,
    packed: std::sync::OnceLock<Tensor>,
    allowed: bool,
    /// The stacked tensor whose rows `file` views, repacked as a whole for all the
    /// weights that view it.
    stack: Option<Arc<Stack>>,
}

/// A stacked tensor (a MoE layer's experts, `[E, rows, cols]` in one file tensor)
/// repacked once as a whole for the [`Packable`]s that view its rows: one buffer of
/// ~100 MB per V2-Lite layer lies on 2 MiB pages (`whale_kernels::huge`), where each
/// expert's own 1.6 MB copy would be smaller than one and stay on 4 KiB pages.
/// `cargo bench -p whale-kernels --bench stream`: decode-shaped Q4_0 products read
/// 22.1 GB/s from 4 KiB pages and 24.5 GB/s from huge pages (7 rounds, alternated).
#[derive(Debug)]
pub(crate) struct Stack {
    file: Tensor,
    packed: std::sync::OnceLock<Option<Tensor>>,
}

impl Stack {
    /// The stacked tensor `t`, not yet repacked.
    pub fn new(t: Tensor) -> Arc<Self> {
        Arc::new(Stack {
            file: t,
            packed: std::sync::OnceLock::new(),
        })
    }
}

impl Packable {
    /// `t`, to be repacked later if `allowed` (and its type and shape permit).
    pub fn new(t: Tensor, allowed: bool) -> Self {
        Packable {
            file: t,
            packed: std::sync::OnceLock::new(),
            allowed,
            stack: None,
        }
    }

    /// Rows `start..start + n` (`cols` wide) of `stack`, repacked with the whole stack.
    pub fn in_stack(stack: &Arc<Stack>, start: usize, n: usize, cols: usize) -> Self {
        Packable {
            file: stack.file.rows(start, n, cols),
            packed: std::sync::OnceLock::new(),
            allowed: true,
            stack: Some(stack.clone()),
        }
    }

    /// The repacked tensor if it is ready, else the file's.
    pub fn get(&self) -> &Tensor {
        self.packed.get().unwrap_or(&self.file)
    }

    /// Drops the file's pages of a repacked weight again: reading a neighbouring
    /// tensor maps in the pages around it (the kernel's fault-around, 64 KiB), which
    /// puts back up to 15 pages of every repacked tensor next to one read later, about
    /// 160 MB over V2-Lite's experts. A sweep after the whole repack drops them.
    pub fn release_file_pages(&self) {
        if self.packed.get().is_some() {
            self.file.release_file_pages();
        }
    }

    /// Repacks once (later calls do nothing); the bytes repacked, 0 if none.
    pub fn repack(&self) -> usize {
        if !self.allowed || self.packed.get().is_some() {
            return 0;
        }
        let packed = match &self.stack {
            Some(s) => {
                // This weight's rows within the stack.
                let (n, cols) = self.file.inner_dims();
                let rb = self.file.dtype.bytes_for(cols).expect("whole blocks");
                let start = (self.file.offset - s.file.offset) / rb;
                match s.packed.get_or_init(|| s.file.repacked()) {
                    // Its rows are whole groups of the repacked stack: a view of them.
                    Some(w)
                        if [start, n]
                            .iter()
                            .all(|v| v.is_multiple_of(w.dtype().interleave())) =>
                    {
                        Some(w.rows(start, n, cols))
                    }
                    _ => self.file.repacked(),
                }
            }
            None => self.file.repacked(),
        };
        match packed {
            Some(t) => {
                let n = t.bytes().len();
                let _ = self.packed.set(t);
                n
            }
            None => 0,
        }
    }
}

/// All tensors of a model folder, by name.
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
    files: Vec<PathBuf>,
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`,
    /// or else every `*.safetensors` file in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.is_file() {
            let v = crate::error::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index, "no weight_map object"))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(ModelError::format(
                    dir,
                    "no model.safetensors, index or *.safetensors file",
                ));
            }
            found
        };
        let mut store = WeightStore {
            tensors: HashMap::new(),
            files: vec![],
        };
        for f in files {
            store.add_file(&f)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only (a shared map of the file); whale never writes
        // through it. As with every mmap-based loader, a file truncated by another process
        // while mapped would fault; model files are not modified while served.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let map = Arc::new(map);
        let shared_path = Arc::new(path.to_path_buf());
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| ModelError::format(path, format!("not a valid safetensors file: {e}")))?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => {
                    return Err(ModelError::DType {
                        file: path.to_path_buf(),
                        tensor: name,
                        dtype: format!("{other:?}"),
                    })
                }
            };
            let data = view.data();
            let offset = data.as_ptr() as usize - base;
            let t = Tensor {
                map: Backing::Map(map.clone()),
                offset,
                len: data.len(),
                dtype,
                shape: view.shape().to_vec(),
                file: shared_path.clone(),
            };
            if self.tensors.insert(name.clone(), t).is_some() {
                return Err(ModelError::format(
                    path,
                    format!("tensor {name:?} appears in more than one file"),
                ));
            }
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.len).sum()
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                tensor: name.to_string(),
                files: self
                    .files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if t.shape != shape {
            return Err(ModelError::Shape {
                file: t.file.to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An owned Q4_0 tensor `[e, i, d]` of made-up values.
    fn stacked_q4(e: usize, i: usize, d: usize) -> Tensor {
        let rb = DType::Q4_0.bytes_for(d).unwrap();
        let mut bytes = vec![0u8; e * i * rb];
        for (r, row) in bytes.chunks_mut(rb).enumerate() {
            let x: Vec<f32> = (0..d).map(|c| ((r * 31 + c) as f32 * 0.37).sin()).collect();
            whale_kernels::quantize::quantize_row(DType::Q4_0, &x, row);
        }
        Tensor {
            len: bytes.len(),
            map: Backing::Owned(Arc::new(bytes)),
            offset: 0,
            dtype: DType::Q4_0,
            shape: vec![e, i, d],
            file: Arc::new(PathBuf::from("stack.gguf")),
        }
    }

    #[test]
    fn experts_in_a_stack_view_its_repacked_rows() {
        let (e, i, d) = (3, 16, 64);
        let t = stacked_q4(e, i, d);
        let stack = Stack::new(t.clone());
        let experts: Vec<Packable> = (0..e)
            .map(|k| Packable::in_stack(&stack, k * i, i, d))
            .collect();
        let mut done = 0;
        for (k, p) in experts.iter().enumerate() {
            done += p.repack();
            // The same bytes as repacking the expert on its own, and a view into
            // the one stack buffer.
            let own = t.rows(k * i, i, d).repacked().unwrap();
            assert_eq!(p.get().dtype(), own.dtype());
            assert_eq!(p.get().bytes(), own.bytes());
            assert_eq!(p.get().shape(), &[i, d]);
            assert!(matches!(p.get().map, Backing::Owned(_)));
            assert_eq!(p.get().offset, k * i * DType::Q4_0.bytes_for(d).unwrap());
        }
        assert_eq!(done, t.bytes().len());
        // Rows that cut the stack's groups of eight stay as stored.
        let odd = stacked_q4(2, 12, 64);
        let stack = Stack::new(odd);
        let p = Packable::in_stack(&stack, 12, 12, 64);
        assert_eq!(p.repack(), 0);
        assert_eq!(p.get().dtype(), DType::Q4_0);
    }

    #[test]
    fn release_free_heap_after_frees() {
        // Every other 64 KiB block freed: whole free pages between live blocks, which
        // only a trim gives back. The live blocks must come through untouched.
        let mut blocks: Vec<Option<Vec<u8>>> = (0..1024)
            .map(|i| Some(vec![(i % 251) as u8; 64 << 10]))
            .collect();
        for b in blocks.iter_mut().step_by(2) {
            *b = None;
        }
        let released = release_free_heap();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(released, "malloc_trim found nothing to release");
        }
        for (i, b) in blocks.iter().enumerate() {
            if let Some(b) = b {
                assert!(b.iter().all(|&x| x == (i % 251) as u8), "block {i} changed");
            }
        }
        release_free_heap();
    }
}
