//! Weight matrices on the GPU: f32, or f16 packed two per `u32` (no
//! `shader-f16` needed), split by rows into parts that each fit one storage
//! binding, so a tensor larger than `max_storage_buffer_binding_size`
//! (128 MiB on lavapipe) still works.

use half::f16;

use super::{GpuContext, buffer::create_with};
use crate::error::{Error, Result};

/// How a weight matrix is stored on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    /// IEEE half, two per `u32` (element `2j` in the low 16 bits), decoded with
    /// `unpack2x16float`.
    F16,
}

impl WeightDtype {
    /// `u32` words one stored row of `cols` elements takes (f16 rows are padded
    /// to an even length with a zero).
    pub fn row_words(self, cols: usize) -> usize {
        match self {
            WeightDtype::F32 => cols,
            WeightDtype::F16 => cols.div_ceil(2),
        }
    }

    /// The value the GPU sees for `x` stored in this dtype.
    pub fn round(self, x: f32) -> f32 {
        match self {
            WeightDtype::F32 => x,
            WeightDtype::F16 => f16::from_f32(x).to_f32(),
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            _ => Err(Error::invalid(
                "weights dtype",
                format!("{s:?}: expected f32 or f16"),
            )),
        }
    }
}

/// Packs one row of f32 values into `out` words in `dtype`'s layout.
pub fn pack_row(dtype: WeightDtype, row: &[f32], out: &mut [u32]) -> Result<()> {
    if out.len() != dtype.row_words(row.len()) {
        return Err(Error::invalid(
            "pack_row",
            format!("{} values into {} words as {dtype:?}", row.len(), out.len()),
        ));
    }
    match dtype {
        WeightDtype::F32 => {
            for (o, v) in out.iter_mut().zip(row) {
                *o = v.to_bits();
            }
        }
        WeightDtype::F16 => {
            for (j, o) in out.iter_mut().enumerate() {
                let lo = f16::from_f32(row[2 * j]).to_bits() as u32;
                let hi = row
                    .get(2 * j + 1)
                    .map_or(0, |v| f16::from_f32(*v).to_bits() as u32);
                *o = lo | (hi << 16);
            }
        }
    }
    Ok(())
}

/// One row-range of a matrix, in its own buffer.
pub struct MatrixPart {
    pub first_row: usize,
    pub rows: usize,
    pub buffer: wgpu::Buffer,
}

/// A row-major `[rows, cols]` matrix (Hugging Face `[out_features, in_features]`).
pub struct GpuMatrix {
    pub label: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: WeightDtype,
    /// Stored `u32` words per row.
    pub row_words: usize,
    pub parts: Vec<MatrixPart>,
}

impl GpuMatrix {
    /// Rows per part so that one part fits a storage binding.
    pub fn rows_per_part(ctx: &GpuContext, label: &str, row_words: usize) -> Result<usize> {
        let row_bytes = (row_words * 4) as u64;
        let per_part = ctx.caps.max_binding_bytes / row_bytes.max(1);
        if per_part == 0 {
            return Err(Error::LimitExceeded {
                what: format!("one row of matrix {label:?} ({row_bytes} bytes)"),
                requested: row_bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: ctx.caps.max_binding_bytes,
            });
        }
        Ok(per_part as usize)
    }

    /// Uploads a row-major f32 matrix, converting to `dtype`.
    pub fn upload(
        ctx: &GpuContext,
        label: &str,
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
        data: &[f32],
    ) -> Result<Self> {
        if Some(data.len()) != rows.checked_mul(cols) {
            return Err(Error::invalid(
                format!("matrix {label:?}"),
                format!("{} values for [{rows}, {cols}]", data.len()),
            ));
        }
        Self::upload_with(ctx, label, rows, cols, dtype, |r, out| {
            pack_row(dtype, &data[r * cols..(r + 1) * cols], out)
        })
    }

    /// Uploads part by part; `fill(row, words)` writes one stored row, which
    /// goes straight into the mapped GPU buffer (one row of host memory). The
    /// first error `fill` returns stops the upload and is returned.
    pub fn upload_with(
        ctx: &GpuContext,
        label: &str,
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
        mut fill: impl FnMut(usize, &mut [u32]) -> Result<()>,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::invalid(
                format!("matrix {label:?}"),
                format!("empty shape [{rows}, {cols}]"),
            ));
        }
        if dtype == WeightDtype::F16 && !ctx.caps.f16_in_f32 {
            return Err(Error::MissingFeature {
                what: format!("f16 weights ({label}); use f32 weights instead"),
                feature: "SHADER_F16_IN_F32 (unpack2x16float)",
                adapter: ctx.adapter_summary.name.clone(),
            });
        }
        let row_words = dtype.row_words(cols);
        let per_part = Self::rows_per_part(ctx, label, row_words)?;
        let mut parts = Vec::with_capacity(rows.div_ceil(per_part));
        let mut row = vec![0u32; row_words];
        let row_bytes = row_words * 4;
        let mut first_row = 0;
        while first_row < rows {
            let n = per_part.min(rows - first_row);
            let part_label = if parts.is_empty() && n == rows {
                label.to_string()
            } else {
                format!("{label}[rows {first_row}..{}]", first_row + n)
            };
            let mut failed = None;
            let buffer = create_with(ctx, &part_label, (n * row_bytes) as u64, |view| {
                for i in 0..n {
                    if let Err(e) = fill(first_row + i, &mut row) {
                        failed = Some(e);
                        return;
                    }
                    view.slice(i * row_bytes..(i + 1) * row_bytes)
                        .copy_from_slice(bytemuck::cast_slice(&row));
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            parts.push(MatrixPart {
                first_row,
                rows: n,
                buffer,
            });
            first_row += n;
        }
        Ok(Self {
            label: label.to_string(),
            rows,
            cols,
            dtype,
            row_words,
            parts,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.buffer.size()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rows_pack_low_half_first_and_pad_odd_rows_with_zero() {
        let mut out = [0u32; 2];
        pack_row(WeightDtype::F16, &[1.0, -2.0, 0.5], &mut out).unwrap();
        assert!(pack_row(WeightDtype::F16, &[1.0], &mut out).is_err());
        assert_eq!(out[0] & 0xffff, f16::from_f32(1.0).to_bits() as u32);
        assert_eq!(out[0] >> 16, f16::from_f32(-2.0).to_bits() as u32);
        assert_eq!(out[1], f16::from_f32(0.5).to_bits() as u32);
        assert_eq!(WeightDtype::F16.row_words(3), 2);
        assert_eq!("F16".parse::<WeightDtype>().unwrap(), WeightDtype::F16);
        assert!("int4".parse::<WeightDtype>().is_err());
    }
}
