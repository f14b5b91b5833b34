//! Weight matrices on the GPU: f32, f16 packed two per `u32` (no
//! `shader-f16` needed), or llama.cpp's quantized blocks as GGUF stores them
//! (bytes back to back in `u32` words), split by rows into parts that each
//! fit one storage binding, so a tensor larger than
//! `max_storage_buffer_binding_size` (128 MiB on lavapipe) still works. A
//! row is always whole blocks, so a split by rows splits on block
//! boundaries. Each part has its own dtype: a GGUF Q4_K_M file fuses q4_K
//! `attn_q`/`attn_k` with a q6_K `attn_v` into one q/k/v matrix.

use half::f16;

use super::{GpuContext, buffer::create_with};
use crate::error::{Error, Result};

/// A quantized block format of llama.cpp (ggml), byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q8_0,
    Q4_0,
    Q4K,
    Q6K,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 4] = [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4K,
        QuantFormat::Q6K,
    ];

    /// Weights per block.
    pub fn block_weights(self) -> usize {
        match self {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 => 32,
            QuantFormat::Q4K | QuantFormat::Q6K => 256,
        }
    }

    /// Bytes per block (always even, so every row starts at an even byte).
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => 34,
            QuantFormat::Q4_0 => 18,
            QuantFormat::Q4K => 144,
            QuantFormat::Q6K => 210,
        }
    }

    /// ggml's name (`q4_K`).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4K => "q4_K",
            QuantFormat::Q6K => "q6_K",
        }
    }

    /// The suffix of the WGSL entry points that read it (`q4_k`).
    pub fn entry_suffix(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4K => "q4_k",
            QuantFormat::Q6K => "q6_k",
        }
    }

    /// Bytes of `n` weights (a multiple of the block).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_weights() * self.block_bytes()
    }
}

/// How a weight matrix is stored on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    /// IEEE half, two per `u32` (element `2j` in the low 16 bits), decoded with
    /// `unpack2x16float`.
    F16,
    /// Blocks of a quantized format; rows must be whole blocks.
    Quant(QuantFormat),
}

impl WeightDtype {
    pub const Q8_0: WeightDtype = WeightDtype::Quant(QuantFormat::Q8_0);
    pub const Q4_0: WeightDtype = WeightDtype::Quant(QuantFormat::Q4_0);

    /// `u32` words of host scratch one stored row of `cols` elements takes
    /// (f16 rows are padded to an even length with a zero; quantized rows
    /// are [`Self::row_bytes`] rounded up to a word).
    pub fn row_words(self, cols: usize) -> usize {
        match self {
            WeightDtype::F32 => cols,
            WeightDtype::F16 => cols.div_ceil(2),
            WeightDtype::Quant(f) => f.bytes_for(cols).div_ceil(4),
        }
    }

    /// Bytes one stored row takes on the GPU (rows are back to back).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            WeightDtype::F32 | WeightDtype::F16 => 4 * self.row_words(cols),
            WeightDtype::Quant(f) => f.bytes_for(cols),
        }
    }

    /// The row stride the kernels' `row_words` parameter holds: words for
    /// f32 and f16, bytes for quantized blocks.
    pub fn row_stride(self, cols: usize) -> usize {
        match self {
            WeightDtype::Quant(f) => f.bytes_for(cols),
            _ => self.row_words(cols),
        }
    }

    /// Whether a row of `cols` weights can be stored in this dtype.
    pub fn fits(self, cols: usize) -> bool {
        match self {
            WeightDtype::Quant(f) => cols.is_multiple_of(f.block_weights()),
            _ => true,
        }
    }

    pub fn quant(self) -> Option<QuantFormat> {
        match self {
            WeightDtype::Quant(f) => Some(f),
            _ => None,
        }
    }

    /// The value the GPU sees for `x` stored in this dtype (f32 and f16;
    /// quantized values depend on their whole block: see
    /// `ops::quant::round_row`), so this returns `x` for them.
    pub fn round(self, x: f32) -> f32 {
        match self {
            WeightDtype::F16 => f16::from_f32(x).to_f32(),
            WeightDtype::F32 | WeightDtype::Quant(_) => x,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Quant(f) => f.name(),
        }
    }

    /// The suffix of the WGSL entry points that read it.
    pub fn entry_suffix(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Quant(f) => f.entry_suffix(),
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            "q4_k" | "q6_k" => Err(Error::invalid(
                "weights dtype",
                format!(
                    "{s:?}: kvsift reads q4_K and q6_K blocks from GGUF files but does not \
                     quantize to them; expected f32, f16, q8_0 or q4_0"
                ),
            )),
            _ => Err(Error::invalid(
                "weights dtype",
                format!("{s:?}: expected f32, f16, q8_0 or q4_0"),
            )),
        }
    }
}

