//! Safetensors checkpoints read through mmap: `model.safetensors` or the
//! shards named by `model.safetensors.index.json`. Every header is validated
//! when the store opens (a corrupt or truncated file fails there, naming the
//! file); tensors are then converted row by row straight from the mapping.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::gpu::WeightDtype;

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of one checkpoint directory.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

/// One tensor, borrowed from the mapping.
pub struct TensorRef<'a> {
    pub path: &'a Path,
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    data: &'a [u8],
}

/// A shard named in an index: a file beside it, not a path elsewhere.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && Path::new(name).file_name().is_some()
}

/// Fails unless `path` is a regular file (a directory or a FIFO under a
/// checkpoint's name gives a clear error instead of a confusing OS one or a hang).
pub fn check_regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("is {kind}; expected a file"),
            ),
        });
    }
    Ok(())
}

/// Largest JSON or template file kvsift reads (tokenizer.json of the largest
/// vocabularies is tens of MiB).
pub const MAX_TEXT_FILE_BYTES: u64 = 1 << 30;

/// Reads a text file of the model directory (a regular file, at most
/// [`MAX_TEXT_FILE_BYTES`], UTF-8), naming it in any error.
pub fn read_text(path: &Path) -> Result<String> {
    check_regular_file(path)?;
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if len > MAX_TEXT_FILE_BYTES {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len} bytes: larger than the {MAX_TEXT_FILE_BYTES} bytes kvsift reads"),
        )));
    }
    std::fs::read_to_string(path).map_err(io)
}

fn map_file(path: &Path) -> Result<Mmap> {
    check_regular_file(path)?;
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the mapping is read-only; kvsift never writes checkpoint files.
    // Another process truncating the file while it is mapped is outside what we guard.
    unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl WeightStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut store = WeightStore {
            files: vec![],
            entries: HashMap::new(),
        };
        if index.exists() {
            let text = read_text(&index)?;
            let bad = |reason: String| Error::BadConfig {
                path: index.clone(),
                reason,
            };
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no weight_map object".into()))?;
            if map.is_empty() {
                return Err(bad("weight_map is empty: it names no tensor".into()));
            }
            // Every value must name a file beside the index.
            let mut shard_of = Vec::with_capacity(map.len());
            for (name, shard) in map {
                let file = shard
                    .as_str()
                    .filter(|f| is_plain_file_name(f))
                    .ok_or_else(|| {
                        bad(format!(
                            "weight_map[{name:?}] is {shard}, not the name of a shard file in the model directory"
                        ))
                    })?;
                shard_of.push((name, file));
            }
            let mut shards: Vec<&str> = shard_of.iter().map(|(_, f)| *f).collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                store.add_file(&dir.join(shard))?;
            }
            for (name, shard) in shard_of {
                let shard_path = dir.join(shard);
                match store.entries.get(name) {
                    Some(e) if store.files[e.file].0 == shard_path => {}
                    _ => {
                        return Err(Error::BadTensor {
                            path: shard_path,
                            tensor: name.clone(),
                            reason: format!("listed in {} but not in this shard", index.display()),
                        });
                    }
                }
            }
        } else if single.exists() {
            store.add_file(&single)?;
        } else {
            return Err(Error::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            });
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let mmap = map_file(path)?;
        let base = mmap.as_ptr() as usize;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::BadSafetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file = self.files.len();
        for (name, view) in st.tensors() {
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            self.entries.insert(
                name,
                Entry {
                    file,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                },
            );
        }
        self.files.push((path.to_path_buf(), mmap));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The file a missing tensor would have been looked up in (for errors).
    pub fn first_path(&self) -> &Path {
        // `open` adds at least one file or fails.
        &self.files[0].0
    }

    /// Tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, e) = self
            .entries
            .get_key_value(name)
            .ok_or_else(|| Error::BadTensor {
                path: self.first_path().to_path_buf(),
                tensor: name.to_string(),
                reason: "missing from the checkpoint".into(),
            })?;
        let (path, mmap) = &self.files[e.file];
        Ok(TensorRef {
            path,
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            data: &mmap[e.start..e.end],
        })
    }

    /// Bytes of all tensors (for progress reporting).
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }
}

/// Bytes per element of the dtypes kvsift reads (others are rejected by `expect`).
fn elem_bytes(d: Dtype) -> usize {
    match d {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 0,
    }
}

