//! GGUF files (llama.cpp's format) read over mmap: the header, the metadata
//! key-values, the tensor infos, the aligned data section. Every count,
//! length and offset is checked against the file before it is used, so a
//! corrupt or truncated file is an error naming what is wrong, never a panic
//! or a huge allocation.
//!
//! The layout (GGUF v2 and v3, little-endian): magic `GGUF`, u32 version,
//! u64 tensor count, u64 metadata count; the metadata (a string key, a u32
//! type, a value; strings are a u64 length and UTF-8 bytes; arrays a u32
//! element type, a u64 count, the elements); the tensor infos (name, u32
//! dimension count, u64 dimensions with the fastest first, u32 type, u64
//! offset into the data); then, at the next multiple of
//! `general.alignment` (default 32), the data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// An integer value of any width, if it is one and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A number of any type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The tensor types kvsift reads (ggml's numbering), and any other by number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
    Q4K,
    Q6K,
    Bf16,
    /// A type kvsift does not read (its ggml number).
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            n => GgmlType::Other(n),
        }
    }

    /// Weights per block and bytes per block (None: not a type kvsift reads).
    pub fn block(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::Bf16 => Some((1, 2)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4K => Some((256, 144)),
            GgmlType::Q6K => Some((256, 210)),
            GgmlType::Other(_) => None,
        }
    }

    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "f32".into(),
            GgmlType::F16 => "f16".into(),
            GgmlType::Q4_0 => "q4_0".into(),
            GgmlType::Q8_0 => "q8_0".into(),
            GgmlType::Q4K => "q4_K".into(),
            GgmlType::Q6K => "q6_K".into(),
            GgmlType::Bf16 => "bf16".into(),
            GgmlType::Other(n) => format!("ggml type {n}"),
        }
    }
}

/// One tensor's info.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions, fastest-varying first (ggml's `ne`): a `[rows, cols]`
    /// matrix in row-major order is `[cols, rows]` here.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Byte offset into the data section (aligned).
    pub offset: u64,
    /// Bytes it takes (blocks of its type).
    pub bytes: u64,
}

/// Most metadata entries and tensors a file may declare (far above any model).
const MAX_ENTRIES: u64 = 1 << 20;
/// Deepest nesting of arrays.
const MAX_DEPTH: usize = 4;

/// A GGUF file, mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
    /// Where the data section starts in the file.
    data_start: usize,
    map: Mmap,
}

/// A cursor over the mapped bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "{what}: {n} bytes at offset {} run past the end of the file ({} bytes)",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| format!("{what}: length {n} is too large"))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("{what}: not UTF-8 ({e})"))
    }

    /// Bytes left.
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn value(
        &mut self,
        ty: u32,
        what: &str,
        depth: usize,
    ) -> std::result::Result<GgufValue, String> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count past the
                // bytes left is corrupt (and would allocate without bound).
                if n > self.left() as u64 {
                    return Err(format!(
                        "{what}: an array of {n} elements in {} bytes left",
                        self.left()
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        crate::model::weights::check_regular_file(path)?;
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath while
        // mapped is the user's doing, and every read is bounds-checked.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let bad = |reason: String| Error::BadGguf {
            path: path.to_path_buf(),
            reason,
        };
        let (version, metadata, tensors, data_start) = Self::parse(&map).map_err(bad)?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            map,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        bytes: &[u8],
    ) -> std::result::Result<(u32, BTreeMap<String, GgufValue>, Vec<GgufTensor>, usize), String>
    {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4, "magic")? != b"GGUF" {
            return Err("not a GGUF file (the magic is not \"GGUF\")".into());
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("version {version}: kvsift reads GGUF v2 and v3"));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        for (n, what) in [(n_tensors, "tensor count"), (n_kv, "metadata count")] {
            if n > MAX_ENTRIES {
                return Err(format!("{what} {n} is implausible (at most {MAX_ENTRIES})"));
            }
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("metadata {key:?} type"))?;
            let value = r.value(ty, &format!("metadata {key:?}"), 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("metadata {key:?} appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => return Err(format!("general.alignment {v:?}: must be a power of two")),
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors.min(r.left() as u64) as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor {i} name"))?;
            let what = format!("tensor {name:?}");
            let nd = r.u32(&format!("{what} dimension count"))?;
            if !(1..=4).contains(&nd) {
                return Err(format!("{what}: {nd} dimensions (1 to 4)"));
            }
            let mut dims = vec![];
            for _ in 0..nd {
                let d = r.u64(&format!("{what} dimensions"))?;
                if d == 0 {
                    return Err(format!("{what}: a dimension of 0"));
                }
                dims.push(d);
            }
            let dtype = GgmlType::from_id(r.u32(&format!("{what} type"))?);
            let offset = r.u64(&format!("{what} offset"))?;
            let count = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| format!("{what}: {dims:?} overflows"))?;
            let bytes = match dtype.block() {
                Some((per, size)) => {
                    if dims[0] % per as u64 != 0 {
                        return Err(format!(
                            "{what}: {} rows of {} elements are not whole {} blocks of {per}",
                            count / dims[0],
                            dims[0],
                            dtype.name()
                        ));
                    }
                    (count / per as u64)
                        .checked_mul(size as u64)
                        .ok_or_else(|| format!("{what}: {dims:?} overflows"))?
                }
                // Its size is unknown; loading it is refused by name later.
                None => 0,
            };
            if offset % alignment as u64 != 0 {
                return Err(format!(
                    "{what}: offset {offset} is not a multiple of the alignment {alignment}"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!("{what} appears twice"));
            }
            tensors.push(GgufTensor {
                name,
                dims,
                dtype,
                offset,
                bytes,
            });
        }
        let data_start = r.at.div_ceil(alignment) * alignment;
        let data_len = bytes.len().saturating_sub(data_start) as u64;
        for t in &tensors {
            let end = t.offset.checked_add(t.bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(format!(
                    "tensor {:?}: {} bytes at offset {} run past the end of the data ({data_len} bytes): the file is truncated",
                    t.name, t.bytes, t.offset
                ));
            }
        }
        Ok((version, metadata, tensors, data_start))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's bytes, as stored (blocks of its type).
    pub fn data(&self, t: &GgufTensor) -> Result<&[u8]> {
        Ok(&self.map[self.data_range(t)?])
    }

    /// Where a tensor's bytes lie in the file.
    pub fn data_range(&self, t: &GgufTensor) -> Result<std::ops::Range<usize>> {
        if t.dtype.block().is_none() {
            return Err(Error::BadTensor {
                path: self.path.clone(),
                tensor: t.name.clone(),
                reason: format!(
                    "{} is not a type kvsift reads (f32, f16, bf16, q8_0, q4_0, q4_K, q6_K)",
                    t.dtype.name()
                ),
            });
        }
        // In range: checked when the file was opened.
        let start = self.data_start + t.offset as usize;
        Ok(start..start + t.bytes as usize)
    }

    /// The mapping (for a store that keeps the tensors' bytes).
    pub fn into_map(self) -> Mmap {
        self.map
    }
}

pub mod model;

#[cfg(test)]
mod tests;