/// Packs one row of f32 values into `out` words in `dtype`'s layout (f32
/// and f16; quantizing is `ops::quant`'s, above this layer).
pub fn pack_row(dtype: WeightDtype, row: &[f32], out: &mut [u32]) -> Result<()> {
    if out.len() != dtype.row_words(row.len()) {
        return Err(Error::invalid(
            "pack_row",
            format!(
                "{} values into {} words as {}",
                row.len(),
                out.len(),
                dtype.name()
            ),
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
        WeightDtype::Quant(f) => {
            return Err(Error::invalid(
                "pack_row",
                format!("{} rows are quantized by ops::quant", f.name()),
            ));
        }
    }
    Ok(())
}

/// One row-range of a matrix, in its own buffer, in one dtype.
pub struct MatrixPart {
    pub first_row: usize,
    pub rows: usize,
    pub dtype: WeightDtype,
    pub buffer: wgpu::Buffer,
}

/// A row-major `[rows, cols]` matrix (Hugging Face `[out_features, in_features]`).
pub struct GpuMatrix {
    pub label: String,
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<MatrixPart>,
}

/// Rows of one dtype in a matrix (see [`GpuMatrix::upload_segments`]).
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub rows: usize,
    pub dtype: WeightDtype,
}

impl GpuMatrix {
    /// Rows per part so that one part fits a storage binding.
    pub fn rows_per_part(ctx: &GpuContext, label: &str, row_bytes: usize) -> Result<usize> {
        let row_bytes = row_bytes as u64;
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

    /// Uploads a row-major f32 matrix, converting to `dtype` (f32 or f16;
    /// `ops::quant::upload_quantized` quantizes).
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

    /// [`Self::upload_segments`] with one dtype for every row.
    pub fn upload_with(
        ctx: &GpuContext,
        label: &str,
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
        mut fill: impl FnMut(usize, &mut [u32]) -> Result<()>,
    ) -> Result<Self> {
        Self::upload_segments(ctx, label, cols, &[Segment { rows, dtype }], |r, _, out| {
            fill(r, out)
        })
    }

    /// Uploads segment after segment (rows of one dtype each), part by part;
    /// `fill(row, dtype, words)` writes one stored row into
    /// `dtype.row_words(cols)` words (a quantized row: its bytes, in the
    /// words' byte view), which go straight into the mapped GPU buffer (one
    /// row of host memory). The first error `fill` returns stops the upload
    /// and is returned.
    pub fn upload_segments(
        ctx: &GpuContext,
        label: &str,
        cols: usize,
        segments: &[Segment],
        mut fill: impl FnMut(usize, WeightDtype, &mut [u32]) -> Result<()>,
    ) -> Result<Self> {
        let rows: usize = segments.iter().map(|s| s.rows).sum();
        if rows == 0 || cols == 0 {
            return Err(Error::invalid(
                format!("matrix {label:?}"),
                format!("empty shape [{rows}, {cols}]"),
            ));
        }
        // Neighbours of one dtype share parts (a fused q/k/v of one dtype is
        // one dispatch).
        let mut merged: Vec<Segment> = Vec::with_capacity(segments.len());
        for seg in segments.iter().filter(|s| s.rows > 0) {
            match merged.last_mut() {
                Some(last) if last.dtype == seg.dtype => last.rows += seg.rows,
                _ => merged.push(*seg),
            }
        }
        let mut parts = Vec::new();
        let mut first_row = 0;
        for seg in &merged {
            let dtype = seg.dtype;
            if dtype == WeightDtype::F16 && !ctx.caps.f16_in_f32 {
                return Err(Error::MissingFeature {
                    what: format!("f16 weights ({label}); use f32 weights instead"),
                    feature: "SHADER_F16_IN_F32 (unpack2x16float)",
                    adapter: ctx.adapter_summary.name.clone(),
                });
            }
            if dtype.quant().is_some() && !ctx.caps.f16_in_f32 {
                return Err(Error::MissingFeature {
                    what: format!(
                        "{} weights ({label}): their scales are f16; use f32 weights instead",
                        dtype.name()
                    ),
                    feature: "SHADER_F16_IN_F32 (unpack2x16float)",
                    adapter: ctx.adapter_summary.name.clone(),
                });
            }
            if !dtype.fits(cols) {
                return Err(Error::invalid(
                    format!("matrix {label:?}"),
                    format!(
                        "rows of {cols} weights are not whole {} blocks",
                        dtype.name()
                    ),
                ));
            }
            let row_bytes = dtype.row_bytes(cols);
            let per_part = Self::rows_per_part(ctx, label, row_bytes)?;
            let mut row = vec![0u32; dtype.row_words(cols)];
            let seg_end = first_row + seg.rows;
            while first_row < seg_end {
                let n = per_part.min(seg_end - first_row);
                let part_label = if n == rows {
                    label.to_string()
                } else {
                    format!("{label}[rows {first_row}..{}]", first_row + n)
                };
                let mut failed = None;
                // Mapped buffers are whole words.
                let size = (n * row_bytes).next_multiple_of(4) as u64;
                let buffer = create_with(ctx, &part_label, size, |view| {
                    for i in 0..n {
                        if let Err(e) = fill(first_row + i, dtype, &mut row) {
                            failed = Some(e);
                            return;
                        }
                        let bytes = &bytemuck::cast_slice::<u32, u8>(&row)[..row_bytes];
                        view.slice(i * row_bytes..(i + 1) * row_bytes)
                            .copy_from_slice(bytes);
                    }
                })?;
                if let Some(e) = failed {
                    return Err(e);
                }
                parts.push(MatrixPart {
                    first_row,
                    rows: n,
                    dtype,
                    buffer,
                });
                first_row += n;
            }
        }
        Ok(Self {
            label: label.to_string(),
            rows,
            cols,
            parts,
        })
    }

    /// The dtype of every part, if they share one.
    pub fn dtype(&self) -> Option<WeightDtype> {
        let d = self.parts.first()?.dtype;
        self.parts.iter().all(|p| p.dtype == d).then_some(d)
    }

    /// The dtypes of the parts, in order, each once (`"q4_K+q6_K"`).
    pub fn dtype_names(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        for p in &self.parts {
            if names.last() != Some(&p.dtype.name()) {
                names.push(p.dtype.name());
            }
        }
        names.join("+")
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

    #[test]
    fn quantized_rows_are_whole_blocks_back_to_back() {
        let q8 = WeightDtype::Q8_0;
        assert_eq!(q8.row_bytes(64), 68);
        assert_eq!(q8.row_words(64), 17);
        assert_eq!(q8.row_stride(64), 68);
        assert_eq!(WeightDtype::Q4_0.row_bytes(32), 18);
        assert_eq!(WeightDtype::Q4_0.row_words(32), 5);
        assert!(q8.fits(96) && !q8.fits(100));
        assert!(!WeightDtype::Quant(QuantFormat::Q4K).fits(128));
        assert_eq!("Q4_0".parse::<WeightDtype>().unwrap(), WeightDtype::Q4_0);
        let e = "q4_K".parse::<WeightDtype>().unwrap_err().to_string();
        assert!(e.contains("does not quantize"), "{e}");
        for f in QuantFormat::ALL {
            assert_eq!(f.block_bytes() % 2, 0, "rows start at even bytes");
        }
    }
}