impl TensorRef<'_> {
    /// Bytes of data.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadTensor {
            path: self.path.to_path_buf(),
            tensor: self.name.to_string(),
            reason,
        }
    }

    /// Checks the shape and that the dtype is one kvsift converts (f32, f16, bf16).
    pub fn expect(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(self.bad(format!(
                "shape {:?}, but the config implies {shape:?}",
                self.shape
            )));
        }
        match self.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => {}
            d => return Err(self.bad(format!("dtype {d:?} (kvsift reads F32, F16 and BF16)"))),
        }
        let elems: usize = shape.iter().product();
        if self.data.len() != elems * elem_bytes(self.dtype) {
            return Err(self.bad(format!(
                "{} bytes of data for {elems} {:?} values",
                self.data.len(),
                self.dtype
            )));
        }
        Ok(())
    }

    fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Rows of the last dimension.
    pub fn rows(&self) -> usize {
        let elems = self.data.len() / elem_bytes(self.dtype).max(1);
        elems / self.cols().max(1)
    }

    /// Checks that row `r` can be read into `out` (dtype, row length, range).
    fn check_row(&self, r: usize, out_len: usize) -> Result<()> {
        if elem_bytes(self.dtype) == 0 {
            return Err(self.bad(format!(
                "dtype {:?} (kvsift reads F32, F16 and BF16)",
                self.dtype
            )));
        }
        if out_len != self.cols() || r >= self.rows() {
            return Err(self.bad(format!(
                "row {r} of {} values asked of a tensor of shape {:?}",
                out_len, self.shape
            )));
        }
        Ok(())
    }

    /// The error for a value that is not a finite number.
    fn non_finite(&self, r: usize, c: usize, v: f32) -> Error {
        let at = if self.shape.len() > 1 {
            format!("[{r}, {c}]")
        } else {
            format!("[{c}]")
        };
        self.bad(format!(
            "holds {v} at {at}: weights must be finite numbers (the checkpoint is corrupt)"
        ))
    }

    /// Row `r` (of the last dimension) as f32; a NaN or infinity is an error
    /// naming the tensor and the element.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.check_row(r, out.len())?;
        let cols = self.cols();
        let size = elem_bytes(self.dtype);
        let bytes = &self.data[r * cols * size..(r + 1) * cols * size];
        match self.dtype {
            Dtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Dtype::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            // check_row admits only the dtypes above.
            d => unreachable!("dtype {d:?} passed check_row"),
        }
        match out.iter().position(|v| !v.is_finite()) {
            Some(c) => Err(self.non_finite(r, c, out[c])),
            None => Ok(()),
        }
    }

    /// The whole tensor as f32 (finite values only, as [`Self::row_f32`]).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let cols = self.cols().max(1);
        let mut out = vec![0.0; self.rows() * cols];
        for (r, chunk) in out.chunks_exact_mut(cols).enumerate() {
            self.row_f32(r, chunk)?;
        }
        Ok(out)
    }

    /// Row `r` packed for the GPU in `dtype` (an f16 source to f16 copies
    /// bits). Errors name the tensor: a NaN or infinity in the checkpoint, or
    /// a finite value beyond f16's range when packing to f16.
    pub fn pack_row(
        &self,
        r: usize,
        dtype: WeightDtype,
        scratch: &mut Vec<f32>,
        out: &mut [u32],
    ) -> Result<()> {
        let cols = self.cols();
        if out.len() != dtype.row_words(cols) {
            return Err(self.bad(format!(
                "{} words asked for a row of {cols} {dtype:?} values",
                out.len()
            )));
        }
        if dtype == WeightDtype::F16 && self.dtype == Dtype::F16 {
            self.check_row(r, cols)?;
            let bytes = &self.data[r * cols * 2..(r + 1) * cols * 2];
            for (c, b) in bytes.chunks_exact(2).enumerate() {
                let bits = u16::from_le_bytes([b[0], b[1]]);
                if bits & 0x7c00 == 0x7c00 {
                    return Err(self.non_finite(r, c, f16::from_bits(bits).to_f32()));
                }
            }
            for (j, o) in out.iter_mut().enumerate() {
                let lo = u16::from_le_bytes([bytes[4 * j], bytes[4 * j + 1]]) as u32;
                let hi = bytes
                    .get(4 * j + 2..4 * j + 4)
                    .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as u32);
                *o = lo | (hi << 16);
            }
            return Ok(());
        }
        scratch.resize(cols, 0.0);
        self.row_f32(r, scratch)?;
        crate::gpu::matrix::pack_row(dtype, scratch, out)?;
        // A finite value that rounds to an f16 infinity is beyond its range.
        let half_inf = |h: u32| h & 0x7c00 == 0x7c00;
        if dtype == WeightDtype::F16
            && let Some(j) = out.iter().position(|w| half_inf(*w) || half_inf(*w >> 16))
        {
            let c = if half_inf(out[j]) { 2 * j } else { 2 * j + 1 };
            return Err(self.bad(format!(
                "holds {} at column {c} of row {r}, beyond the f16 range (65504); \
                 load with --weights-dtype f32",
                scratch[c]
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
