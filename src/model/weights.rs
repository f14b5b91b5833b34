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

fn map_file(path: &Path) -> Result<Mmap> {
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
            let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
                path: index.clone(),
                source,
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::BadConfig {
                    path: index.clone(),
                    reason: format!("not valid JSON: {e}"),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::BadConfig {
                    path: index.clone(),
                    reason: "no weight_map object".into(),
                })?;
            let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                store.add_file(&dir.join(shard))?;
            }
            for (name, shard) in map {
                let shard_path = dir.join(shard.as_str().unwrap_or_default());
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
        &self.files[0].0
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

    /// Row `r` (of the last dimension) as f32. Call [`Self::expect`] first.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols();
        assert_eq!(out.len(), cols, "row_f32 {}: row length", self.name);
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
            d => unreachable!("dtype {d:?} passed expect()"),
        }
    }

    /// The whole tensor as f32. Call [`Self::expect`] first.
    pub fn to_f32(&self) -> Vec<f32> {
        let cols = self.cols();
        let rows = self.shape.iter().product::<usize>() / cols.max(1);
        let mut out = vec![0.0; rows * cols];
        for (r, chunk) in out.chunks_exact_mut(cols.max(1)).enumerate() {
            self.row_f32(r, chunk);
        }
        out
    }

    /// Row `r` packed for the GPU in `dtype` (f16 source to f16 copies bits).
    pub fn pack_row(&self, r: usize, dtype: WeightDtype, scratch: &mut Vec<f32>, out: &mut [u32]) {
        let cols = self.cols();
        if dtype == WeightDtype::F16 && self.dtype == Dtype::F16 {
            let bytes = &self.data[r * cols * 2..(r + 1) * cols * 2];
            for (j, o) in out.iter_mut().enumerate() {
                let lo = u16::from_le_bytes([bytes[4 * j], bytes[4 * j + 1]]) as u32;
                let hi = bytes
                    .get(4 * j + 2..4 * j + 4)
                    .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as u32);
                *o = lo | (hi << 16);
            }
            return;
        }
        scratch.resize(cols, 0.0);
        self.row_f32(r, scratch);
        crate::gpu::matrix::pack_row(dtype, scratch, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvsift-weights-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn st_bytes() -> Vec<u8> {
        let a: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = [bf16::from_f32(1.5), bf16::from_f32(-0.125)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let views = vec![
            (
                "a",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 2], &a).unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![2], &b).unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn reads_and_converts_tensors() {
        let d = tmpdir("ok");
        write(&d, "model.safetensors", &st_bytes());
        let s = WeightStore::open(&d).unwrap();
        let a = s.get("a").unwrap();
        a.expect(&[2, 2]).unwrap();
        assert_eq!(a.to_f32(), vec![1.0, -2.0, 3.5, 0.25]);
        let b = s.get("b").unwrap();
        b.expect(&[2]).unwrap();
        assert_eq!(b.to_f32(), vec![1.5, -0.125]);
        let e = a.expect(&[4]).unwrap_err().to_string();
        assert!(e.contains("\"a\"") && e.contains("[2, 2]"), "{e}");
        let e = s.get("c").err().unwrap().to_string();
        assert!(e.contains("\"c\"") && e.contains("missing"), "{e}");
    }

    #[test]
    fn truncated_and_corrupt_files_are_errors_naming_the_file() {
        let d = tmpdir("bad");
        let bytes = st_bytes();
        write(&d, "model.safetensors", &bytes[..bytes.len() - 3]);
        let e = WeightStore::open(&d).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("safetensors"),
            "{e}"
        );
        write(
            &d,
            "model.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        );
        assert!(WeightStore::open(&d).is_err());
        write(&d, "model.safetensors", b"");
        assert!(WeightStore::open(&d).is_err());
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        let e = WeightStore::open(&d).err().unwrap().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
    }

    #[test]
    fn sharded_checkpoints_follow_the_index() {
        let d = tmpdir("shards");
        write(&d, "part-1.safetensors", &st_bytes());
        write(
            &d,
            "model.safetensors.index.json",
            br#"{"weight_map": {"a": "part-1.safetensors", "b": "part-1.safetensors"}}"#,
        );
        let s = WeightStore::open(&d).unwrap();
        assert!(s.contains("a") && s.contains("b"));
        write(
            &d,
            "model.safetensors.index.json",
            br#"{"weight_map": {"a": "part-1.safetensors", "z": "part-1.safetensors"}}"#,
        );
        let e = WeightStore::open(&d).err().unwrap().to_string();
        assert!(e.contains("\"z\""), "{e}");
    }
}
