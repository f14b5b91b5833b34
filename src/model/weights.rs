//! Checkpoints read through mmap: safetensors (`model.safetensors` or the
//! shards named by `model.safetensors.index.json`), or one GGUF file whose
//! tensors take their Hugging Face names ([`hf_name`]). Every header is
//! validated when the store opens (a corrupt or truncated file fails there,
//! naming the file); tensors are then converted row by row straight from
//! the mapping: f32/f16/bf16 to the GPU's f32 or f16, quantized to q8_0 or
//! q4_0 with llama.cpp's reference quantizers, or GGUF's blocks as they are.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::gpu::{QuantFormat, WeightDtype};
use crate::model::gguf::{GgmlType, GgufFile};
use crate::ops::quant;

/// How a tensor is stored in the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorDtype {
    F32,
    F16,
    BF16,
    /// llama.cpp's blocks (GGUF).
    Quant(QuantFormat),
    /// A dtype kvsift does not read (its name).
    Other(String),
}

impl TensorDtype {
    fn of_safetensors(d: Dtype) -> Self {
        match d {
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::BF16 => Self::BF16,
            d => Self::Other(format!("{d:?}")),
        }
    }

    fn of_ggml(t: GgmlType) -> Self {
        match t {
            GgmlType::F32 => Self::F32,
            GgmlType::F16 => Self::F16,
            GgmlType::Bf16 => Self::BF16,
            GgmlType::Q8_0 => Self::Quant(QuantFormat::Q8_0),
            GgmlType::Q4_0 => Self::Quant(QuantFormat::Q4_0),
            GgmlType::Q4K => Self::Quant(QuantFormat::Q4K),
            GgmlType::Q6K => Self::Quant(QuantFormat::Q6K),
            t => Self::Other(t.name()),
        }
    }

    /// Bytes of a row of `cols` values (None: not a dtype kvsift reads, or
    /// a row that is not whole blocks).
    fn row_bytes(&self, cols: usize) -> Option<usize> {
        match self {
            Self::F32 => Some(4 * cols),
            Self::F16 | Self::BF16 => Some(2 * cols),
            Self::Quant(f) => cols
                .is_multiple_of(f.block_weights())
                .then(|| f.bytes_for(cols)),
            Self::Other(_) => None,
        }
    }
}

impl std::fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::F32 => f.write_str("F32"),
            Self::F16 => f.write_str("F16"),
            Self::BF16 => f.write_str("BF16"),
            Self::Quant(q) => f.write_str(q.name()),
            Self::Other(s) => f.write_str(s),
        }
    }
}

const READS: &str = "kvsift reads F32, F16, BF16, and from GGUF q8_0, q4_0, q4_K and q6_K";

struct Entry {
    file: usize,
    dtype: TensorDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
    /// Rows stored interleaved per head of this size (llama.cpp's
    /// converter permutes Llama's q/k rows for its rope): row `r` of the
    /// Hugging Face layout is read from [`interleaved_row`].
    interleaved_heads: Option<usize>,
}

/// The stored row holding Hugging Face row `r` of a q/k projection that
/// llama.cpp's converter permuted (`permute()` in convert_hf_to_gguf.py:
/// per head, rows `[j * d/2 + i]` become `[2 i + j]`).
pub fn interleaved_row(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    head * head_dim + 2 * (within % half) + within / half
}

/// The Hugging Face name of a GGUF tensor of the architectures kvsift runs
/// (None: a tensor kvsift does not use, e.g. `rope_freqs.weight`).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (tensor, kind) = rest.rsplit_once('.')?;
    let hf = match tensor {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
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
    pub dtype: &'a TensorDtype,
    pub shape: &'a [usize],
    data: &'a [u8],
    interleaved_heads: Option<usize>,
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

/// Whether `path` names a GGUF file (kvsift's `--model` takes a directory
/// of safetensors or one `.gguf` file).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && (path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            || std::fs::File::open(path)
                .and_then(|mut f| {
                    let mut magic = [0u8; 4];
                    std::io::Read::read_exact(&mut f, &mut magic).map(|_| magic)
                })
                .is_ok_and(|m| &m == b"GGUF"))
}

impl WeightStore {
    /// The checkpoint at `path`: a model directory, or a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        if is_gguf(path) {
            return Self::open_gguf(GgufFile::open(path)?);
        }
        Self::open_dir(path)
    }

    /// The tensors of a GGUF file under their Hugging Face names; Llama's
    /// q/k rows are read back in Hugging Face order (see [`interleaved_row`]).
    pub fn open_gguf(file: GgufFile) -> Result<Self> {
        let arch = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let heads = |key: &str| {
            file.get(&format!("{arch}.{key}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        };
        let (n_head, n_head_kv) = (
            heads("attention.head_count"),
            heads("attention.head_count_kv"),
        );
        let mut entries = HashMap::new();
        for t in &file.tensors {
            let Some(name) = hf_name(&t.name) else {
                continue;
            };
            let range = file.data_range(t)?;
            let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
            // Only llama's converter permutes (qwen2 and qwen3 use NeoX rope,
            // as Hugging Face does).
            let heads = match (arch.as_str(), t.name.rsplit('.').nth(1)) {
                ("llama", Some("attn_q")) => n_head,
                ("llama", Some("attn_k")) => n_head_kv.or(n_head),
                _ => None,
            };
            let interleaved_heads = match heads {
                Some(h) if shape.len() == 2 && h > 0 && shape[0].is_multiple_of(h) => {
                    let head_dim = shape[0] / h;
                    head_dim.is_multiple_of(2).then_some(head_dim)
                }
                _ => None,
            };
            entries.insert(
                name,
                Entry {
                    file: 0,
                    dtype: TensorDtype::of_ggml(t.dtype),
                    shape,
                    start: range.start,
                    end: range.end,
                    interleaved_heads,
                },
            );
        }
        let path = file.path.clone();
        Ok(WeightStore {
            files: vec![(path, file.into_map())],
            entries,
        })
    }

    fn open_dir(dir: &Path) -> Result<Self> {
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
                    dtype: TensorDtype::of_safetensors(view.dtype()),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                    interleaved_heads: None,
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
            dtype: &e.dtype,
            shape: &e.shape,
            data: &mmap[e.start..e.end],
            interleaved_heads: e.interleaved_heads,
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

    /// Checks the shape, that the dtype is one kvsift converts, and that
    /// the data has the size they imply.
    pub fn expect(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(self.bad(format!(
                "shape {:?}, but the config implies {shape:?}",
                self.shape
            )));
        }
        let Some(row_bytes) = self.dtype.row_bytes(self.cols()) else {
            return Err(self.bad(match self.dtype {
                TensorDtype::Quant(f) => format!(
                    "{} rows of {} weights are not whole blocks of {}",
                    f.name(),
                    self.cols(),
                    f.block_weights()
                ),
                d => format!("dtype {d} ({READS})"),
            }));
        };
        let rows: usize = shape.iter().rev().skip(1).product();
        if Some(self.data.len()) != rows.checked_mul(row_bytes) {
            return Err(self.bad(format!(
                "{} bytes of data for {rows} rows of {} {} values",
                self.data.len(),
                self.cols(),
                self.dtype
            )));
        }
        Ok(())
    }

    fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols()).unwrap_or(0)
    }

    /// Rows of the last dimension.
    pub fn rows(&self) -> usize {
        self.data.len() / self.row_bytes().max(1)
    }

    /// The bytes of row `r` (Hugging Face order), checked for `out_len`
    /// values, the dtype and the range.
    fn row_data(&self, r: usize, out_len: usize) -> Result<&[u8]> {
        if self.dtype.row_bytes(self.cols()).is_none() {
            return Err(self.bad(format!("dtype {} ({READS})", self.dtype)));
        }
        if out_len != self.cols() || r >= self.rows() {
            return Err(self.bad(format!(
                "row {r} of {} values asked of a tensor of shape {:?}",
                out_len, self.shape
            )));
        }
        let stored = match self.interleaved_heads {
            Some(d) => interleaved_row(r, d),
            None => r,
        };
        let n = self.row_bytes();
        Ok(&self.data[stored * n..(stored + 1) * n])
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

    /// Row `r` (of the last dimension) as f32 (blocks dequantized); a NaN
    /// or infinity is an error naming the tensor and the element.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let bytes = self.row_data(r, out.len())?;
        match self.dtype {
            TensorDtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            TensorDtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            TensorDtype::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            TensorDtype::Quant(f) => out.copy_from_slice(&quant::dequantize(*f, bytes)),
            // row_data admits only the dtypes above.
            TensorDtype::Other(d) => unreachable!("dtype {d} passed row_data"),
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

    /// The dtype the GPU keeps this tensor in when `want` is asked for:
    /// blocks stay as the file holds them; float rows take `want`, unless
    /// `want` is quantized and the rows are not whole blocks (then f16, as
    /// llama.cpp falls back).
    pub fn stored_as(&self, want: WeightDtype) -> WeightDtype {
        match self.dtype {
            TensorDtype::Quant(f) => WeightDtype::Quant(*f),
            _ if !want.fits(self.cols()) => WeightDtype::F16,
            _ => want,
        }
    }

    /// Every value as the GPU sees it once stored for `want` (see
    /// [`Self::stored_as`]): blocks dequantized, float rows rounded to f16
    /// or quantized and dequantized (the reference forward's weights).
    pub fn stored_values(&self, want: WeightDtype) -> Result<Vec<f32>> {
        let mut values = self.to_f32()?;
        match self.stored_as(want) {
            WeightDtype::Quant(f) if !matches!(self.dtype, TensorDtype::Quant(_)) => {
                for row in values.chunks_exact_mut(self.cols().max(1)) {
                    let q = quant::round_row(f, row)?;
                    row.copy_from_slice(&q);
                }
            }
            d => values.iter_mut().for_each(|v| *v = d.round(*v)),
        }
        Ok(values)
    }

    /// Row `r` packed for the GPU in `dtype` (an f16 source to f16 copies
    /// bits, blocks to the same format copy bytes, float rows to a block
    /// format are quantized with llama.cpp's reference quantizer). Errors
    /// name the tensor: a NaN or infinity in the checkpoint (in blocks: a
    /// scale), or a finite value beyond f16's range when packing to f16.
    pub fn pack_row(
        &self,
        r: usize,
        dtype: WeightDtype,
        scratch: &mut Vec<f32>,
        out: &mut [u32],
    ) -> Result<()> {
        let cols = self.cols();
        if out.len() != dtype.row_words(cols) || !dtype.fits(cols) {
            return Err(self.bad(format!(
                "{} words asked for a row of {cols} {} values",
                out.len(),
                dtype.name()
            )));
        }
        if dtype == WeightDtype::F16 && *self.dtype == TensorDtype::F16 {
            let bytes = self.row_data(r, cols)?;
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
        if let WeightDtype::Quant(f) = dtype {
            let blocks = if *self.dtype == TensorDtype::Quant(f) {
                let bytes = self.row_data(r, cols)?;
                if let Some(b) = quant::first_bad_scale(f, bytes) {
                    return Err(self.bad(format!(
                        "row {r}, block {b}: a scale that is not a finite number \
                         (the checkpoint is corrupt)"
                    )));
                }
                bytes.to_vec()
            } else {
                scratch.resize(cols, 0.0);
                self.row_f32(r, scratch)?;
                quant::quantize(f, scratch)?
            };
            out.fill(0);
            bytemuck::cast_slice_mut::<u32, u8>(out)[..blocks.len()].copy_from_slice(&blocks);
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
